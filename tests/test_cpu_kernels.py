"""The compiled CPU kernel for the adapters' rank-r part (flix.kernels) against torch's
ops in float64, and the layer built on it. Skipped, with the reason, where no C++ compiler
exists (the kernels are opt-in: runs without them take torch's ops)."""

from __future__ import annotations

import contextlib
import shutil
import warnings

import pytest
import torch

from flix import kernels
from flix.features import FeatureSpace
from flix.layer import FLixLayer
from flix.routing import Router

# (examples, tokens each, rank, d_in, d_out): token counts off the kernel's 4-row blocks and
# 32-token tiles, one example split across threads, decode steps of one token, rank 1 and 16,
# widths past one 256-column block and with an odd number of 16-float vectors
SHAPES = [
    (3, 37, 6, 48, 80),
    (1, 100, 16, 32, 16),
    (5, 1, 1, 16, 32),
    (2, 70, 7, 272, 528),
    (8, 5, 6, 640, 2048),
    (3, 33, 12, 640, 256),
    (2, 9, 13, 48, 1040),
]


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler (c++ or g++): the CPU kernels cannot be built here")
    module = kernels.kernel()
    assert module is not None, "the CPU kernel should build here (g++ and ninja are in the setup)"
    kernels.use(True)
    yield module
    kernels.use(False)


def torch_ops(fn, *args):
    """What the kernels' dispatch computes without them: the reference."""
    with kernels.disabled():
        return fn(*args)


def test_kernels_are_off_unless_asked(monkeypatch):
    """By default a FLix layer takes torch's ops, as on a GPU: the kernels are never built."""
    monkeypatch.delenv("FLIX_CPU_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_wanted", False)
    monkeypatch.setattr(kernels, "kernel", lambda: pytest.fail("the kernels were used without being asked for"))
    x, a, b, grad = case(2, 8, 6, 32, 32)
    update, h = kernels.lowrank_forward(x, a, b, 1.0)
    kernels.lowrank_backward(grad, x, a, b, h, 1.0, True)
    monkeypatch.setenv("FLIX_CPU_KERNELS", "0")
    kernels.use(True)
    try:
        assert not kernels.wanted()  # the environment overrides the config
        monkeypatch.setenv("FLIX_CPU_KERNELS", "1")
        kernels.use(False)
        assert kernels.wanted()
    finally:
        kernels.use(False)


def case(g, tokens, r, d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, grad = torch.randn(g * tokens, d_in, generator=gen), torch.randn(g * tokens, d_out, generator=gen)
    a, b = torch.randn(g, r, d_in, generator=gen), torch.randn(g, r, d_out, generator=gen)
    return x, a, b, grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_equals_torch_ops(kernel, shape):
    x, a, b, grad = case(*shape)
    update, h = kernel.lowrank_forward(x, a, b, 1.5)
    ref_update, ref_h = torch_ops(kernels.lowrank_forward, x.double(), a.double(), b.double(), 1.5)
    torch.testing.assert_close(update, ref_update.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h, ref_h.float(), rtol=1e-5, atol=1e-4)

    got = kernel.lowrank_backward(grad, x, a, b, h, 1.5, True)
    ref = torch_ops(kernels.lowrank_backward, grad.double(), x.double(), a.double(), b.double(), h.double(), 1.5, True)
    for name, g, r in zip(("grad_x", "grad_a", "grad_b"), got, ref):
        torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-3, msg=name)
    grad_x, grad_a, grad_b = kernel.lowrank_backward(grad, x, a, b, h, 1.5, False)
    assert grad_x is None and torch.equal(grad_a, got[1]) and torch.equal(grad_b, got[2])


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_on_packed_runs_equals_torch_ops(kernel, threads):
    """Packed rows: runs of 37, 1, 0, 130 (cut across threads) and 20 positions, each with
    its own bank rows; the torch reference takes one run at a time."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, _, _, grad = case(1, 188, 6, 272, 48)
        a, b = torch.randn(5, 6, 272), torch.randn(5, 6, 48)
        bounds = torch.tensor([0, 37, 38, 38, 168, 188])
        update, h = kernels.lowrank_forward(x, a, b, 0.5, bounds)
        ref_update, ref_h = torch_ops(kernels.lowrank_forward, x.double(), a.double(), b.double(), 0.5, bounds)
        torch.testing.assert_close(update, ref_update.float(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(h, ref_h.float(), rtol=1e-5, atol=1e-4)
        got = kernels.lowrank_backward(grad, x, a, b, h, 0.5, True, bounds)
        ref = torch_ops(kernels.lowrank_backward, grad.double(), x.double(), a.double(), b.double(), h.double(), 0.5, True, bounds)
        for name, g, r in zip(("grad_x", "grad_a", "grad_b"), got, ref):
            torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-3, msg=name)
        assert not got[1][2].any()  # the empty run: no gradient
    finally:
        torch.set_num_threads(before)


def test_kernel_rejects_what_it_cannot_compute(kernel):
    x, a, b, _ = case(2, 4, 6, 32, 32)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        kernel.lowrank_forward(x[:, :24].contiguous(), a[:, :, :24].contiguous(), b, 1.0)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        kernel.lowrank_forward(x.double(), a, b, 1.0)
    with pytest.raises(RuntimeError, match="multiple of g"):
        kernel.lowrank_forward(x[:7], a, b, 1.0)
    with pytest.raises(RuntimeError, match="g > 0"):  # not a division by zero
        kernel.lowrank_forward(x[:0], a[:0], b[:0], 1.0)
    with pytest.raises(RuntimeError, match="bounds must rise from 0 to n"):
        kernel.lowrank_forward(x, a, b, 1.0, torch.tensor([0, 6, 5]))
    with pytest.raises(RuntimeError, match="g \\+ 1 int64 offsets"):
        kernel.lowrank_forward(x, a, b, 1.0, torch.tensor([0, 8]))
    assert not kernels._lowrank_usable(x[:0], a[:0], b[:0])
    assert not kernels._lowrank_usable(x.bfloat16(), a.bfloat16(), b.bfloat16())
    assert not kernels._lowrank_usable(x[:, :24], a[:, :, :24], b)
    assert not kernels._lowrank_usable(x, torch.randn(2, 17, 32), torch.randn(2, 17, 32))
    assert kernels._lowrank_usable(x, a, b)


def flix_layer():
    """A float32 FLix layer (48 -> 32, widths the kernel takes) with B drawn, not zero: (base, space, router, layer)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 32).requires_grad_(False)
    space = FeatureSpace({"task": ["ner", "qa"], "lang": ["sw", "yo", "bn"]}, {"task": 4, "lang": 2})
    router = Router(space)
    layer = FLixLayer(base, router, scaling=1.5, sparse_grad=True)
    with torch.no_grad():
        layer.flix_B.normal_()[0].zero_()
    return base, space, router, layer


@pytest.mark.parametrize("uniform", [False, True])
def test_layer_on_kernel_equals_plain_autograd(kernel, uniform):
    """A float32 FLix layer whose widths the kernel takes: output, input and bank gradients
    equal plain float64 autograd over y_e = x_e W0 + b + scale * x_e A_e^T B_e."""
    base, space, router, layer = flix_layer()
    batch = (
        [{"task": "ner", "lang": "sw"}] * 3
        if uniform
        else [{"task": "ner", "lang": "sw"}, {"task": "qa", "lang": "yo"}, {"task": "qa", "lang": "bn"}]
    )
    rows = space.rows(batch)
    router.set(rows)
    assert kernels._lowrank_usable(torch.empty(1, 48), torch.empty(1, rows.shape[1], 48), torch.empty(1, rows.shape[1], 32))
    x = torch.randn(3, 40, 48, requires_grad=True)
    grad_out = torch.randn(3, 40, 32)
    out = layer(x)
    out.backward(grad_out)

    a, b = layer.flix_A.detach().double().requires_grad_(), layer.flix_B.detach().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    ref = x_ref @ base.weight.double().T + base.bias.double()
    ref = ref + 1.5 * torch.stack([x_ref[e] @ a[rows[e]].T @ b[rows[e]] for e in range(3)])
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.detach(), ref.detach().float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.flix_A.grad.to_dense(), a.grad.float(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(layer.flix_B.grad.to_dense(), b.grad.float(), rtol=1e-5, atol=1e-3)


def test_packed_layer_on_kernel_equals_the_masked_union(kernel):
    """Packed rows, examples with different rows and padding between them: the kernel's runs
    give the output and gradients of torch's masked union of rows (GPUs' path)."""
    base, space, router, layer = flix_layer()
    rows = space.rows([{"task": "ner", "lang": "sw"}, {"task": "qa", "lang": "yo"}, {"task": "qa", "lang": "bn"}])
    tokens = torch.tensor([0] * 10 + [1] * 7 + [-1] * 3 + [2] * 12 + [-1] * 8)  # two rows of 20
    x = torch.randn(2, 20, 48)
    grad_out = torch.randn(2, 20, 32)
    assert kernels.usable(x.view(-1, 48), layer.flix_A, rows.shape[1], 32)
    results = []
    for path in (contextlib.nullcontext, kernels.disabled):
        router.set(rows, tokens)
        x_in = x.clone().requires_grad_()
        with path():
            out = layer(x_in)
            out.backward(grad_out)
        results.append((out.detach(), x_in.grad, layer.flix_A.grad.to_dense(), layer.flix_B.grad.to_dense()))
        layer.zero_grad(set_to_none=True)
    for name, got, expected in zip(("out", "grad_x", "grad_A", "grad_B"), *results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4, msg=name)
    assert results[0][0][0, 17:20].sub(base(x[0, 17:20])).abs().max() < 1e-6  # padding: no update


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def no_compiler(folder):
        raise OSError("g++: not found")

    kernels.kernel.cache_clear()
    monkeypatch.setattr(kernels, "_build", no_compiler)
    monkeypatch.setattr(kernels, "_wanted", True)
    try:
        with pytest.warns(RuntimeWarning, match="g\\+\\+: not found.*FLIX_CPU_KERNELS=0"):
            assert kernels.kernel() is None
        x, a, b, _ = case(2, 4, 6, 32, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not kernels._lowrank_usable(x, a, b)  # cached: no second attempt, no second warning
        monkeypatch.setenv("FLIX_CPU_KERNELS", "0")
        kernels.kernel.cache_clear()
        assert kernels.kernel() is None  # off: not even tried
    finally:
        kernels.kernel.cache_clear()


def test_sparse_adamw_kernel_equals_torch_ops(kernel):
    """SparseAdamW with the fused row update equals its torch-op path over steps whose rows
    repeat within a gradient, change between steps and reach new rows (new moment slots)."""
    from flix.optim import SparseAdamW

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(20, 48, generator=gen)
    grads = []
    for step in range(4):
        rows = torch.randint(1, 6 + 4 * step, (9,), generator=gen)
        grads.append(torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(9, 48, generator=gen), start.shape, check_invariants=True))

    def train(fused: bool) -> torch.Tensor:
        bank = torch.nn.Parameter(start.clone())
        opt = SparseAdamW([bank], lr=1e-2, weight_decay=0.1)
        assert kernels._rows_usable(bank, grads[0].coalesce().values())
        with contextlib.nullcontext() if fused else kernels.disabled():
            for grad in grads:
                bank.grad = grad.clone()
                opt.step()
        return bank.detach()

    fused, ops = train(True), train(False)
    torch.testing.assert_close(fused, ops, rtol=0, atol=1e-6)
    assert not torch.equal(fused, start)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[torch.cat([g.coalesce().indices()[0] for g in grads])] = False
    assert torch.equal(fused[untouched], start[untouched])


def test_a_packed_step_on_the_kernel_equals_the_padded_step(kernel, data_root):
    """As runs train at scale=cpu (kernels on): real examples of two tasks and three
    languages, packed, routed per token with dropout; loss and bank gradients equal the
    padded step's to 1e-5 relative."""
    from test_packing import assert_same_grads, examples, flix_model, step_gradients

    from flix.base_models import load_model

    base, tokenizer = load_model({"name": "tiny"})
    model = flix_model(base, sparse=True)
    found = examples.__wrapped__(data_root)
    loss, expected, _ = step_gradients(model, found, tokenizer, False, size=4)
    got, gradients, batches = step_gradients(model, found, tokenizer, False, size=4, packed=True)
    assert got == pytest.approx(loss, rel=1e-5)
    assert_same_grads(gradients, expected)
    assert any(len(set(b["token_examples"].flatten().tolist()) - {-1}) > 1 for b in batches)  # examples share rows
