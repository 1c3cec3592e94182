"""The language-model loss at labelled positions only, without full-vocabulary logits.

A causal LM's own `labels=` loss projects every position onto the vocabulary (262k
columns for Gemma 3) and keeps those logits for backward. `lm_loss` runs the model with
its output layer short-circuited, gathers the final hidden states where a label is set,
and computes the cross-entropy one vocabulary block at a time: a block's logits exist
only while their share of the log-sum-exp and of the input gradient is computed (the
idea of fused linear cross-entropy, with flash attention's running rescale). The
model's own output transforms are kept: the hidden state the output layer would have
seen (T5's tied-embedding scaling included), its bias, and final-logit soft-capping
(Gemma 2/3) or logit scaling (Cohere, Granite).

    loss = lm_loss(model, input_ids=ids, attention_mask=mask, labels=labels)  # = model(..., labels=labels).loss
    loss.backward()

Works for a FLixModel (inside `model.route(...)` or with `flix_features=`), a peft model
or a plain Hugging Face model, on CPU and CUDA. The output layer must be frozen.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

IGNORE = -100
CHUNK_BYTES = 1 << 26  # float32 logits of one vocabulary block for a chunk of rows (64 MiB: 4,096 rows; fewer rows run the matmul slower)
VOCAB_BLOCK = 4096  # logits columns at a time: a block stays in cache for its exp, sum and gradient (full width ran ~1.4x slower on CPU)


def lm_loss(model: nn.Module, labels: torch.Tensor, reduction: str = "mean", **inputs) -> torch.Tensor:
    """The model's cross-entropy on `labels` (Hugging Face convention: -100 is ignored;
    causal models predict labels[t + 1] at position t, seq2seq models take them as decoder
    targets). `reduction`: mean (over labelled tokens, as `model(labels=...).loss`), sum,
    or none (one value per labelled token, in row-major order)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: use mean, sum or none")
    hidden, targets = labelled_hidden(model, labels, **inputs)
    losses = linear_cross_entropy(hidden, model.get_output_embeddings(), targets, output_transform(model.config))
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / max(len(losses), 1)


def labelled_hidden(model: nn.Module, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states at the labelled positions [N, d], their target ids [N]), from one
    forward pass whose output layer computes nothing."""
    if model.config.is_encoder_decoder:
        decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        with _output_layer_inputs(model) as seen:
            model(**inputs, decoder_input_ids=decoder_ids, use_cache=False)
        keep = labels != IGNORE
        return seen[0][keep], labels[keep]
    # position t predicts token t + 1: only the positions from the first label's predecessor on
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    first = int(keep.any(0).nonzero()[0]) if keep.any() else shifted.shape[1] - 1
    window = shifted.shape[1] - first
    with _output_layer_inputs(model) as seen:
        model(**inputs, use_cache=False, logits_to_keep=window + 1)
    hidden = seen[0][:, :window]  # the last position predicts nothing
    keep = keep[:, first:]
    return hidden[keep], shifted[:, first:][keep]


@contextmanager
def _output_layer_inputs(model: nn.Module):
    """Records what the output layer is called with and hands it an empty slice instead,
    so the model's own logits (and anything it computes from them) cost nothing."""
    seen: list[torch.Tensor] = []

    def grab(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :],)

    handle = model.get_output_embeddings().register_forward_pre_hook(grab)
    try:
        yield seen
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"the output layer ran {len(seen)} times in one forward pass; lm_loss needs exactly one")


def output_transform(config) -> tuple[float, float | None]:
    """(scale, softcap): the model's logits are softcap * tanh(scale * h W^T / softcap),
    or scale * h W^T without soft-capping."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere multiplies
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, transform: tuple[float, float | None] = (1.0, None)
) -> torch.Tensor:
    """Per row: -log softmax(transform(head(hidden)))[target], never holding more than
    CHUNK_BYTES of logits. The input gradient is computed in the same pass (a second
    pass over the vocabulary would cost another matmul), so backward only scales it."""
    if head.weight.requires_grad or (getattr(head, "bias", None) is not None and head.bias.requires_grad):
        raise ValueError("lm_loss needs a frozen output layer (FLix, LoRA and peft keep it frozen); use the model's own loss to train it")
    scale, softcap = transform
    return _LinearCrossEntropy.apply(hidden, head.weight, getattr(head, "bias", None), targets, scale, softcap)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap):
        with_grad = ctx.needs_input_grad[0]
        rows = max(1, CHUNK_BYTES // (4 * VOCAB_BLOCK))
        losses = torch.empty(len(hidden), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad = torch.empty_like(hidden) if with_grad else None
        for start in range(0, len(hidden), rows):
            end = start + rows
            losses[start:end], chunk_grad = _chunk(hidden[start:end], weight, bias, targets[start:end], scale, softcap, with_grad)
            if with_grad:
                grad[start:end] = chunk_grad.to(hidden.dtype)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        grad_hidden = grad * grad_losses.unsqueeze(1).to(grad.dtype) if grad is not None else None
        return grad_hidden, None, None, None, None, None


def _chunk(h, weight, bias, y, scale, softcap, with_grad: bool):
    """(losses, d loss / d h or None) for a chunk of rows, one vocabulary block at a time.
    The log-sum-exp is online (a running maximum and sum of exps); so is the gradient's
    softmax part, sum over blocks of exp(z - max) @ W_block, rescaled whenever the maximum
    rises, then divided by the final sum. A block's weights are used for its gradient while
    still in cache, and no block's logits outlive it. Under soft-capping the softmax is
    taken through the tanh's derivative."""
    dtype = torch.promote_types(h.dtype, torch.float32)  # logits in float32 at least
    top = torch.full((len(h), 1), -torch.inf, dtype=dtype, device=h.device)
    total = torch.zeros_like(top)
    target = torch.zeros(len(h), dtype=dtype, device=h.device)
    target_slope = torch.ones(len(h), dtype=dtype, device=h.device)  # d transformed logit / d scaled logit at the target
    softmax_part = torch.zeros(len(h), weight.shape[1], dtype=dtype, device=h.device) if with_grad else None
    for first, w in _vocabulary_blocks(weight):
        z = (h @ w.T).to(dtype)
        if bias is not None:
            z += bias[first : first + len(w)].to(dtype)
        if scale != 1.0:
            z *= scale
        tanh = None
        if softcap is not None:
            tanh = torch.tanh(z / softcap)
            z = tanh * softcap
        inside = (y >= first) & (y < first + len(w))
        column = (y - first).clamp(0, len(w) - 1).unsqueeze(1)
        target += torch.where(inside, z.gather(1, column).squeeze(1), 0)
        new_top = torch.maximum(top, z.amax(dim=-1, keepdim=True))
        rescale = (top - new_top).exp()
        exps = z.sub_(new_top).exp_()
        total = total * rescale + exps.sum(dim=-1, keepdim=True)
        top = new_top
        if with_grad:
            if tanh is not None:
                target_slope = torch.where(inside, 1 - tanh.gather(1, column).squeeze(1) ** 2, target_slope)
                exps *= 1 - tanh * tanh
            softmax_part.mul_(rescale).add_(exps.to(weight.dtype) @ w)  # summed in float32 whatever the weights' dtype
    losses = (top + total.log()).squeeze(1) - target
    if not with_grad:
        return losses, None
    grad = softmax_part.div_(total).sub_(target_slope.unsqueeze(1) * weight[y].to(dtype))
    return losses, (grad * scale if scale != 1.0 else grad)


def _vocabulary_blocks(weight: torch.Tensor):
    for first in range(0, weight.shape[0], VOCAB_BLOCK):
        yield first, weight[first : first + VOCAB_BLOCK]
