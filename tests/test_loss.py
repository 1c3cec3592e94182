"""flix.loss.lm_loss equals the model's own `labels=` loss and its gradients (causal and
seq2seq, soft-capped logits, chunks smaller than the batch, FLix routing, Gemma 3 270M),
without ever computing logits at unlabelled positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flix import FLixConfig, get_flix_model, lm_loss
from flix import loss as loss_module
from flix.base_models import load_model
from flix.loss import IGNORE, linear_cross_entropy

FEATURES = {"task": ["ner", "qa"], "lang": ["sw", "yo"]}
ROUTES = [{"task": "ner", "lang": "sw"}, {"task": "qa", "lang": "yo"}, {"task": "ner", "lang": "yo"}]


def _batch(vocab: int, seq2seq: bool, rows: int = 3, width: int = 14, seed: int = 0) -> dict:
    """Left-padded causal rows with labels on their last tokens (or seq2seq targets), lengths differing."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    if seq2seq:
        labels = torch.randint(3, vocab, (rows, 6), generator=gen)
        labels[0, 4:] = IGNORE
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    labels = torch.full_like(ids, IGNORE)
    labels[0, -4:], labels[1, -6:], labels[2, -2:] = ids[0, -4:], ids[1, -6:], ids[2, -2:]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def _flix(name: str, seed: int = 0):
    base, _ = load_model({"name": name})
    model = get_flix_model(base, FLixConfig(features=FEATURES, ranks={"task": 2, "lang": 2}, feature_dropout=0.0))
    with torch.no_grad():  # B starts at zero: make the adapters matter
        gen = torch.Generator().manual_seed(seed)
        for key, bank in model.banks().items():
            if key.endswith("flix_B"):
                bank[1:] = torch.randn(bank[1:].shape, generator=gen) * 0.05
    return model


def _full_logits_loss(model, batch: dict) -> torch.Tensor:
    """Today's way: every position's logits, then cross-entropy over the labelled ones, in the
    model's dtype (transformers' own `.loss` casts logits to float32 even in a float64 model)."""
    logits = model(**batch).logits
    labels = batch["labels"] if model.config.is_encoder_decoder else F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def _compare(model, batch: dict, tolerance: float = 1e-5) -> None:
    """lm_loss and the full-logits loss: values and every bank gradient, relative to the
    gradient's largest entry (float sums run in another order). In eval mode: T5's dropout
    would draw differently in the two passes."""
    model.eval()
    banks = model.banks()
    grads = []
    for loss_fn in (lambda: lm_loss(model, **batch), lambda: _full_logits_loss(model, batch)):
        model.zero_grad(set_to_none=True)
        with model.route(ROUTES):
            loss = loss_fn()
            loss.backward()
        grads.append((loss.detach(), {k: p.grad.clone() for k, p in banks.items()}))
    (ours, ours_grads), (theirs, their_grads) = grads
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=0)
    for key, grad in their_grads.items():
        assert (ours_grads[key] - grad).abs().max() <= tolerance * grad.abs().max(), key
    assert any(g.abs().sum() > 0 for g in ours_grads.values())


@pytest.mark.parametrize("name", ["tiny", "tiny_seq2seq", "tiny_gpt2"])
def test_lm_loss_equals_the_models_own_loss_and_gradients(name):
    model = _flix(name)
    _compare(model, _batch(model.config.vocab_size, model.config.is_encoder_decoder))


def test_soft_capped_logits_and_chunks_smaller_than_the_batch(monkeypatch):
    model = _flix("tiny")
    model.config.final_logit_softcapping = 2.0  # Gemma 2/3's tanh cap, tight enough to bite
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 100 * 3)  # 3 rows a chunk of 100-column blocks, 12 labels
    monkeypatch.setattr(loss_module, "VOCAB_BLOCK", 100)  # vocabulary blocks of 100, 100, 100 and 84 columns
    _compare(model, _batch(model.config.vocab_size, seq2seq=False))


def test_no_logits_at_unlabelled_positions():
    """The output layer sees one row per labelled token and the model's own projection none."""
    model = _flix("tiny")
    batch = _batch(model.config.vocab_size, seq2seq=False)
    shapes = []
    head = model.get_output_embeddings()
    original = head.forward
    head.forward = lambda x: shapes.append(tuple(x.shape)) or original(x)
    with model.route(ROUTES):
        per_token = lm_loss(model, reduction="none", **batch)
    assert len(per_token) == int((batch["labels"][:, 1:] != IGNORE).sum()) == 12
    assert shapes and all(s[-2] == 0 for s in shapes)  # the model's own logits: an empty slice


def test_reduction_none_is_each_tokens_cross_entropy():
    model = _flix("tiny")
    model.eval()
    batch = _batch(model.config.vocab_size, seq2seq=False)
    with torch.no_grad(), model.route(ROUTES):
        per_token = lm_loss(model, reduction="none", **batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    shifted = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits[:, :-1][shifted != IGNORE], shifted[shifted != IGNORE], reduction="none")
    torch.testing.assert_close(per_token, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), model.route(ROUTES):
        assert lm_loss(model, reduction="sum", **batch).item() == pytest.approx(expected.sum().item(), rel=1e-5)


@pytest.mark.parametrize("block", [4096, 10])
def test_linear_cross_entropy_with_bias_and_scale_equals_torch(block, monkeypatch):
    """One vocabulary block, and ten (the last of 7 columns): the online log-sum-exp is exact."""
    monkeypatch.setattr(loss_module, "VOCAB_BLOCK", block)
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 97).requires_grad_(False)
    hidden = torch.randn(40, 16, generator=gen, requires_grad=True)
    targets = torch.randint(97, (40,), generator=gen)
    ours = linear_cross_entropy(hidden, head, targets, (0.5, 3.0))
    ours.backward(torch.linspace(0.1, 1.0, 40))
    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = 3.0 * torch.tanh(0.5 * head(ref_hidden) / 3.0)
    ref = F.cross_entropy(logits, targets, reduction="none")
    ref.backward(torch.linspace(0.1, 1.0, 40))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-7)


def test_a_trainable_output_layer_is_refused():
    head = torch.nn.Linear(8, 11)
    with pytest.raises(ValueError, match="frozen output layer"):
        linear_cross_entropy(torch.randn(2, 8), head, torch.tensor([1, 2]))


@pytest.mark.slow
def test_gemma3_270m_lm_loss_equals_the_full_logits_loss(gemma):
    """In float64, so that the comparison is of the arithmetic, not of float32 rounding
    (which moves 262k-way softmax gradients by ~1e-4 of their largest entry at a loss of 25)."""
    model = _flix("gemma3_270m").double()
    _compare(model, _batch(model.config.vocab_size, seq2seq=False, width=24), tolerance=1e-9)
