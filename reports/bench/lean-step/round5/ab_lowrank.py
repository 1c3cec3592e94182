"""The rank-r kernels alone (flix.kernels.lowrank_forward / lowrank_backward) register-blocked
to fit AVX2's 16 registers (this commit's flix/csrc/cpu_kernels.cpp) against the kernels
before it (the source at git revision BEFORE, built here under another name), on the shapes
of Gemma 3 270M's projections: 1,200 packed positions of 8 examples, rank R per example
(default 6: a FLix example's task rank 4 + language rank 2, as benchmarks.model and the
cpu_long study run it), 2 threads; 15 alternating repetitions, medians. Checks that both
give the same results first. Run from the repository root:

    python reports/bench/lean-step/round5/ab_lowrank.py [BEFORE [R]]   # BEFORE defaults to 634a4c1
"""

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

sys.path.insert(0, ".")
from flix import kernels  # noqa: E402

before = sys.argv[1] if len(sys.argv) > 1 else "634a4c1"
build = Path(tempfile.mkdtemp(prefix="flix_kernels_before_"))
source = build / "cpu_kernels_before.cpp"
source.write_text(subprocess.run(["git", "show", f"{before}:flix/csrc/cpu_kernels.cpp"], capture_output=True, text=True, check=True).stdout)
variants = {"before": load(name="flix_kernels_before", sources=[str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"], build_directory=str(build))}
kernels.use(True)
variants["new"] = kernels.kernel()
torch.set_num_threads(2)
tokens, examples = 1200, 8
rank = int(sys.argv[2]) if len(sys.argv) > 2 else 6
bounds = torch.tensor([i * tokens // examples for i in range(examples + 1)])


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


for d_in, d_out in ((640, 1024), (640, 256), (1024, 640), (640, 2048), (2048, 640)):
    x, grad = torch.randn(tokens, d_in), torch.randn(tokens, d_out)
    a, b = torch.randn(examples, rank, d_in), torch.randn(examples, rank, d_out)
    outputs = {}
    for name, k in variants.items():
        update, h = k.lowrank_forward(x, a, b, 1.0, bounds)
        outputs[name] = (update, h, *k.lowrank_backward(grad, x, a, b, h, 1.0, True, bounds))
    for got, ref in zip(outputs["new"], outputs["before"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    fwd, bwd = {n: [] for n in variants}, {n: [] for n in variants}
    for rep in range(15):
        for name in ("new", "before") if rep % 2 == 0 else ("before", "new"):
            k, h = variants[name], outputs[name][1]
            fwd[name].append(seconds(lambda: k.lowrank_forward(x, a, b, 1.0, bounds)))
            bwd[name].append(seconds(lambda: k.lowrank_backward(grad, x, a, b, h, 1.0, True, bounds)))
    flops = 6 * tokens * rank * (d_in + d_out)
    line = []
    for name in ("before", "new"):
        f, g = statistics.median(fwd[name]), statistics.median(bwd[name])
        line.append(f"{name} forward {f * 1e3:.2f} ms backward {g * 1e3:.2f} ms ({flops / (f + g) / 1e9:.0f} GFLOP/s)")
    ratio = statistics.median(n / o for n, o in zip(map(sum, zip(fwd["new"], bwd["new"])), map(sum, zip(fwd["before"], bwd["before"]))))
    print(f"{d_in} -> {d_out}: " + " | ".join(line) + f" | new/before {ratio:.3f}")
