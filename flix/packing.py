"""Padding-free packing for causal models: several examples in one row, position ids
restarting at 0 for each, no attention mask. Hugging Face models that build their masks
with `transformers.masking_utils` read such position ids as separate sequences (the
format of `DataCollatorWithFlattening` and TRL's padding-free training), but only when the
attention mask is None and no cache exists: `packs_exactly` checks a model before anyone
relies on it (and calls use `use_cache=False`, as `flix.lm_loss` does).

FLix routes packed rows per token: `FLixModel.route(features, token_examples=...)` takes
one feature dict per example and, for each input position, the index of its example (-1:
no example); `model(**batch)` with `flix_features` finds the examples from the position
ids. Each layer then computes the update over the union of the batch's bank rows with the
rows a token's example does not use masked out (`flix.layer`): exact, and GEMM-shaped.

    for micro in pack([len(s) for s in seqs], budget=2048):  # micro-batches: rows of example indices
        batch = packed_inputs(seqs, labels, micro, pad_id=tokenizer.pad_token_id)
        with model.route(features, token_examples=batch.pop("token_examples")):  # one dict per example of seqs
            lm_loss(model, **batch).backward()
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NO_EXAMPLE = -1  # token_examples' value at a padding position
WIDTHS = 16  # row widths tried between the longest example and twice it


def first_fit_decreasing(lengths: list[int], width: int) -> list[list[int]]:
    """Example indices in rows of at most `width` tokens (an example longer than `width`
    gets a row of its own), longest examples first, each into the first row it fits."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep the given order
        for r, used in enumerate(fill):
            if used + lengths[i] <= width:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return rows


def split_by_budget(count: int, cost: Callable[[int, int], int], budget: int) -> list[tuple[int, int]]:
    """Items 0..count-1, in order, cut into consecutive chunks [i, j) whose cost(i, j) (the
    positions a chunk computes, growing with j) is at most `budget` (a single item may
    exceed it): as few chunks as the budget allows, and of those the cuts with the least
    total cost (dynamic programming). Fewest first: each micro-batch has a fixed cost,
    and single rows would never pad."""
    best: list[tuple[int, int, int]] = [(0, 0, 0)] + [(1 << 62, 0, 0)] * count  # (chunks, total cost, start) ending at j
    for i in range(count):
        for j in range(i + 1, count + 1):
            c = cost(i, j)
            if c > budget and j > i + 1:
                break
            candidate = (best[i][0] + 1, best[i][1] + c, i)
            if candidate[:2] < best[j][:2]:
                best[j] = candidate
    chunks, j = [], count
    while j:
        i = best[j][2]
        chunks.append((i, j))
        j = i
    return chunks[::-1]


def pack(lengths: list[int], budget: int) -> list[list[list[int]]]:
    """Examples of these lengths as micro-batches of packed rows (example indices per row),
    each micro-batch computing at most `budget` positions (rows x its widest row). The row
    width is chosen between the longest example and twice it, for the fewest micro-batches,
    then the fewest computed positions: wider rows fill better, but transformers' sdpa attends
    over the whole row (a block-diagonal mask), so its cost per token grows with the width
    (`flix.attention` attends per example instead)."""
    if not lengths:
        return []
    longest = max(lengths)
    best = None
    for width in sorted({longest + longest * k // WIDTHS for k in range(WIDTHS + 1)}):
        rows = first_fit_decreasing(lengths, width)
        rows.sort(key=lambda row: -sum(lengths[i] for i in row))
        fills = [sum(lengths[i] for i in row) for row in rows]
        chunks = split_by_budget(len(rows), lambda i, j: (j - i) * fills[i], budget)
        key = (len(chunks), sum((j - i) * fills[i] for i, j in chunks))
        if best is None or key < best[0]:
            best = (key, [rows[i:j] for i, j in chunks])
    return best[1]


def packed_inputs(sequences: list[list[int]], labels: list[list[int]], rows: list[list[int]], pad_id: int, ignore: int = -100) -> dict:
    """Tensors for packed rows (`rows`: indices into `sequences`, one list per row):
    input_ids, position_ids restarting at 0 per example, labels (aligned with input_ids,
    Hugging Face's causal convention) and token_examples (each position's index into
    `sequences`, NO_EXAMPLE on padding). Rows are padded at their end to the widest; the
    padding is a sequence of its own (positions from 0), so no example attends to it."""
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    ids, positions = torch.full(shape, pad_id, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    targets, examples = torch.full(shape, ignore, dtype=torch.long), torch.full(shape, NO_EXAMPLE, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(sequences[i])
            ids[r, start : start + n] = torch.tensor(sequences[i])
            targets[r, start : start + n] = torch.tensor(labels[i])
            targets[r, start] = ignore  # it would be predicted from the example before
            positions[r, start : start + n] = torch.arange(n)
            examples[r, start : start + n] = i
            start += n
        positions[r, start:] = torch.arange(width - start)
    return {"input_ids": ids, "position_ids": positions, "labels": targets, "token_examples": examples}


def sequence_index(position_ids: torch.Tensor) -> torch.Tensor:
    """Each position's sequence, numbered over all rows in row-major order, from packed
    position ids (a new sequence wherever the position does not grow by one, as
    transformers finds them): what `model(**batch)` routes a flattened batch by."""
    position_ids = position_ids.reshape(-1, position_ids.shape[-1])
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    return starts.reshape(-1).cumsum(0) - 1


@torch.no_grad()
def packs_exactly(model, lengths: tuple[int, ...] = (6, 11, 4), tolerance: float = 1e-4) -> bool:
    """Whether this causal model computes packed rows exactly as separate ones: the final
    hidden states of a few random sequences, packed in one row (no attention mask, cache
    off) and each alone, agree to `tolerance` relative. False where the model attends
    across the packed examples (its masks ignore packed position ids). A FLix model is
    checked with its adapters off."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return False
    vocab = getattr(config.get_text_config(), "vocab_size", None) or config.vocab_size
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, min(vocab, 1000), (n,), generator=gen) for n in lengths]
    device = next(model.parameters()).device
    training = model.training
    model.eval()

    def final(ids, positions, mask=None):
        out = model(input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=mask, use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1].float()

    try:
        with model.route([{}]) if hasattr(model, "router") else torch.no_grad():  # a FLixModel: no features
            packed = final(torch.cat(seqs)[None], torch.cat([torch.arange(n) for n in lengths])[None])[0]
            alone = torch.cat([final(s[None], torch.arange(len(s))[None], torch.ones(1, len(s), dtype=torch.long, device=device))[0] for s in seqs])
    finally:
        model.train(training)
    return bool((packed - alone).abs().max() <= tolerance * alone.abs().max())
