"""Examples -> model tensors, for training (loss on target tokens) and generation.

Causal models see `prompt + target + eos`, left-padded so that every target ends at
the last position; the loss covers target tokens only, and logits are computed only
for the last `target_len + 1` positions (most of a step's vocabulary projection).
Seq2seq models take the prompt as encoder input and the target as labels.
A step's micro-batches hold its examples sorted by length (`micro_batches`), so each
pads to examples of about its own length; `target_nll` scores gold targets per example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flix.data import Example
from flix.data.formatting import format_prompt

IGNORE = -100


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
    sources = _sources(examples, tokenizer, limits, train=True, seq2seq=seq2seq)
    targets = _targets(examples, tokenizer, limits)
    lengths = [len(s) + (0 if seq2seq else len(t)) for s, t in zip(sources, targets)]
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])  # stable: ties keep the sampler's order
    ordered = [examples[i] for i in order]
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def padding_fraction(batches: list[dict]) -> float:
    """Share of the input positions of these batches that are padding."""
    total = sum(b["attention_mask"].numel() for b in batches)
    return 1.0 - sum(int(b["attention_mask"].sum()) for b in batches) / total if total else 0.0


def training_batch(examples: list[Example], tokenizer, limits: TextLimits, seq2seq: bool, train: bool = True) -> dict:
    """Tensors for one teacher-forced micro-batch; `num_targets` counts the target tokens.
    `train=False` formats prompts as evaluation does (QA contexts never centred on the answer)."""
    source = _sources(examples, tokenizer, limits, train=train, seq2seq=seq2seq)
    target = _targets(examples, tokenizer, limits)
    if seq2seq:
        input_ids, attention_mask = _left_pad(source, tokenizer.pad_token_id)
        labels = _right_pad(target, IGNORE)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_targets": int((labels != IGNORE).sum())}
    input_ids, attention_mask = _left_pad([s + t for s, t in zip(source, target)], tokenizer.pad_token_id)
    target_len = max(len(t) for t in target)
    labels = torch.full((len(examples), target_len), IGNORE, dtype=torch.long)
    for i, t in enumerate(target):
        labels[i, target_len - len(t) :] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_targets": int((labels != IGNORE).sum())}


def _logits_and_labels(model, batch: dict, seq2seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the target positions and the labels they predict (IGNORE elsewhere)."""
    labels = batch["labels"]
    if seq2seq:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    else:
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids(batch["attention_mask"]),
            logits_to_keep=labels.shape[1] + 1,
        ).logits
        # position t predicts token t + 1: the last kept position predicts nothing
        labels = F.pad(labels, (0, 1), value=IGNORE)
    return logits, labels


def loss_sum(model, batch: dict, seq2seq: bool) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens."""
    logits, labels = _logits_and_labels(model, batch, seq2seq)
    return cross_entropy_sum(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@torch.no_grad()
def target_nll(model, batch: dict, seq2seq: bool) -> list[float]:
    """Per example: the gold target's teacher-forced negative log-likelihood, in mean nats
    per target token (EOS included). One forward pass, no generation."""
    logits, labels = _logits_and_labels(model, batch, seq2seq)
    keep = labels != IGNORE
    token_nll = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    for row in range(len(labels)):  # one example's float32 logits at a time: the vocabulary is large
        lse = torch.logsumexp(logits[row].float(), dim=-1)
        token_nll[row] = lse - logits[row].float().gather(1, labels[row].clamp(min=0).unsqueeze(1)).squeeze(1)
    per_example = (token_nll * keep).sum(1) / keep.sum(1).clamp(min=1)
    return per_example.tolist()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum"),
    in the memory of the logits alone (see `_CrossEntropySum`)."""
    return _CrossEntropySum.apply(logits, labels)


class _CrossEntropySum(torch.autograd.Function):
    """Cross-entropy whose backward turns the saved float32 logits into their own
    gradient in place. The logits over a 262k vocabulary are the largest tensors of a
    step (1 GiB for 16 x 65 positions): torch's cross-entropy keeps its log-softmax
    beside them and allocates a third copy for the gradient."""

    CHUNK = 64  # rows per pass: bounds the temporaries to CHUNK x vocabulary

    @staticmethod
    def forward(ctx, logits, labels):
        logits = logits.float()
        keep = labels != IGNORE
        safe = labels.clamp(min=0).unsqueeze(1)
        lse = torch.cat([torch.logsumexp(part, dim=-1) for part in logits.split(_CrossEntropySum.CHUNK)])
        loss = ((lse - logits.gather(1, safe).squeeze(1)) * keep).sum()
        ctx.save_for_backward(logits, lse, safe, keep)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, safe, keep = ctx.saved_tensors
        scale = (keep * grad_loss).unsqueeze(1)
        for rows in torch.arange(len(logits)).split(_CrossEntropySum.CHUNK):
            part = logits[rows[0] : rows[-1] + 1]
            part.sub_(lse[rows, None]).exp_()  # softmax
            part.scatter_add_(1, safe[rows], torch.full_like(safe[rows], -1, dtype=part.dtype))
            part.mul_(scale[rows])
        return logits, None


def generation_batch(examples: list[Example], tokenizer, limits: TextLimits, seq2seq: bool) -> dict:
    source = _sources(examples, tokenizer, limits, train=False, seq2seq=seq2seq)
    input_ids, attention_mask = _left_pad(source, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
