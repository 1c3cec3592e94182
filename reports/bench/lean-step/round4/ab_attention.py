"""A FLix step (D = 8) on real cpu NER micro-batches with the segment attention's examples
by two matmuls (flix.attention._causal_by_matmuls) against sdpa's flash kernel per example,
in one process: 4 rounds, each running a 4-step cycle over the same 4 micro-batches per
variant, in alternating order. Run from the repository root with FLIX_DATA_ROOT set:

    python reports/bench/lean-step/round4/ab_attention.py
"""

import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from benchmarks import model_cases as mc  # noqa: E402
from benchmarks.cases import ALPHA, DROPOUT  # noqa: E402
from flix import attention, kernels  # noqa: E402
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
step = mc.flix_step(base, config, batches, routes, mc.autocast_for(cpu, False), cpu)  # each call: the next micro-batch
by_matmuls = attention._causal_by_matmuls


def by_sdpa(q, k, v, lengths, scaling):
    gqa = q.shape[0] != k.shape[0]
    splits = zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))
    return [F.scaled_dot_product_attention(qe[None], ke[None], ve[None], is_causal=True, scale=scaling, enable_gqa=gqa)[0] for qe, ke, ve in splits]


for _ in range(4):
    step()
times = {"matmuls": [], "sdpa": []}
for r in range(4):
    order = [("matmuls", by_matmuls), ("sdpa", by_sdpa)][:: 1 if r % 2 == 0 else -1]
    for name, fn in order:
        attention._causal_by_matmuls = fn
        start = time.perf_counter()
        for _ in range(4):
            step()
        times[name].append(time.perf_counter() - start)
ratios = [a / b for a, b in zip(times["matmuls"], times["sdpa"])]
print(
    f"4-step cycle s: matmuls {statistics.median(times['matmuls']):.2f} sdpa {statistics.median(times['sdpa']):.2f}; "
    f"per-round matmuls/sdpa median {statistics.median(ratios):.3f}, rounds {[round(x, 3) for x in ratios]}"
)
