"""A FLix step (D = 8) on real cpu NER micro-batches with the rank-r kernels register-blocked
to fit AVX2's 16 registers (this commit's flix/csrc/cpu_kernels.cpp) against the kernels
before it (the source at git revision BEFORE, built here under another name), in one
process: 6 rounds, each running a 4-step cycle over the same 4 micro-batches per variant, in
alternating order. Run from the repository root with FLIX_DATA_ROOT set:

    python reports/bench/lean-step/round5/ab_kernels.py [BEFORE]   # BEFORE defaults to 634a4c1
"""

import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

sys.path.insert(0, ".")
from benchmarks import model_cases as mc  # noqa: E402
from benchmarks.cases import ALPHA, DROPOUT  # noqa: E402
from flix import kernels  # noqa: E402
from flix.pipeline.methods import method_config  # noqa: E402

before = sys.argv[1] if len(sys.argv) > 1 else "634a4c1"
build = Path(tempfile.mkdtemp(prefix="flix_kernels_before_"))
source = build / "cpu_kernels_before.cpp"
source.write_text(subprocess.run(["git", "show", f"{before}:flix/csrc/cpu_kernels.cpp"], capture_output=True, text=True, check=True).stdout)
old = load(name="flix_kernels_before", sources=[str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"], build_directory=str(build))

torch.set_num_threads(2)
kernels.use(True)
new = kernels.kernel()
args = types.SimpleNamespace(model="gemma3_270m", scale="cpu", mixture="multilingual_ner", override=[], data_root=None, device="cpu", seed=0)
base, tok = mc.load(args)
cpu = torch.device("cpu")
batches = mc.real_micro_batches(args, base, tok, 4, cpu)
features = mc.gemma_features(8)
config = method_config("flix", features, "joint", alpha=ALPHA, feature_dropout=DROPOUT)
routes = mc.routes_for(features, batches, torch.Generator().manual_seed(0))
step = mc.flix_step(base, config, batches, routes, mc.autocast_for(cpu, False), cpu)  # each call: the next micro-batch

for _ in range(4):
    step()
times = {"new": [], "before": []}
for r in range(6):
    order = [("new", new), ("before", old)][:: 1 if r % 2 == 0 else -1]
    for name, module in order:
        kernels.kernel = lambda module=module: module
        start = time.perf_counter()
        for _ in range(4):
            step()
        times[name].append(time.perf_counter() - start)
ratios = [a / b for a, b in zip(times["new"], times["before"])]
print(
    f"4-step cycle s: new {statistics.median(times['new']):.2f} before ({before}) {statistics.median(times['before']):.2f}; "
    f"per-round new/before median {statistics.median(ratios):.3f}, rounds {[round(x, 3) for x in ratios]}"
)
