"""Examples -> model tensors, for training (loss on target tokens) and generation.

Causal models see `prompt + target + eos`, left-padded so that every target ends at
the last position; the loss covers target tokens only, and the output layer runs only at
the positions that predict one (`flix.loss.lm_loss`).
Seq2seq models take the prompt as encoder input and the target as labels.
A step's micro-batches hold its examples sorted by length (`micro_batches`), so each
pads to examples of about its own length, `size` rows or a token budget each; causal
models can instead pack several examples in a row, with no padding between them
(`step_batches`, `flix.packing`). `target_nll` scores gold targets per example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flix.data import Example
from flix.data.formatting import format_prompt
from flix.loss import IGNORE, lm_loss
from flix.packing import pack, packed_inputs, packs_exactly, split_by_budget


@dataclass
class TextLimits:
    """Token budgets: prompts keep their last tokens (the answer cue), targets their first."""

    max_prompt_tokens: int = 256
    max_target_tokens: int = 64
    max_context_chars: int | None = 2000


def prompts(examples: list[Example], limits: TextLimits, train: bool) -> list[str]:
    return [format_prompt(ex, max_context_chars=limits.max_context_chars, train=train) for ex in examples]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def _sources(examples: list[Example], tokenizer, limits: TextLimits, train: bool, seq2seq: bool) -> list[list[int]]:
    """Prompt tokens, cut to the budget; causal models get BOS (Gemma needs it)."""
    rows = _encode(tokenizer, prompts(examples, limits, train))
    bos = [] if seq2seq or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    keep = limits.max_prompt_tokens - len(bos)
    return [bos + ids[-keep:] for ids in rows]


def _right_pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as generate() computes them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _targets(examples: list[Example], tokenizer, limits: TextLimits) -> list[list[int]]:
    """Target tokens, cut to the budget, then EOS (the model must learn to stop)."""
    # A leading space keeps SentencePiece from merging the target into the prompt's last token.
    return [ids[: limits.max_target_tokens] + [tokenizer.eos_token_id] for ids in _encode(tokenizer, [" " + ex.target for ex in examples])]


def micro_batches(examples: list[Example], size: int, tokenizer, limits: TextLimits, seq2seq: bool) -> list[list[Example]]:
    """A step's examples in micro-batches of `size`, sorted by length (prompt and target
    tokens, longest first): each micro-batch pads to its own longest example rather than
    the step's. The step trains on the same examples whatever the order."""
    return [[examples[i] for i in part] for part in micro_batch_positions(examples, size, tokenizer, limits, seq2seq)]


def micro_batch_positions(
    examples: list[Example], size: int, tokenizer, limits: TextLimits, seq2seq: bool, tokens: int | None = None
) -> list[list[int]]:
    """`micro_batches` as positions in `examples`. With `tokens`, micro-batches by a token
    budget instead of `size` rows: consecutive runs of the sorted examples, each computing
    at most `tokens` positions (rows x the widest; seq2seq: x its widest prompt + target),
    with the fewest positions in all (flix.packing.split_by_budget)."""
    sources = _sources(examples, tokenizer, limits, train=True, seq2seq=seq2seq)
    targets = _targets(examples, tokenizer, limits)
    lengths = [len(s) + (0 if seq2seq else len(t)) for s, t in zip(sources, targets)]
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])  # stable: ties keep the sampler's order
    if tokens is None:
        return [order[i : i + size] for i in range(0, len(order), size)]
    decoder = [len(targets[i]) if seq2seq else 0 for i in order]

    def cost(i: int, j: int) -> int:
        return (j - i) * (lengths[order[i]] + max(decoder[i:j]))

    return [order[i:j] for i, j in split_by_budget(len(order), cost, tokens)]


def packed_micro_batches(examples: list[Example], tokenizer, limits: TextLimits, tokens: int, train: bool = True) -> list[tuple[list[int], dict]]:
    """A causal step's examples packed (flix.packing.pack): micro-batches of rows holding
    several examples each, at most `tokens` positions a micro-batch, as (positions in
    `examples` in the rows' order, tensors: input_ids, position_ids, labels, token_examples
    indexing those positions, num_targets). No attention mask: the position ids separate
    the examples. `train=False`: prompts as evaluation formats them (`training_batch`)."""
    sources, targets = _sources(examples, tokenizer, limits, train=train, seq2seq=False), _targets(examples, tokenizer, limits)
    sequences = [s + t for s, t in zip(sources, targets)]
    labels = [[IGNORE] * len(s) + t for s, t in zip(sources, targets)]
    out = []
    for rows in pack([len(q) for q in sequences], tokens):
        positions = [i for row in rows for i in row]
        local = {i: k for k, i in enumerate(positions)}
        batch = packed_inputs(
            [sequences[i] for i in positions], [labels[i] for i in positions], [[local[i] for i in row] for row in rows], tokenizer.pad_token_id
        )
        out.append((positions, {**batch, "num_targets": int((batch["labels"] != IGNORE).sum())}))
    return out


def step_batches(
    examples: list[Example],
    tokenizer,
    limits: TextLimits,
    seq2seq: bool,
    size: int,
    tokens: int | None = None,
    packed: bool = False,
    sort: bool = True,
    train: bool = True,
) -> list[tuple[list[int], dict]]:
    """A step's micro-batches as Trainer.train_step computes them, each as (its examples'
    positions in `examples`, its tensors): packed (causal models where flix.packing holds
    exactly; `tokens` defaults to `size` rows of the longest possible example), else
    length-sorted with `size` rows or a `tokens` budget each, or (sort=False) `size` rows
    in the sampler's order. `train=False`: prompts formatted for evaluation (target NLL)."""
    if packed:
        budget = tokens or size * (limits.max_prompt_tokens + limits.max_target_tokens + 1)
        return packed_micro_batches(examples, tokenizer, limits, budget, train=train)
    if sort:
        parts = micro_batch_positions(examples, size, tokenizer, limits, seq2seq, tokens)
    else:
        parts = [list(range(i, min(i + size, len(examples)))) for i in range(0, len(examples), size)]
    return [(part, training_batch([examples[i] for i in part], tokenizer, limits, seq2seq, train=train)) for part in parts]


def packing_holds(model, seq2seq: bool) -> bool:
    """For scale.packing: whether this model computes packed rows exactly
    (flix.packing.packs_exactly); where not, says so: the run's micro-batches are then
    length-sorted, by the token budget when one is set."""
    from flix.pipeline.tracking import say

    why = "a seq2seq model" if seq2seq else None if packs_exactly(model) else "its attention crosses packed examples (flix.packing.packs_exactly)"
    if why:
        say(f"[flix] scale.packing=true but not packing: {why}; padded micro-batches of length-sorted examples instead")
    return why is None


def real_positions(batch: dict) -> int:
    """Input positions of a batch that hold a token of an example (packed or padded)."""
    return int((batch["token_examples"] >= 0).sum()) if "token_examples" in batch else int(batch["attention_mask"].sum())


def padding_fraction(batches: list[dict]) -> float:
    """Share of the input positions of these batches that are padding."""
    total = sum(b["input_ids"].numel() for b in batches)
    return 1.0 - sum(real_positions(b) for b in batches) / total if total else 0.0


def training_batch(examples: list[Example], tokenizer, limits: TextLimits, seq2seq: bool, train: bool = True) -> dict:
    """Tensors for one teacher-forced micro-batch, labels in Hugging Face's convention
    (causal: aligned with input_ids, IGNORE outside the targets); `num_targets` counts the
    target tokens. `train=False` formats prompts as evaluation does (QA contexts never
    centred on the answer)."""
    source = _sources(examples, tokenizer, limits, train=train, seq2seq=seq2seq)
    target = _targets(examples, tokenizer, limits)
    if seq2seq:
        input_ids, attention_mask = _left_pad(source, tokenizer.pad_token_id)
        labels = _right_pad(target, IGNORE)
    else:
        input_ids, attention_mask = _left_pad([s + t for s, t in zip(source, target)], tokenizer.pad_token_id)
        labels = torch.full_like(input_ids, IGNORE)
        for i, t in enumerate(target):
            labels[i, labels.shape[1] - len(t) :] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_targets": int((labels != IGNORE).sum())}


def _token_losses(model, batch: dict, seq2seq: bool) -> torch.Tensor:
    """Each target token's cross-entropy (`flix.loss.lm_loss`: the output layer at target
    positions only), row-major."""
    if "attention_mask" not in batch:  # packed rows (flix.packing): the position ids separate the examples
        return lm_loss(model, batch["labels"], reduction="none", input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not seq2seq:
        inputs["position_ids"] = position_ids(batch["attention_mask"])
    return lm_loss(model, batch["labels"], reduction="none", **inputs)


def loss_sum(model, batch: dict, seq2seq: bool) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens."""
    return _token_losses(model, batch, seq2seq).sum()


@torch.no_grad()
def target_nll(model, batch: dict, seq2seq: bool) -> list[float]:
    """Per example (padded: per row; packed: per index of `token_examples`): the gold
    target's teacher-forced negative log-likelihood, in mean nats per target token (EOS
    included). One forward pass, no generation."""
    losses = _token_losses(model, batch, seq2seq)
    labelled = batch["labels"] != IGNORE
    if "token_examples" in batch:  # packed rows: each target's example, in the losses' row-major order
        owners = batch["token_examples"].to(labelled.device)[labelled]
        count = int(batch["token_examples"].max()) + 1
        sums = torch.zeros(count, dtype=torch.float32, device=losses.device).index_add_(0, owners, losses.float())
        return (sums / torch.bincount(owners, minlength=count).clamp(min=1)).tolist()
    return [float(part.mean()) if len(part) else 0.0 for part in losses.split(labelled.sum(1).tolist())]


def prompt_tokens(examples: list[Example], tokenizer, limits: TextLimits, seq2seq: bool) -> list[list[int]]:
    """Each example's prompt as generation sees it (evaluation formatting, cut to the budget)."""
    return _sources(examples, tokenizer, limits, train=False, seq2seq=seq2seq)


def generation_batch(examples: list[Example], tokenizer, limits: TextLimits, seq2seq: bool) -> dict:
    source = prompt_tokens(examples, tokenizer, limits, seq2seq)
    input_ids, attention_mask = _left_pad(source, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
