"""The frozen model's RMSNorms and gated MLP activations on the CPU kernels (flix.fused):
switched only where a probe shows their own forward computes what the kernel does, equal to
it forward and backward, and their own arithmetic wherever the kernel does not apply."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_cpu_kernels import kernel  # noqa: F401 (fixture: kernels built and on)
from test_packing import GEMMA_REL, assert_same_grads, flix_model, grads, sequences, windowed_gemma
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP, Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from flix import kernels, lm_loss
from flix.features import dropout_key
from flix.fused import use_fused_ops


def frozen(norm: torch.nn.Module, mean: float) -> torch.nn.Module:
    torch.nn.init.normal_(norm.weight, mean, 0.3, generator=torch.Generator().manual_seed(0))
    return norm.requires_grad_(False)


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach() - expected.detach()).abs().max() / expected.detach().abs().max())


@pytest.mark.parametrize("norm", [frozen(Gemma3RMSNorm(80), 0.1), frozen(LlamaRMSNorm(48, eps=1e-5), 1.0)], ids=["gemma", "llama"])
def test_switched_norm_equals_its_own_forward_and_gradient(norm, kernel):  # noqa: F811
    fused = copy.deepcopy(norm)
    assert use_fused_ops(fused) == 1 and use_fused_ops(fused) == 1  # idempotent
    assert fused.state_dict().keys() == norm.state_dict().keys()
    saved = io.BytesIO()
    torch.save(fused, saved)  # a whole switched model saves and loads
    fused = torch.load(io.BytesIO(saved.getvalue()), weights_only=False)
    assert fused._flix_fused[1] == (1.0 if isinstance(norm, Gemma3RMSNorm) else 0.0)  # (eps, offset): Gemma's 1 + w, Llama's w
    x = (torch.randn(3, 7, norm.weight.shape[0], generator=torch.Generator().manual_seed(1)) * 3).requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    calls = []
    original = kernels.rms_norm_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "rms_norm_forward", lambda *a: calls.append(a) or original(*a))
        got = fused(x)
    assert calls, "the kernel should have run"
    expected = norm(x)
    assert relative(got, expected) < 1e-6
    assert relative(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0]) < 1e-6
    with torch.no_grad():  # evaluation: the kernel's forward without a node
        assert relative(fused(x), expected) < 1e-6


def test_own_forward_where_the_kernel_does_not_apply(kernel):  # noqa: F811
    """A trained weight (it needs a gradient), a width not a multiple of 16, float64 and
    kernels off all run the module's own forward, bit for bit."""
    cases = [
        (frozen(Gemma3RMSNorm(32), 0.1).requires_grad_(True), torch.float32),
        (frozen(Gemma3RMSNorm(40), 0.1), torch.float32),
        (frozen(Gemma3RMSNorm(32), 0.1).double(), torch.float64),
    ]
    for norm, dtype in cases:
        fused = copy.deepcopy(norm)
        assert use_fused_ops(fused) == 1
        x = torch.randn(5, norm.weight.shape[0], dtype=dtype, requires_grad=True)
        assert torch.equal(fused(x), norm(x))
        if norm.weight.requires_grad:
            fused(x).sum().backward()
            assert fused.weight.grad is not None
    norm = frozen(Gemma3RMSNorm(32), 0.1)
    fused = copy.deepcopy(norm)
    use_fused_ops(fused)
    x = torch.randn(5, 32)
    with kernels.disabled():
        assert torch.equal(fused(x), norm(x))


def test_only_norms_that_match_a_convention_are_switched():
    class ScaledRMSNorm(torch.nn.Module):  # an RMSNorm by name that computes something else
        def __init__(self):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.ones(16)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + 1

    class Unprobed(LlamaRMSNorm):  # its forward fails on a plain probe, as a sharded (DTensor) weight's does
        def forward(self, x):
            raise RuntimeError("aten.mul.Tensor got mixed torch.Tensor and DTensor")

    model = torch.nn.Sequential(ScaledRMSNorm(), torch.nn.LayerNorm(16), frozen(LlamaRMSNorm(16), 1.0), Unprobed(16))
    assert use_fused_ops(model) == 1
    assert [("forward" in vars(m)) for m in model] == [False, False, True, False]


def test_flix_gemma3_loss_and_gradients_equal_with_switched_norms(kernel):  # noqa: F811
    """A tiny Gemma 3 under FLix (its norms and MLPs switched): the loss and every bank
    gradient equal those of its own forward to 1e-5."""
    model = flix_model(windowed_gemma())
    seqs, labels = sequences([9, 9])
    ids, labels = torch.tensor(seqs), torch.tensor(labels)
    features = [{"task": "ner", "lang": "sw"}, {"task": "qa_in_lang", "lang": "am"}]
    keys = [dropout_key(0, 5, i) for i in range(len(seqs))]  # the same dropout masks both times

    def step():
        with model.route(features, dropout_keys=keys):
            loss = lm_loss(model, labels, input_ids=ids)
        loss.backward()
        return loss.detach(), grads(model)

    expected_loss, expected = step()
    assert use_fused_ops(model) == 3 * 6 + 1 + 3  # norms: 6 a layer and the final one; one MLP a layer
    loss, got = step()
    assert relative(loss, expected_loss) < 1e-5
    assert_same_grads(got, expected)


def test_trainer_switches_with_the_kernels(compose, tmp_path, kernel):  # noqa: F811
    """scale.cpu_kernels=true: the run's model has its RMSNorms and MLPs on the kernels, and its step's
    loss equals the step without the kernels to 1e-5; false: none switched."""
    from flix.pipeline.run_config import load_mixture_for
    from flix.pipeline.trainer import Trainer

    losses = {}
    for on in (False, True):
        cfg = compose("mixture=study_a", "scale.batch_size=4", f"scale.cpu_kernels={str(on).lower()}")
        trainer = Trainer.from_config(cfg, load_mixture_for(cfg), tmp_path / str(on))
        switched = [m for m in trainer.model.modules() if getattr(m, "_flix_fused", None)]
        assert bool(switched) is on
        losses[on] = trainer.train_step(0)[0]
    kernels.use(True)  # Trainer set it from the scale; the fixture's state for the tests after
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize(
    "mlp",
    [
        Gemma3MLP(Gemma3TextConfig(hidden_size=48, intermediate_size=80, hidden_activation="gelu_pytorch_tanh")),
        LlamaMLP(LlamaConfig(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=4)),
    ],
    ids=["gemma-gelu", "llama-silu"],
)
def test_switched_mlp_equals_its_own_forward_and_gradients(mlp, kernel):  # noqa: F811
    """Output, the input's and the projections' gradients equal the module's own to 1e-6,
    over activations out to the tails (|gate| up to 20: GELU's tanh saturates there)."""
    fused = copy.deepcopy(mlp)
    assert use_fused_ops(fused) == 1 and fused._flix_fused == ("gelu" if isinstance(mlp, Gemma3MLP) else "silu")
    x = (torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(3)) * 40).requires_grad_(True)

    def run(model):
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        return out, grads

    calls = []
    original = kernels.gated_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "gated_forward", lambda *a: calls.append(a) or original(*a))
        got, got_grads = run(fused)
    assert calls and float(calls[0][0].detach().abs().max()) > 10  # the kernel ran, on tails too
    expected, expected_grads = run(mlp)
    assert relative(got, expected) < 1e-6
    for g, e in zip(got_grads, expected_grads):
        assert relative(g, e) < 1e-6
    with torch.no_grad():
        assert relative(fused(x), expected) < 1e-6


def test_only_mlps_of_the_gated_pattern_are_switched():
    class Residual(LlamaMLP):  # gated, plus its input: not what the kernel path computes
        def forward(self, x):
            return super().forward(x) + x

    class Swapped(LlamaMLP):  # gate and up the other way round
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4)
    relu = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4, hidden_act="relu")
    model = torch.nn.ModuleList([Residual(config), Swapped(config), LlamaMLP(relu), LlamaMLP(config)])
    assert use_fused_ops(model) == 1
    assert [getattr(m, "_flix_fused", None) for m in model] == [None, None, None, "silu"]


@pytest.mark.slow
def test_gemma3_270m_packed_step_equals_with_switched_ops(gemma, kernel, data_root):  # noqa: F811
    """Gemma 3 270M as scale=cpu trains it (packed rows, each example's attention on its own,
    FLix on the kernels): a step's loss and bank gradients equal those of its own norms and
    MLPs (bank gradients to GEMMA_REL: float32 through 18 layers)."""
    from test_packing import examples, step_gradients

    from flix.attention import use_segment_attention
    from flix.base_models import load_model

    base, tokenizer = load_model({"name": "gemma3_270m"})
    torch.manual_seed(0)
    model = flix_model(base)
    assert use_segment_attention(model)
    found = examples.__wrapped__(data_root)[:8]
    loss, expected, _ = step_gradients(model, found, tokenizer, False, size=4, packed=True)
    assert use_fused_ops(model) == 18 * 6 + 1 + 18
    got, gradients, _ = step_gradients(model, found, tokenizer, False, size=4, packed=True)
    assert got == pytest.approx(loss, rel=1e-5)
    assert_same_grads(gradients, expected, rel=GEMMA_REL)
