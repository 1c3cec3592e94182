"""Where a step's time goes on this host: torch.profiler over the frozen base's step and
FLix D = 8's on the same 4 real cpu NER micro-batches (after 4 warm-up steps each), self
CPU time by op, summed over the 4 steps. Run from the repository root, FLIX_DATA_ROOT set:

    python reports/bench/lean-step/round6/profile_step.py
"""

import sys
import types
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from benchmarks import model_cases as mc  # noqa: E402
from benchmarks.cases import ALPHA, DROPOUT  # noqa: E402
from flix import kernels  # noqa: E402
from flix.pipeline.methods import method_config  # noqa: E402

torch.set_num_threads(2)
kernels.use(True)
args = types.SimpleNamespace(model="gemma3_270m", scale="cpu", mixture="multilingual_ner", override=[], data_root=None, device="cpu", seed=0)
base, tok = mc.load(args)
cpu = torch.device("cpu")
batches = mc.real_micro_batches(args, base, tok, 4, cpu)
features = mc.gemma_features(8)
config = method_config("flix", features, "joint", alpha=ALPHA, feature_dropout=DROPOUT)
routes = mc.routes_for(features, batches, torch.Generator().manual_seed(0))
autocast = mc.autocast_for(cpu, False)
steps = {"base": mc.base_step(base, batches, autocast), "flix": mc.flix_step(base, config, batches, routes, autocast, cpu)}

for name, step in steps.items():
    for _ in range(4):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            step()
    by_op = defaultdict(float)
    for event in prof.key_averages():
        by_op[event.key] += event.self_cpu_time_total / 1e3
    total = sum(by_op.values())
    print(f"\n{name}: {total:.0f} ms self CPU time over 4 steps")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {op}")
