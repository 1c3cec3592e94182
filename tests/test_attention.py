"""The segment attention (flix.attention): each packed example's causal attention on its
own gives the logits, loss and gradients of transformers' sdpa over the whole row, takes
only the calls it can compute exactly, and leaves every other call to sdpa."""

from __future__ import annotations

import pytest
import torch
from test_packing import flix_model, grads, one_thread, sequences, windowed_gemma  # noqa: F401 (one_thread: autouse fixture)

from flix import attention, lm_loss
from flix.attention import NAME, use_segment_attention
from flix.packing import packed_inputs


@pytest.fixture
def sdpa_lengths(monkeypatch):
    """The query lengths of every attention computed: each scaled_dot_product_attention
    call's (sdpa's over whole rows) and each example's of the segment attention."""
    seen: list[int] = []
    original, by_matmuls = torch.nn.functional.scaled_dot_product_attention, attention._causal_by_matmuls

    def spy(query, *args, **kwargs):
        seen.append(query.shape[-2])
        return original(query, *args, **kwargs)

    def spy_examples(q, k, v, lengths, scaling):
        seen.extend(lengths)
        return by_matmuls(q, k, v, lengths, scaling)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(attention, "_causal_by_matmuls", spy_examples)
    return seen


def gemma(window: int):
    """windowed_gemma with sliding window `window` (4: shorter than the examples)."""
    model = windowed_gemma()
    model.config.sliding_window = window
    for layer in model.model.layers:
        layer.self_attn.sliding_window = window if layer.self_attn.is_sliding else None
    return model


def packed_batch():
    seqs, labels = sequences([9, 14, 5, 12])
    return packed_inputs(seqs, labels, [[0, 1], [2, 3]], pad_id=0)  # rows of 23, and 17 + 6 padding


@pytest.mark.parametrize("window", [4, 64])
def test_segments_equal_sdpa_over_packed_rows(window, sdpa_lengths):
    """Logits, loss and the blocks' gradients equal sdpa's to 1e-5 relative; with a window
    of 4 the sliding layers stay on sdpa (an example is longer than the window) and the
    full-attention layer runs per example."""
    model = gemma(window)
    model.model.layers.requires_grad_(True)
    batch = packed_batch()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}

    def run():
        logits = model(**inputs, use_cache=False).logits
        lm_loss(model, batch["labels"], **inputs).backward()
        return logits.detach(), grads(model)

    expected_logits, expected = run()
    assert set(sdpa_lengths) == {23}  # whole rows
    sdpa_lengths.clear()
    assert use_segment_attention(model) and model.config._attn_implementation == NAME
    logits, got = run()
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for name, value in expected.items():
        assert (got[name] - value).norm() <= 1e-5 * value.norm() + 1e-12, name
    examples = {9, 14, 5, 12, 6}  # the padding is a sequence of its own
    assert examples <= set(sdpa_lengths) and (23 in sdpa_lengths) == (window == 4)


def test_flix_packed_step_with_segments_equals_sdpa():
    """A FLix model (features routed per token, dropout off) gets the same loss and bank gradients."""
    model = flix_model(gemma(64), dropout=0.0)
    seqs, labels = sequences([9, 14, 5, 12, 7, 10], seed=3)
    batch = packed_inputs(seqs, labels, [[0, 1, 4], [2, 3, 5]], pad_id=0)
    features = [{"task": "ner", "lang": lang} for lang in ["sw", "yo", "ha", "am", "bn", "sw"]]

    def run():
        with model.route(features, token_examples=batch["token_examples"]):
            loss = lm_loss(model, batch["labels"], input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        loss.backward()
        return loss.item(), grads(model)

    loss, expected = run()
    assert use_segment_attention(model)
    got_loss, got = run()
    assert got_loss == pytest.approx(loss, rel=1e-5)
    for name, value in expected.items():
        assert (got[name] - value).norm() <= 1e-5 * value.norm() + 1e-12, name


def test_padded_rows_and_generation_stay_on_sdpa(sdpa_lengths):
    """A padding mask and decoding with a cache are not packed rows: the same outputs as
    sdpa, from sdpa's own calls."""
    model = gemma(64)
    seqs, _ = sequences([9, 14])
    ids = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, 14 - len(s) :], mask[i, 14 - len(s) :] = torch.tensor(s), 1
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected_logits, expected = model(input_ids=ids, attention_mask=mask).logits, model.generate(**kwargs)
        use_segment_attention(model)
        sdpa_lengths.clear()
        logits, got = model(input_ids=ids, attention_mask=mask).logits, model.generate(**kwargs)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, expected)
    assert 14 in sdpa_lengths and 9 not in sdpa_lengths  # whole rows, never the shorter example alone


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_causal_attention_by_matmuls_equals_sdpa_per_example(kv_heads):
    """Outputs and the gradients of q, k and v equal sdpa's causal attention, example by
    example, with 4 query heads over 1, 2 or 4 key heads (a query head h reads key head
    h // (4 // kv_heads), as transformers repeats them)."""
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 7, 30, 12]
    q = torch.randn(4, sum(lengths), 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(kv_heads, sum(lengths), 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    upstream = torch.randn(4, sum(lengths), 16, generator=gen, dtype=torch.float64)
    ours = torch.cat(attention._causal_by_matmuls(q, k, v, lengths, 0.3), 1)
    theirs = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(qe[None], ke[None], ve[None], is_causal=True, scale=0.3, enable_gqa=kv_heads < 4)[0]
            for qe, ke, ve in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))
        ],
        1,
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    ours_grads = torch.autograd.grad(ours, (q, k, v), upstream)
    for got, expected in zip(ours_grads, torch.autograd.grad(theirs, (q, k, v), upstream)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_only_sdpa_models_switch():
    from flix.base_models import load_model

    eager = load_model({"name": "tiny"})[0]
    eager.set_attn_implementation("eager")
    assert not use_segment_attention(eager) and eager.config._attn_implementation == "eager"
