"""The rank-r kernels alone against the frozen projection they sit beside (forward x W^T and
the input gradient grad W), on Gemma 3 270M's projection shapes: 1,200 packed positions of 8
examples, rank 6, 2 threads, medians of 15. Run from the repository root:

    python reports/bench/lean-step/round6/kernels_vs_frozen.py
"""

import statistics, sys, time, torch
sys.path.insert(0, ".")
from flix import kernels
kernels.use(True); k = kernels.kernel(); torch.set_num_threads(2)
tokens, examples, rank = 1200, 8, 6
bounds = torch.tensor([i * tokens // examples for i in range(examples + 1)])
def t(fn, n=15):
    out = []
    for _ in range(n):
        s = time.perf_counter(); fn(); out.append(time.perf_counter() - s)
    return statistics.median(out) * 1e3
for d_in, d_out in ((640, 1024), (640, 256), (1024, 640), (640, 2048), (2048, 640)):
    x, grad = torch.randn(tokens, d_in), torch.randn(tokens, d_out)
    w = torch.randn(d_out, d_in)
    a, b = torch.randn(examples, rank, d_in), torch.randn(examples, rank, d_out)
    _, h = k.lowrank_forward(x, a, b, 1.0, bounds)
    f = t(lambda: k.lowrank_forward(x, a, b, 1.0, bounds)); g = t(lambda: k.lowrank_backward(grad, x, a, b, h, 1.0, True, bounds))
    fz = t(lambda: torch.mm(x, w.t())); gz = t(lambda: torch.mm(grad, w))
    fl = 6 * tokens * rank * (d_in + d_out)
    print(f"{d_in}->{d_out}: kernels fwd {f:.3f} bwd {g:.3f} ms ({fl/(f+g)/1e6:.0f} GFLOP/s) | frozen fwd {fz:.3f} + dx {gz:.3f} ms ({4*tokens*d_in*d_out/(fz+gz)/1e6:.0f} GFLOP/s) | kernels/frozen {(f+g)/(fz+gz):.3f}")
