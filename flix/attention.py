"""Attention over packed rows computed per example, not over the whole row.

transformers' sdpa attends over a packed row (`flix.packing`) under a block-diagonal mask:
every pair of positions in the row is computed, and a mask turns off the kernels'
causal skipping, so a row of four examples costs 8x the work the examples need. The
`segment` attention registered here runs each example's causal attention on its own
(is_causal=True, no mask). It relies on the mask the model built only after checking that
it is exactly the examples' block-diagonal causal mask (with the layer's sliding window);
anything else (a padding mask, a cache, a window shorter than an example, attention
weights asked for) goes to transformers' sdpa unchanged.

    use_segment_attention(model)  # after flix.packing.packs_exactly(model); a Hugging Face model or a FLixModel's base
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

NAME = "flix_segments"


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, position_ids=None, **kwargs):
    """transformers' attention-function signature; query (rows, heads, length, dim), key and
    value (rows, kv_heads, length, dim); returns ((rows, length, heads, dim), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = _example_lengths(query, key, attention_mask, position_ids, sliding_window, module, kwargs)
    if lengths is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            position_ids=position_ids,
            **kwargs,
        )
    rows, heads, length, dim = query.shape
    # one sequence axis over all rows, split into examples (split's backward is one cat)
    q, k, v = (t.transpose(0, 1).reshape(t.shape[1], rows * length, t.shape[3]) for t in (query, key, value))
    if query.device.type == "cpu" and not dropout:
        outs = _causal_by_matmuls(q, k, v, lengths, dim**-0.5 if scaling is None else scaling)
    else:
        gqa = heads != key.shape[1]
        outs = [
            F.scaled_dot_product_attention(qe[None], ke[None], ve[None], dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)[0]
            for qe, ke, ve in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))
        ]
    return torch.cat(outs, 1).view(heads, rows, length, -1).permute(1, 2, 0, 3), None


def _causal_by_matmuls(q, k, v, lengths: list[int], scaling: float) -> list[torch.Tensor]:
    """Each example's causal attention as two matmuls, the query heads that share a key
    head stacked into one product's rows: q (heads, positions, dim), k and v (kv_heads,
    positions, dim). On CPU, at a few hundred positions an example, this runs 1.2-1.5x
    faster forward and backward than sdpa's flash kernel (reports/bench/lean-step, fourth round)."""
    heads, kv_heads, dim = q.shape[0], k.shape[0], q.shape[2]
    group = heads // kv_heads
    future = torch.ones(max(lengths), max(lengths), dtype=torch.bool, device=q.device).triu(1)
    outs = []
    for qe, ke, ve in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1)):
        n = qe.shape[1]
        scores = torch.bmm(qe.reshape(kv_heads, group * n, dim), ke.transpose(1, 2)).view(kv_heads, group, n, n)
        weights = (scores * scaling).masked_fill_(future[:n, :n], float("-inf")).softmax(-1)
        outs.append(torch.bmm(weights.view(kv_heads, group * n, n), ve).view(heads, n, -1))
    return outs


def _example_lengths(query, key, mask, position_ids, window, module, kwargs) -> list[int] | None:
    """The lengths of the examples packed in the rows, in row-major order, where the
    segment attention computes exactly what sdpa would with this mask; None otherwise."""
    if position_ids is None or mask is None or mask.dtype != torch.bool or mask.dim() != 4 or not getattr(module, "is_causal", True):
        return None
    if any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "cache")) or kwargs.get("output_attentions"):
        return None
    rows, _, length, _ = query.shape
    if key.shape[2] != length or length < 2 or mask.shape[-2:] != (length, length):
        return None
    # every layer of a type shares one mask a forward pass: checked once (a check is about 7 ms on cpu NER rows)
    seen = getattr(mask, "_flix_examples", None)
    if seen is not None and seen[0] is position_ids and seen[1] == window:
        return seen[2]
    lengths = _check(mask, position_ids, window, rows, length)
    mask._flix_examples = (position_ids, window, lengths)
    return lengths


def _check(mask, position_ids, window, rows: int, length: int) -> list[int] | None:
    positions = position_ids.expand(rows, length)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    example = starts.reshape(-1).cumsum(0).view(rows, length)
    at = torch.arange(length, device=positions.device)
    expected = (example[:, :, None] == example[:, None, :]) & (at[None, :, None] >= at[None, None, :])
    if window is not None:
        expected &= at[None, :, None] - at[None, None, :] < window
    if not torch.equal(mask.expand(rows, 1, length, length)[:, 0], expected):
        return None
    lengths = torch.bincount(example.reshape(-1) - 1)
    if window is not None and int(lengths.max()) > window:  # a window inside an example: sdpa's mask it is
        return None
    return lengths.tolist()


def use_segment_attention(model) -> bool:
    """Switch a model that attends with transformers' sdpa (a Hugging Face model, or a
    FLixModel or peft model around one) to the segment attention; True if it did. Masks
    are built as for sdpa, so every call the segment attention does not take runs exactly
    as with attn_implementation="sdpa". Other implementations (eager, flash) are kept."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None or hf.config._attn_implementation not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    hf.set_attn_implementation(NAME)
    return True
