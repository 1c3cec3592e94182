"""FLix over a quantized base (model.quantize=nf4|int8: bitsandbytes 4-bit and 8-bit
Linear layers): exactness against peft's LoRA over the same quantized model, routing,
a real training run, export and merging, and the errors for what cannot run."""

from __future__ import annotations

import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_adapters import FEATURES, MIXED, randomise_b  # the same features, examples and trained-looking B

from flix import FLixConfig, FLixModel, get_flix_model
from flix.base_models import load_model
from flix.base_models.quantize import backend, kept_in_float, storage_bytes
from flix.export import combination_rows
from flix.pipeline.methods import method_config
from flix.pipeline.run import run
from flix.targets import find_target_modules

METHODS = ["nf4", "int8"]
# Whole-model comparisons. nf4 quantizes weights only; LLM.int8() also rounds every token's
# activations to int8, so a one-ulp float difference upstream (another summation order,
# thread count) can flip one rounding and move the logits by ~1e-3 (seen: 3.6e-4 against
# peft with 2 threads, 0 with 1). Wrong routing moves them by ~0.8. Layer by layer, on the
# same inputs, both are compared at float tolerance (assert_layers_match).
MODEL_TOL = {"nf4": {"rtol": 1e-5, "atol": 1e-5}, "int8": {"rtol": 0.0, "atol": 5e-3}}
EXACT = {"rtol": 1e-5, "atol": 1e-5}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, checked to quantize and run a layer on this machine."""
    try:
        return backend("nf4")
    except RuntimeError as err:
        pytest.skip(f"bitsandbytes cannot run here: {err}")


def tiny(quantize: str, name: str = "tiny"):
    return load_model({"name": name, "quantize": quantize})[0]


def tokens(n: int, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (n, length), generator=torch.Generator().manual_seed(seed))


def flix_model(quantize: str, name: str = "tiny") -> FLixModel:
    torch.manual_seed(0)  # A's initialisation: the same whatever ran before
    model = get_flix_model(tiny(quantize, name), FLixConfig(features=FEATURES, ranks={"task": 4, "lang": 2}, alpha=12.0))
    randomise_b(model)
    return model.eval()


def logits(model, features, ids, **kwargs):
    with model.route(features):
        return model(input_ids=ids, **kwargs).logits


def assert_layers_match(model: FLixModel, peft_model, features: list[dict], ids: torch.Tensor, rows: torch.Tensor) -> None:
    """Every FLix layer against peft's layer of the same name, on the input the FLix layer
    saw in a forward of ids: outputs, input gradients, and the gradients of peft's A and B
    against the FLix bank rows they were copied from (`rows`)."""
    inputs = {}
    hooks = [
        layer.register_forward_hook(lambda m, args, out, n=n: inputs.__setitem__(n, args[0].detach())) for n, layer in model.flix_layers().items()
    ]
    with torch.no_grad():
        logits(model, features, ids)
    for hook in hooks:
        hook.remove()
    gen = torch.Generator().manual_seed(2)
    for name, layer in model.flix_layers().items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        lora_a, lora_b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        layer.flix_A.grad = layer.flix_B.grad = lora_a.grad = lora_b.grad = None
        ours, theirs = inputs[name].clone().requires_grad_(), inputs[name].clone().requires_grad_()
        with model.route(features):
            out = layer(ours)
        expected = peft_layer(theirs)
        grad_out = torch.randn(out.shape, generator=gen)
        out.backward(grad_out)
        expected.backward(grad_out)
        torch.testing.assert_close(out, expected, **EXACT, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(ours.grad, theirs.grad, **EXACT, msg=lambda m: f"{name} input gradient: {m}")
        torch.testing.assert_close(layer.flix_A.grad.to_dense()[rows], lora_a.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.flix_B.grad.to_dense()[rows].T, lora_b.grad, rtol=1e-4, atol=1e-5)
        assert lora_b.grad.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_quantized_base_replaces_linear_layers_and_keeps_the_rest(bnb, method):
    model = tiny(method)
    layer_class = bnb.nn.Linear4bit if method == "nf4" else bnb.nn.Linear8bitLt
    projections = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]
    assert len(projections) == 14 and all(type(m) is layer_class for m in projections)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert not any(p.requires_grad for p in model.parameters())
    assert getattr(model, "is_loaded_in_4bit" if method == "nf4" else "is_loaded_in_8bit")  # what peft reads
    full = storage_bytes(tiny("none"))
    assert storage_bytes(model) < (0.45 if method == "nf4" else 0.5) * full
    # the same targets as the float model, and a different (quantized) output
    assert find_target_modules(model, None) == find_target_modules(tiny("none"), None)
    ids = tokens(2)
    quantized, float_ = model(input_ids=ids).logits, tiny("none")(input_ids=ids).logits
    assert not torch.allclose(quantized, float_, atol=1e-4)
    torch.testing.assert_close(quantized, float_, atol=0.3, rtol=0.1)  # but close: the same model


def test_quantizing_keeps_the_callers_random_stream(bnb):
    torch.manual_seed(5)
    tiny("nf4")
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


def test_t5_keeps_its_float32_modules_and_gpt2_is_refused(bnb):
    base = tiny("nf4", "tiny_seq2seq")
    assert "wo" in base._keep_in_fp32_modules  # T5 casts its input to wo's weight dtype
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in base.named_modules()}
    assert kinds["wo"] == "Linear" and kinds["wi"] == kinds["q"] == "Linear4bit" and kinds["lm_head"] == "Linear"
    assert {"lm_head", "encoder.block.0.layer.1.DenseReluDense.wo"} <= kept_in_float(base)
    model = get_flix_model(base, FLixConfig(features=FEATURES, ranks={"task": 4, "lang": 2}, alpha=12.0))
    assert {layer.quantized for layer in model.flix_layers().values()} == {True, False}  # wo adapted in float
    randomise_b(model)
    ids = tokens(2)
    out = logits(model, MIXED[:2], ids, decoder_input_ids=ids[:, :4])
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"model.quantize=nf4 found no nn.Linear .*Conv1D"):
        tiny("nf4", "tiny_gpt2")


@pytest.mark.parametrize("method", METHODS)
def test_layer_is_base_forward_plus_float32_update(bnb, method):
    """A FLix layer over a quantized Linear: the base's own output untouched (B = 0 gives it
    bit for bit), float32 banks on the base's device, and y = base(x) + s * x A_e^T B_e
    per example with the input gradient of plain autograd through both."""
    model = get_flix_model(tiny(method), FLixConfig(features=FEATURES, ranks={"task": 4, "lang": 2}, alpha=12.0))
    layer = model.flix_layers()["model.layers.0.mlp.down_proj"]
    assert layer.quantized and (layer.in_features, layer.out_features) == (128, 64)
    assert layer.flix_A.dtype == layer.flix_B.dtype == torch.float32 and layer.flix_A.device == layer.base_layer.weight.device
    assert layer.base_layer.weight.dtype in (torch.uint8, torch.int8)
    x = torch.randn(len(MIXED), 5, 128)
    with model.route(MIXED):
        assert torch.equal(layer(x), layer.base_layer(x))  # B starts at zero
    randomise_b(model)
    rows = model.flix_config.space.rows(MIXED)
    x_node, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(len(MIXED), 5, 64)
    with model.route(MIXED):
        out = layer(x_node)
        out.backward(grad_out)
    a, b = layer.flix_A.detach(), layer.flix_B.detach()
    update = torch.stack([x_ref[e] @ a[rows[e]].T @ b[rows[e]] for e in range(len(MIXED))])
    expected = layer.base_layer(x_ref) + layer.scaling * update
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_node.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.flix_B.grad.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_compute_matched_equals_peft_lora_rank6_over_the_same_quantized_base(bnb, method):
    """One always-on rank-6 bank (compute_matched) over a quantized tiny Gemma equals peft's
    LoRA r=6 (its bitsandbytes LoRA layers) over the same quantized model with the same A
    and B: logits, and after a loss's backward the gradients of A and B."""
    config = method_config("compute_matched", FEATURES, "joint", alpha=12.0, target_modules=PROJECTIONS)
    assert config.shared_rank == 6 and not config.features
    model = get_flix_model(tiny(method), config).eval()
    randomise_b(model)
    lora = get_peft_model(tiny(method), LoraConfig(r=6, lora_alpha=12.0, target_modules=PROJECTIONS, lora_dropout=0.0)).eval()
    peft_class = "Linear4bit" if method == "nf4" else "Linear8bitLt"
    with torch.no_grad():
        for name, layer in model.flix_layers().items():
            peft_layer = lora.base_model.model.get_submodule(name)
            assert type(peft_layer).__module__ == "peft.tuners.lora.bnb" and type(peft_layer).__name__ == peft_class
            peft_layer.lora_A["default"].weight.copy_(layer.flix_A[1:])
            peft_layer.lora_B["default"].weight.copy_(layer.flix_B[1:].T)
    ids, labels = tokens(3), tokens(3, seed=1)
    assert_layers_match(model, lora, MIXED[:3], ids, rows=torch.arange(1, 7))
    ours, theirs = model(input_ids=ids, labels=labels), lora(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, **MODEL_TOL[method])
    torch.testing.assert_close(logits(model, MIXED[:3], ids), theirs.logits, **MODEL_TOL[method])  # features change nothing
    for layer in model.flix_layers().values():
        layer.flix_A.grad = layer.flix_B.grad = None
    lora.zero_grad(set_to_none=True)
    ours.loss.backward()
    theirs.loss.backward()
    for name, layer in model.flix_layers().items():
        peft_layer = lora.base_model.model.get_submodule(name)
        grad_a, grad_b = layer.flix_A.grad.to_dense(), layer.flix_B.grad.to_dense()
        for ours_grad, theirs_grad in (
            (grad_a[1:], peft_layer.lora_A["default"].weight.grad),
            (grad_b[1:].T, peft_layer.lora_B["default"].weight.grad),
        ):
            if method == "nf4":
                torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-6)
            else:  # a flipped int8 rounding (MODEL_TOL) moves a gradient a little, not its direction
                assert (ours_grad - theirs_grad).norm() <= 1e-2 * theirs_grad.norm(), name
        assert grad_a[0].abs().sum() == 0
    assert any(layer.flix_A.grad.abs().sum() > 0 for layer in model.flix_layers().values())


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_equals_each_example_alone_over_a_quantized_base(bnb, method):
    model = flix_model(method)
    ids = tokens(len(MIXED))
    mixed = logits(model, MIXED, ids)
    for i, features in enumerate(MIXED):
        alone = logits(model, [features], ids[i : i + 1])
        torch.testing.assert_close(mixed[i], alone[0], **MODEL_TOL[method])
    other = logits(model, [MIXED[1]], ids[:1])
    assert (mixed[0] - other[0]).abs().max() > 0.1  # the adapters matter, far beyond the tolerance


@pytest.mark.parametrize("method", METHODS)
def test_an_evaluation_pass_leaves_training_gradients_unchanged(bnb, method):
    """A no-grad eval-mode forward (a validation pass) between two training steps changes no
    gradient: bitsandbytes' in-place CPU repacking for AVX512-BF16 (whose kernel has no
    autograd) stays off, so training and evaluation share one kernel on every CPU."""
    model, ids = flix_model(method), tokens(2)

    def gradients():
        model.train().zero_grad()
        logits(model, MIXED[:2], ids).square().mean().backward()
        return {n: p.grad.to_dense().clone() for n, p in model.named_parameters() if p.grad is not None}

    before = gradients()
    model.eval()
    with torch.no_grad():
        logits(model, MIXED[:2], ids)
    after = gradients()
    assert before.keys() == after.keys() and len(before) == 2 * 14
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_training_run_over_a_quantized_base(bnb, method, compose, tmp_path):
    """The real pipeline with model.quantize: trains, scores, and saves float32 banks that
    load onto the float base and onto the quantized one alike."""
    cfg = compose("mixture=multitask_sw", f"model.quantize={method}")
    results = run(cfg, tmp_path)
    assert results["config"]["model"]["quantize"] == method
    assert all(loss > 0 for loss in results["train_loss"]) and results["trainable_parameters"] > 0
    assert set(results["test"]) == {"ner", "qa_in_lang"}
    banks = load_file(str(tmp_path / "best_adapter" / "flix_adapter.safetensors"))
    assert banks and {t.dtype for t in banks.values()} == {torch.float32}
    assert any(t.abs().sum() > 0 for k, t in banks.items() if k.endswith("flix_B"))  # it trained
    for base in ("none", method):
        loaded = FLixModel.from_pretrained(tiny(base), tmp_path / "best_adapter")
        assert {layer.quantized for layer in loaded.flix_layers().values()} == {base != "none"}


@pytest.mark.parametrize("method", METHODS)
def test_export_peft_over_a_quantized_base_reproduces_flix(bnb, method, tmp_path):
    model = flix_model(method)
    ids = tokens(2)
    expected = logits(model, [MIXED[0]] * 2, ids)
    out = model.export_peft(MIXED[0], tmp_path / "adapter")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    peft_model = PeftModel.from_pretrained(tiny(method), out, is_trainable=True).eval()  # trainable: compare gradients too
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, **MODEL_TOL[method])
    assert_layers_match(model, peft_model, [MIXED[0]] * 2, ids, rows=combination_rows(model, MIXED[0]))


@pytest.mark.parametrize("method", METHODS)
def test_merge_is_refused_over_a_quantized_base_and_works_on_the_float_one(bnb, method, tmp_path):
    model = flix_model(method)
    ids = tokens(2)
    before = logits(model, [MIXED[0]] * 2, ids)
    with pytest.raises(ValueError, match="cannot merge into a quantized base.*model.quantize=none"):
        model.merge_and_unload(MIXED[0])
    torch.testing.assert_close(logits(model, [MIXED[0]] * 2, ids), before, rtol=0, atol=0)  # left as it was
    # the adapter trained over the quantized base merges into the float base
    model.save_pretrained(tmp_path / "adapter")
    on_float = FLixModel.from_pretrained(tiny("none"), tmp_path / "adapter").eval()
    expected = logits(on_float, [MIXED[0]] * 2, ids)
    merged = on_float.merge_and_unload(MIXED[0])
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, before, atol=1e-4)  # the float base is another base


def test_unknown_quantize_value_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"model.quantize='fp8' is not known: use one of none, nf4, int8"):
        load_model({"name": "no/such-model", "quantize": "fp8"})


def test_missing_bitsandbytes_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match=r"model.quantize=nf4 needs bitsandbytes.*pip install -e \"\.\[quant\]\".*model.quantize=none"):
        load_model({"name": "tiny", "quantize": "nf4"})
    assert type(tiny("none").model.layers[0].self_attn.q_proj) is torch.nn.Linear  # none never needs it


def test_bitsandbytes_that_cannot_run_says_so(bnb, monkeypatch):
    def broken(self, x):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", broken)
    with pytest.raises(RuntimeError, match=r"model.quantize=int8: bitsandbytes .* cannot run int8 layers here .*no kernel"):
        load_model({"name": "tiny", "quantize": "int8"})
