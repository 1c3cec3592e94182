"""Packing and token-budget micro-batches (flix.packing, flix.pipeline.batching): packed
rows compute what separate rows compute (sliding-window attention included), FLix routes
each token by its own example's features (dropout masks kept), and a step's loss and
gradients do not depend on how its examples are split or packed."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from flix import FLixConfig, get_flix_model, lm_loss
from flix.base_models import load_model
from flix.data.reader import read_dataset
from flix.features import dropout_key
from flix.loss import IGNORE
from flix.packing import first_fit_decreasing, pack, packed_inputs, packs_exactly, sequence_index, split_by_budget
from flix.pipeline.batching import TextLimits, loss_sum, padding_fraction, position_ids, step_batches

LIMITS = TextLimits(max_prompt_tokens=320, max_target_tokens=12, max_context_chars=120)  # byte tokens: 220-333 a sequence
FEATURES = {"task": ["ner", "qa_in_lang"], "lang": ["sw", "yo", "ha", "am", "bn"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on a loaded 2-core machine two OpenMP threads made these tiny models 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def windowed_gemma(seed: int = 0) -> Gemma3ForCausalLM:
    """A tiny Gemma 3 whose sliding window (4) is shorter than its rows, with soft-capping."""
    config = Gemma3TextConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        intermediate_size=128, max_position_embeddings=512, sliding_window=4, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], vocab_size=384, pad_token_id=0, eos_token_id=1,
        bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).eval().requires_grad_(False)


def sequences(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(2, 384, (n,), generator=gen).tolist() for n in lengths]
    return seqs, [[IGNORE] * (len(s) // 2) + s[len(s) // 2 :] for s in seqs]  # the second half labelled


def left_padded(seqs, labels):
    width = max(map(len, seqs))
    ids, mask, lab = torch.zeros(len(seqs), width, dtype=torch.long), torch.zeros(len(seqs), width, dtype=torch.long), None
    lab = torch.full_like(ids, IGNORE)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, width - len(s) :], mask[i, width - len(s) :], lab[i, width - len(s) :] = torch.tensor(s), 1, torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}, lab


def test_packed_rows_equal_separate_rows_with_sliding_window_layers():
    model = windowed_gemma()
    seqs, labels = sequences([9, 14, 5, 12])
    padded, padded_labels = left_padded(seqs, labels)
    packed = packed_inputs(seqs, labels, [[0, 1], [2, 3]], pad_id=0)  # rows of 23 and 17 (+ 6 padding) tokens
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs]
        got = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits.flatten(0, 1)
        ref = model(**padded).logits
        # the trap: with a cache (use_cache defaults to on) transformers does not look for packed rows
        trap = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits.flatten(0, 1)
    where = packed["token_examples"].flatten()
    for i, s in enumerate(seqs):
        torch.testing.assert_close(got[where == i], alone[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref[i, -len(s) :], alone[i], rtol=1e-5, atol=1e-5)
    assert max((trap[where == i] - alone[i]).abs().max() for i in range(len(seqs))) > 0.05
    with torch.no_grad():
        packed_loss = lm_loss(model, packed["labels"], input_ids=packed["input_ids"], position_ids=packed["position_ids"])
        padded_loss = lm_loss(model, padded_labels, **padded)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert packs_exactly(model)


def test_packs_exactly_only_where_the_masks_read_packed_positions():
    from transformers import BloomConfig, BloomForCausalLM, OPTConfig, OPTForCausalLM

    assert packs_exactly(load_model({"name": "tiny"})[0]) and packs_exactly(load_model({"name": "tiny_gpt2"})[0])
    torch.manual_seed(0)
    assert not packs_exactly(BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=2, vocab_size=384)))  # ALiBi over the row
    opt = OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, vocab_size=384, word_embed_proj_dim=32)
    assert not packs_exactly(OPTForCausalLM(opt))
    assert not packs_exactly(load_model({"name": "tiny_seq2seq"})[0])


def flix_model(base, dropout=0.7, sparse=False):
    model = get_flix_model(base, FLixConfig(features=FEATURES, ranks={"task": 4, "lang": 2}, feature_dropout=dropout, sparse_grad=sparse))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.flix_layers().values():  # B = 0 would route nothing
            layer.flix_B.copy_(torch.randn(layer.flix_B.shape, generator=gen) * 0.05)
            layer.flix_B[0].zero_()
    return model.train()


def grads(model) -> dict[str, torch.Tensor]:
    out = {k: p.grad.to_dense().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# Gemma 3 270M's 18 layers in float32: packed and padded rows are GEMMs of other shapes,
# summed in another order. Bank gradients differ by up to 1.0e-5 relative on the AMD EPYC
# host and 1.07e-5-1.25e-5 on the Intel AVX-512 one (2026-12-07); a routing or masking bug
# moves them by 1e-2 and more. That they compute the same thing is checked in float64 on
# the tiny models (test_attention.py, to 1e-10).
GEMMA_REL = 3e-5


def assert_same_grads(got: dict, expected: dict, rel: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert (got[name] - value).norm() <= rel * value.norm() + 1e-12, name


def test_flix_routes_each_token_by_its_examples_features():
    """Different feature combinations and dropout masks in one packed row: the loss and every
    bank gradient equal those of padded rows, to 1e-5 relative."""
    model = flix_model(windowed_gemma())
    seqs, labels = sequences([9, 14, 5, 12, 7, 10], seed=3)
    features = [
        {"task": t, "lang": lang}
        for t, lang in [("ner", "sw"), ("qa_in_lang", "yo"), ("ner", "ha"), ("qa_in_lang", "sw"), ("ner", "yo"), ("x", "ha")]
    ]
    keys = [dropout_key(0, 5, i) for i in range(len(seqs))]
    padded, padded_labels = left_padded(seqs, labels)
    with model.route(features, dropout_keys=keys):
        rows = model.router.rows.clone()
        expected = lm_loss(model, padded_labels, reduction="sum", **padded)
        expected.backward()
    expected_grads = grads(model)
    layout = [[0, 1, 2], [3, 4, 5]]
    packed = packed_inputs(seqs, labels, layout, pad_id=0)
    with model.route(features, dropout_keys=keys, token_examples=packed["token_examples"]):
        assert torch.equal(model.router.rows, rows)  # each example keeps its own mask
        got = lm_loss(model, packed["labels"], reduction="sum", input_ids=packed["input_ids"], position_ids=packed["position_ids"])
        got.backward()
    assert len({tuple(r) for r in rows.tolist()}) > 3  # several combinations (some dropped) share the rows
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_grads(grads(model), expected_grads)


@pytest.fixture(scope="module")
def examples(data_root):
    """Real examples of two tasks and three languages, of many lengths."""
    pairs = [("ner", "sw"), ("ner", "am"), ("qa_in_lang", "sw"), ("qa_in_lang", "bn")]
    found = [ex for task, lang in pairs for ex in read_dataset(data_root, task, "train", lang, limit=2)]
    assert len(found) == 8
    return found


def step_gradients(model, examples, tokenizer, seq2seq, **split):
    """A step's loss (target sum / target count, as Trainer.train_step) and gradients over
    the micro-batches `step_batches(**split)` makes."""
    parts = step_batches(examples, tokenizer, LIMITS, seq2seq, **split)
    total = sum(b["num_targets"] for _, b in parts)
    loss = 0.0
    for part, batch in parts:
        tensors = {k: v for k, v in batch.items() if k not in ("num_targets", "token_examples")}
        keys = [dropout_key(0, 0, i) for i in part]
        with model.route([examples[i].features for i in part], dropout_keys=keys, token_examples=batch.get("token_examples")):
            step = loss_sum(model, tensors, seq2seq) / total
            step.backward()
        loss += step.item()
    return loss, grads(model), [b for _, b in parts]


def test_a_step_is_the_same_packed_or_by_token_budget(examples):
    base, tokenizer = load_model({"name": "tiny"})
    model = flix_model(base, sparse=True)  # as runs train (dense gradients: the test above)
    loss, expected, rows = step_gradients(model, examples, tokenizer, False, size=4)  # today's: 4 rows each
    for split in ({"size": 4, "tokens": 700}, {"size": 4, "tokens": 900, "packed": True}, {"size": 4, "packed": True}):
        got, gradients, batches = step_gradients(model, examples, tokenizer, False, **split)
        assert got == pytest.approx(loss, rel=1e-5), split
        assert_same_grads(gradients, expected)
        for b in batches:  # within the budget, unless one example alone exceeds it
            assert b["input_ids"].numel() <= split.get("tokens", 4 * 333) or len(b["input_ids"]) == 1
    assert padding_fraction(batches) < padding_fraction(rows)


def test_seq2seq_micro_batches_by_token_budget(examples):
    base, tokenizer = load_model({"name": "tiny_seq2seq"})
    model = flix_model(base)
    model.base_model.eval()  # T5's own dropout off (two splits draw it differently); feature dropout stays on
    loss, expected, _ = step_gradients(model, examples, tokenizer, True, size=4)
    got, gradients, batches = step_gradients(model, examples, tokenizer, True, size=4, tokens=700)
    assert got == pytest.approx(loss, rel=1e-5)
    assert_same_grads(gradients, expected)
    assert all(b["input_ids"].numel() + b["labels"].numel() <= 700 or len(b["input_ids"]) == 1 for b in batches)
    assert sum(len(b["input_ids"]) for b in batches) == len(examples)


def test_packing_and_budgets_place_every_example_once():
    lengths = [51, 193, 97, 97, 120, 60, 88, 150, 75, 110, 64, 99]
    rows = first_fit_decreasing(lengths, 200)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 200 for row in rows)
    micro = pack(lengths, 600)
    assert sorted(i for m in micro for row in m for i in row) == list(range(len(lengths)))
    for m in micro:
        assert len(m) * max(sum(lengths[i] for i in row) for row in m) <= 600
    computed = sum(len(m) * max(sum(lengths[i] for i in row) for row in m) for m in micro)
    assert computed <= 1.1 * sum(lengths)
    widths = [9, 7, 7, 3, 2]  # sorted: a chunk costs its rows x its first width
    chunks = split_by_budget(len(widths), lambda i, j: (j - i) * widths[i], 16)
    assert chunks == [(0, 1), (1, 3), (3, 5)]
    assert split_by_budget(2, lambda i, j: (j - i) * 50, 16) == [(0, 1), (1, 2)]  # an item over budget alone


def test_trainer_packs_where_exact_and_says_where_not(compose, tmp_path, capfd):
    from flix.pipeline.run_config import load_mixture_for
    from flix.pipeline.trainer import Trainer

    losses, padding = {}, {}
    for packing in (False, True):
        cfg = compose("mixture=study_a", "scale.batch_size=8", f"scale.packing={str(packing).lower()}", "scale.tokens_per_micro_batch=600")
        trainer = Trainer.from_config(cfg, load_mixture_for(cfg), tmp_path / str(packing))
        assert trainer.packing is packing
        losses[packing], padding[packing] = [], 0.0
        for step in range(2):  # padding summed over the steps: one step of short examples may have none to remove
            losses[packing].append(trainer.train_step(step)[0])
            padding[packing] += trainer.last_padding
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert padding[True] < padding[False]
    cfg = compose("model=tiny_seq2seq", "mixture=multitask_sw", "scale.packing=true")
    trainer = Trainer.from_config(cfg, load_mixture_for(cfg), tmp_path / "seq2seq")
    assert not trainer.packing and "not packing: a seq2seq model" in capfd.readouterr().err
    trainer.train_step(0)


def test_hf_flattening_collator_routes_each_packed_example(examples):
    """transformers' DataCollatorWithFlattening (what TRL's padding_free uses) wrapped in
    FLixDataCollator: model(**batch) routes each packed example by its features."""
    from transformers import DataCollatorWithFlattening

    from flix import FLixDataCollator

    base, tokenizer = load_model({"name": "tiny"})
    model = flix_model(base, dropout=0.0)
    seqs, labels = sequences([9, 14, 5, 12])
    rows = [
        {"input_ids": s, "labels": y, "task": t, "lang": g} for s, y, t, g in zip(seqs, labels, ["ner", "qa_in_lang"] * 2, ["sw", "yo", "ha", "sw"])
    ]
    batch = FLixDataCollator(model, DataCollatorWithFlattening())(rows)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert sequence_index(batch["position_ids"]).max() == 3
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    got = grads(model)
    padded, padded_labels = left_padded(seqs, labels)
    with model.route([{"task": r["task"], "lang": r["lang"]} for r in rows]):
        expected = model(**padded, labels=padded_labels).loss
        expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_grads(got, grads(model))
    with pytest.raises(RuntimeError, match="packed rows' position ids hold 4 sequences"):
        model(**{k: v for k, v in batch.items() if k != "flix_features"}, flix_features=batch["flix_features"][:3], use_cache=False)


def test_target_nll_packed_equals_padded(examples):
    """Evaluation's target NLL (validation and test) on packed rows: each example's value
    equals the padded one to 1e-5 relative, on a tiny Gemma 3 whose sliding window is
    shorter than its rows, with FLix routing each example by its own features."""
    from flix.pipeline.evaluate import evaluate, example_nll

    _, tokenizer = load_model({"name": "tiny"})  # byte tokens, within the windowed model's vocabulary
    model = flix_model(windowed_gemma()).eval()  # eval: no feature dropout, as evaluation runs
    cpu = torch.device("cpu")
    padded = example_nll(model, tokenizer, examples, LIMITS, 3, False, cpu)
    packed = example_nll(model, tokenizer, examples, LIMITS, 3, False, cpu, packed=True)
    assert packed == pytest.approx(padded, rel=1e-5) and all(v > 0 for v in padded)
    parts = step_batches(examples, tokenizer, LIMITS, False, 3, packed=True, train=False)
    assert sum(len(b["input_ids"]) for _, b in parts) < len(examples) and all("attention_mask" not in b for _, b in parts)  # really packed
    datasets = {(ex.task, ex.lang): [e for e in examples if (e.task, e.lang) == (ex.task, ex.lang)] for ex in examples}
    result = evaluate(model, tokenizer, datasets, LIMITS, 3, False, cpu, generate={}, packed=True)
    for (task, lang), part in datasets.items():  # as validation and test call it
        assert result.example_nll[task][lang] == pytest.approx([padded[examples.index(e)] for e in part], rel=1e-5)


@pytest.mark.slow
def test_gemma_packed_step_equals_padded(gemma, examples):
    """Gemma 3 270M (sliding window 512, soft-capping, 262k vocabulary): a packed step's
    loss and bank gradients equal the padded step's, with sdpa over whole rows and with each
    example's attention on its own (flix.attention, as runs train)."""
    from flix.attention import use_segment_attention

    base, tokenizer = load_model({"name": "gemma3_270m"})
    torch.manual_seed(0)  # the banks' init, whatever ran before
    model = flix_model(base)
    assert packs_exactly(model)
    loss, expected, _ = step_gradients(model, examples[:8], tokenizer, False, size=4)
    got, gradients, _ = step_gradients(model, examples[:8], tokenizer, False, size=4, packed=True)
    assert got == pytest.approx(loss, rel=1e-5)
    assert_same_grads(gradients, expected, rel=GEMMA_REL)
    # against sdpa on the same packed rows: on CPU the segments are plain matmuls, sdpa a
    # flash kernel (1.13e-5 seen in CI on the EPYC host)
    assert use_segment_attention(model)
    segments, segment_gradients, _ = step_gradients(model, examples[:8], tokenizer, False, size=4, packed=True)
    assert segments == pytest.approx(got, rel=1e-5)
    assert_same_grads(segment_gradients, gradients, rel=GEMMA_REL)


def test_packing_settings_leave_a_runs_hash_alone(compose):
    """Packing and the token budget change how fast, not what (the tests above): runs keep
    their directories, as with scale.cpu_kernels."""
    from flix.pipeline.run_config import config_hash

    plain = config_hash(compose("scale=cpu", "scale.packing=false", "scale.tokens_per_micro_batch=null", fast=False))
    assert config_hash(compose("scale=cpu", fast=False)) == plain
    assert config_hash(compose("scale=cpu", "scale.tokens_per_micro_batch=999", fast=False)) == plain
