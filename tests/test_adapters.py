"""FLix layer, routing, export and persistence on real tiny Hugging Face models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from flix import FLixConfig, FLixModel, get_flix_model
from flix.base_models import enable_activation_checkpointing, load_model
from flix.features import FeatureSpace
from flix.optim import SparseAdamW
from flix.pipeline.methods import method_config

FEATURES = {"task": ["ner", "qa_in_lang", "semantic_parsing"], "lang": ["sw", "yo", "ha", "bn"]}
MIXED = [
    {"task": "ner", "lang": "sw"},
    {"task": "qa_in_lang", "lang": "yo"},
    {"task": "semantic_parsing", "lang": "bn"},
    {"task": "ner", "lang": "ha"},
    {"task": "qa_in_lang", "lang": "sw"},
]


def tiny(name: str, seed: int = 0):
    model, _ = load_model({"name": name, "seed": seed})
    return model


def randomise_b(model: FLixModel, seed: int = 1) -> None:
    """Trained-looking adapters: B starts at zero, which would hide routing bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.flix_layers().values():
            layer.flix_B.copy_(torch.randn(layer.flix_B.shape, generator=gen) * 0.2)
            layer.flix_B[0].zero_()


def flix_model(name: str = "tiny", **overrides) -> FLixModel:
    config = FLixConfig(**{"features": FEATURES, "ranks": {"task": 4, "lang": 2}, "alpha": 12.0, **overrides})
    model = get_flix_model(tiny(name), config)
    randomise_b(model)
    return model.eval()


def tokens(n: int, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, features, ids, **kwargs):
    with model.route(features):
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2", "tiny_seq2seq"])
def test_mixed_batch_equals_each_example_alone(name):
    model = flix_model(name)
    ids = tokens(len(MIXED))
    extra = {"decoder_input_ids": ids[:, :4]} if name == "tiny_seq2seq" else {}
    mixed = logits(model, MIXED, ids, **extra)
    for i, features in enumerate(MIXED):
        alone = logits(model, [features], ids[i : i + 1], **{k: v[i : i + 1] for k, v in extra.items()})
        torch.testing.assert_close(mixed[i], alone[0], rtol=1e-5, atol=1e-5)
    # the adapters matter: another feature combination gives other outputs
    other = logits(model, [MIXED[1]], ids[:1], **{k: v[:1] for k, v in extra.items()})
    assert not torch.allclose(mixed[0], other[0])


def test_update_is_sum_of_feature_updates():
    """W(x) = W0 + s*(B_task A_task + B_lang A_lang): the deltas of the parts add up."""
    model = flix_model()
    layer = next(iter(model.flix_layers().values()))
    x = torch.randn(1, 5, layer.in_features)
    base = layer.base_layer(x)

    def delta(features):
        with model.route([features]):
            return layer(x) - base

    both = delta({"task": "ner", "lang": "sw"})
    torch.testing.assert_close(both, delta({"task": "ner"}) + delta({"lang": "sw"}), rtol=1e-5, atol=1e-6)
    assert both.abs().max() > 1e-3


def test_unknown_language_routes_like_task_alone():
    model = flix_model()
    ids = tokens(2)
    unseen = logits(model, [{"task": "ner", "lang": "zz"}, {"task": "qa_in_lang", "lang": "mni"}], ids)
    task_only = logits(model, [{"task": "ner"}, {"task": "qa_in_lang"}], ids)
    torch.testing.assert_close(unseen, task_only, rtol=0, atol=0)


def test_unseen_combination_needs_nothing_special():
    # (semantic_parsing, sw) never co-occur in MIXED, yet route like any other pair.
    model = flix_model()
    combo = {"task": "semantic_parsing", "lang": "sw"}
    rows = model.flix_config.space.rows([combo])[0].tolist()
    space = model.flix_config.space
    assert sorted(r for r in rows if r) == sorted(space.rows_of("task", "semantic_parsing") + space.rows_of("lang", "sw"))


@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2"])
def test_export_peft_reproduces_flix(name, tmp_path):
    model = flix_model(name)
    ids = tokens(2)
    for features in [MIXED[0], {"task": "semantic_parsing", "lang": "zz"}]:
        expected = logits(model, [features] * 2, ids)
        out = model.export_peft(features, tmp_path / "adapter")
        assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
        peft_model = PeftModel.from_pretrained(tiny(name), out).eval()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert peft_model.peft_config["default"].fan_in_fan_out == (name == "tiny_gpt2")


def test_compute_matched_equals_peft_lora_rank6():
    config = method_config("compute_matched", FEATURES, "joint", alpha=12.0)
    assert config.shared_rank == 6 and not config.features
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config.target_modules = targets
    model = get_flix_model(tiny("tiny"), config).eval()
    randomise_b(model)
    lora = get_peft_model(tiny("tiny"), LoraConfig(r=6, lora_alpha=12.0, target_modules=targets)).eval()
    with torch.no_grad():
        for name, layer in model.flix_layers().items():
            peft_layer = lora.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.flix_A[1:])
            peft_layer.lora_B["default"].weight.copy_(layer.flix_B[1:].T)
    ids = tokens(3)
    # always-on: no route needed, and routing any features changes nothing
    torch.testing.assert_close(model(input_ids=ids).logits, lora(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, MIXED[:3], ids), lora(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_route_is_required_when_there_are_features():
    model = flix_model()
    with pytest.raises(RuntimeError, match="model.route"):
        model(input_ids=tokens(1))
    with pytest.raises(RuntimeError, match="one feature dict per input row"):
        logits(model, MIXED[:2], tokens(3))


def test_gradients_reach_only_active_features():
    model = flix_model(feature_dropout=0.0, sparse_grad=True).train()
    batch = [{"task": "ner", "lang": "sw"}, {"task": "ner", "lang": "zz"}]
    ids = tokens(2)
    with model.route(batch):
        model(input_ids=ids, labels=ids).loss.backward()
    space = model.flix_config.space
    active = set(space.rows_of("task", "ner") + space.rows_of("lang", "sw"))
    for layer in model.flix_layers().values():
        for param in (layer.flix_A, layer.flix_B):
            grad = param.grad.to_dense()
            touched = {i for i in range(grad.shape[0]) if grad[i].abs().sum() > 0}
            assert touched <= active
        assert {i for i in range(layer.flix_B.shape[0]) if layer.flix_B.grad.to_dense()[i].abs().sum() > 0} == active
    # and an optimizer step leaves every other feature's rows bit-identical
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1).step()
    for key, value in model.adapter_state_dict().items():
        changed = {i for i in range(value.shape[0]) if not torch.equal(value[i], before[key][i])}
        assert changed <= active and changed, key


def test_only_adapter_parameters_train():
    model = flix_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("flix_A", "flix_B")) for n in trainable)


def test_feature_dropout_rate_is_p():
    space = FeatureSpace(FEATURES, {"task": 4, "lang": 2})
    examples = [{"task": "ner", "lang": "sw"}] * 20000
    gen = torch.Generator().manual_seed(0)
    rows = space.rows(examples, feature_dropout=0.7, generator=gen)
    task_off = (rows[:, :4] == 0).all(1).float()
    lang_off = (rows[:, 4:] == 0).all(1).float()
    assert abs(task_off.mean().item() - 0.7) < 0.02 and abs(lang_off.mean().item() - 0.7) < 0.02
    # independent per feature: P(both off) = p^2
    assert abs((task_off * lang_off).mean().item() - 0.49) < 0.02
    assert (space.rows(examples[:100], feature_dropout=0.0) != 0).all()


def test_keep_one_dropout_never_drops_everything():
    """keep_one: no example loses every feature; a single feature is off with probability
    p - p^2 / 2 (0.455 at p = 0.7, two groups); the same seed gives the same routes; and
    the independent mode's routes are unchanged by the mode's existence (same draws)."""
    from flix.features import featureless

    space = FeatureSpace(FEATURES, {"task": 4, "lang": 2})
    examples = [{"task": "ner", "lang": "sw"}] * 20000
    rows = space.rows(examples, feature_dropout=0.7, generator=torch.Generator().manual_seed(0), keep_one=True)
    assert not featureless(rows).any()
    task_off = (rows[:, :4] == 0).all(1).float().mean().item()
    lang_off = (rows[:, 4:] == 0).all(1).float().mean().item()
    assert abs(task_off - 0.455) < 0.02 and abs(lang_off - 0.455) < 0.02
    again = space.rows(examples, feature_dropout=0.7, generator=torch.Generator().manual_seed(0), keep_one=True)
    assert torch.equal(rows, again)
    independent = space.rows(examples, feature_dropout=0.7, generator=torch.Generator().manual_seed(0))
    assert abs(featureless(independent).float().mean().item() - 0.49) < 0.02
    # keep_one only turns features back on: wherever it differs, independent had dropped everything
    changed = (rows != independent).any(1)
    assert torch.equal(changed, featureless(independent))


def test_keep_one_routes_exactly_like_its_kept_features():
    """A keep_one example routes exactly as if only its kept features were given."""
    model = flix_model(feature_dropout=0.9, dropout_mode="keep_one").train()
    ids = tokens(4)
    torch.manual_seed(3)
    with model.route(MIXED[:4]):
        rows = model.router.rows.clone()
        out = model(input_ids=ids).logits
    space = model.flix_config.space
    for e, features in enumerate(MIXED[:4]):
        kept = {g: v for g, v in features.items() if set(space.rows_of(g, v)) <= set(rows[e].tolist())}
        assert kept, "keep_one left an example with no feature"
        model.eval()
        torch.testing.assert_close(logits(model, [kept], ids[e : e + 1])[0], out[e], rtol=1e-5, atol=1e-5)
        model.train()
    with pytest.raises(ValueError, match="dropout_mode"):
        FLixConfig(features=FEATURES, ranks={"task": 4, "lang": 2}, dropout_mode="sometimes")


def test_dropout_only_in_training():
    model = flix_model(feature_dropout=0.9)
    ids = tokens(4)
    evals = [logits(model, MIXED[:4], ids) for _ in range(3)]
    assert all(torch.equal(evals[0], e) for e in evals)
    model.train()
    torch.manual_seed(0)
    assert any(not torch.allclose(evals[0], logits(model, MIXED[:4], ids)) for _ in range(3))


def test_param_matched_counts_equal():
    flix = get_flix_model(tiny("tiny"), method_config("flix", FEATURES, "joint"))
    pm_config = method_config("param_matched", FEATURES, "joint")
    assert pm_config.shared_rank == 3 * 4 + 4 * 2
    param = get_flix_model(tiny("tiny"), pm_config)
    assert flix.num_trainable_parameters() == param.num_trainable_parameters() > 0
    compute = get_flix_model(tiny("tiny"), method_config("compute_matched", FEATURES, "joint"))
    per_rank = compute.num_trainable_parameters() // 6
    assert param.num_trainable_parameters() == per_rank * pm_config.shared_rank


def test_method_ranks_follow_the_mixture_kind():
    assert method_config("flix", FEATURES, "multitask").ranks == {"task": 2, "lang": 4}
    assert method_config("flix", FEATURES, "multilingual").space.active_rank == 6
    shared = method_config("flix_shared", FEATURES, "joint")
    assert (shared.shared_rank, shared.ranks) == (4, {"task": 1, "lang": 1}) and shared.space.active_rank == 6
    assert method_config("flix", FEATURES, "joint", lang_rank=1).space.active_rank == 5
    with pytest.raises(ValueError, match="unknown method"):
        method_config("lora", FEATURES, "joint")


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = flix_model()
    model.save_pretrained(tmp_path / "adapter")
    loaded = FLixModel.from_pretrained(tiny("tiny"), tmp_path / "adapter").eval()
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(value, loaded.adapter_state_dict()[key])
    a, b = loaded.flix_config, model.flix_config
    assert (a.features, a.ranks, a.shared_rank, a.alpha) == (b.features, b.ranks, b.shared_rank, b.alpha)
    assert loaded.flix_config.scaling == model.flix_config.scaling
    ids = tokens(3)
    assert torch.equal(logits(model.eval(), MIXED[:3], ids), logits(loaded, MIXED[:3], ids))


def test_generate_with_beams_and_return_sequences():
    model = flix_model()
    ids = tokens(3, length=6)
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with model.route(MIXED[:3]):
        greedy = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        beams = model.generate(input_ids=ids, attention_mask=mask, num_beams=3, num_return_sequences=2, **kwargs)
    assert beams.shape[0] == 6
    for i in range(3):
        with model.route([MIXED[i]]):
            alone = model.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], **kwargs)
            alone_beams = model.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], num_beams=3, num_return_sequences=2, **kwargs)
        assert torch.equal(greedy[i], alone[0])
        assert torch.equal(beams[2 * i : 2 * i + 2], alone_beams)


def test_generate_seq2seq():
    model = flix_model("tiny_seq2seq")
    ids = tokens(2, length=6)
    with model.route(MIXED[:2]):
        out = model.generate(input_ids=ids, max_new_tokens=4, num_beams=2, do_sample=False)
    with model.route([MIXED[1]]):
        alone = model.generate(input_ids=ids[1:], max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(out[1, : alone.shape[1]], alone[0])


def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing: bool):
        torch.manual_seed(0)  # same A init for both models
        model = flix_model(sparse_grad=False).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        ids = tokens(3)
        with model.route(MIXED[:3]):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)


def test_follows_dtype_and_device():
    # float64 stands in for half precision: bf16 matmul is not available on every CPU.
    model = flix_model()
    model.to(torch.float64)
    layer = next(iter(model.flix_layers().values()))
    assert layer.flix_A.dtype == torch.float64
    out = logits(model, MIXED[:2], tokens(2))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    created = get_flix_model(tiny("tiny").to(torch.bfloat16), FLixConfig(features=FEATURES, ranks={"task": 4, "lang": 2}))
    assert next(iter(created.flix_layers().values())).flix_B.dtype == torch.bfloat16


def test_uniform_batch_fast_path_equals_batched_path():
    """When every example has the same rows a layer does one plain matmul over all tokens
    (rows (1, r)); outputs and sparse gradients equal the batched path's, with and
    without autograd (in-place add)."""
    model = flix_model().train()
    layer = next(iter(model.flix_layers().values()))
    x = torch.randn(3, 5, layer.in_features)
    f, g = MIXED[0], MIXED[1]

    def run(batch):
        layer.flix_A.grad = layer.flix_B.grad = None
        with model.route(batch):
            uniform = all(b == batch[0] for b in batch)
            assert model.router.rows_for(3, x.device).shape[0] == (1 if uniform else 3)
            out = layer(x)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), out)
        out[[0, 2]].sum().backward()  # example 1's rows differ between the two batches
        return out.detach()[[0, 2]], layer.flix_A.grad.to_dense(), layer.flix_B.grad.to_dense()

    fast, batched = run([f, f, f]), run([f, g, f])
    for a, b in zip(fast, batched):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fast[2].abs().sum() > 0


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("kind", ["linear_bias", "conv1d"])
def test_layer_gradients_equal_plain_autograd(kind, sparse):
    """The hand-written forward/backward of a FLix layer equals plain autograd over the
    definition y_e = x_e W0 + b + scale * x_e A_e^T B_e, per example, in float64: the
    output and the gradients of the input and of both banks (dropped features included)."""
    from transformers.pytorch_utils import Conv1D

    from flix.layer import FLixLayer
    from flix.routing import Router

    torch.manual_seed(0)
    base = torch.nn.Linear(7, 5, bias=True) if kind == "linear_bias" else Conv1D(5, 7)
    base = base.double().requires_grad_(False)
    space = FeatureSpace(FEATURES, {"task": 4, "lang": 2})
    router = Router(space)
    layer = FLixLayer(base, router, scaling=1.5, sparse_grad=sparse).double()
    with torch.no_grad():
        layer.flix_B.normal_()[0].zero_()
    rows = space.rows(MIXED, feature_dropout=0.5, generator=torch.Generator().manual_seed(3))
    assert (rows == 0).any(), "some features should be dropped"
    router.set(rows)
    x = torch.randn(len(MIXED), 4, 7, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(len(MIXED), 4, 5, dtype=torch.float64)
    layer(x).backward(grad_out)

    a, b = layer.flix_A.detach().clone().requires_grad_(), layer.flix_B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    plain = base(x_ref)
    update = torch.stack([x_ref[e] @ a[rows[e]].T @ b[rows[e]] for e in range(len(MIXED))])
    (plain + 1.5 * update).backward(grad_out)

    with_node = layer(x.detach())
    torch.testing.assert_close(with_node, (plain + 1.5 * update).detach())
    with torch.no_grad():  # generation's path, the same arithmetic without the autograd node
        assert torch.equal(layer(x), with_node.detach())
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.flix_A.grad.is_sparse == sparse
    torch.testing.assert_close(layer.flix_A.grad.to_dense(), a.grad)
    torch.testing.assert_close(layer.flix_B.grad.to_dense(), b.grad)
    assert layer.flix_A.grad.to_dense()[0].abs().sum() == 0  # the padding row never trains
