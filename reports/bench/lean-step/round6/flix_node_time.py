"""Wall time of the FLix nodes, the rank-r kernels, the bank-row gathers and the bank
gradients inside 4 FLix D = 8 steps on 4 real cpu NER micro-batches (after 4 warm-up steps),
by wrapping those functions with a clock (no profiler). Run from the repository root with
FLIX_DATA_ROOT set:

    python reports/bench/lean-step/round6/flix_node_time.py
"""

import collections
import sys
import time
import types

import torch
sys.path.insert(0, ".")
from benchmarks import model_cases as mc
from benchmarks.cases import ALPHA, DROPOUT
from flix import kernels, layer
from flix.pipeline.methods import method_config
torch.set_num_threads(2); kernels.use(True)
args = types.SimpleNamespace(model="gemma3_270m", scale="cpu", mixture="multilingual_ner", override=[], data_root=None, device="cpu", seed=0)
base, tok = mc.load(args); cpu = torch.device("cpu")
batches = mc.real_micro_batches(args, base, tok, 4, cpu)
features = mc.gemma_features(8)
config = method_config("flix", features, "joint", alpha=ALPHA, feature_dropout=DROPOUT)
routes = mc.routes_for(features, batches, torch.Generator().manual_seed(0))
step = mc.flix_step(base, config, batches, routes, mc.autocast_for(cpu, False), cpu)
acc = collections.defaultdict(float); cnt = collections.Counter()
def timed(name, fn):
    def w(*a, **k):
        s = time.perf_counter(); r = fn(*a, **k); acc[name] += time.perf_counter() - s; cnt[name] += 1; return r
    return w
kernels.lowrank_forward = timed("kernel fwd", kernels.lowrank_forward)
kernels.lowrank_backward = timed("kernel bwd", kernels.lowrank_backward)
layer._gather = timed("gather", layer._gather)
layer._bank_grad = timed("bank_grad", layer._bank_grad)
layer._FLixLinear.forward = staticmethod(timed("node fwd", layer._FLixLinear.forward))
layer._FLixLinear.backward = staticmethod(timed("node bwd", layer._FLixLinear.backward))
orig_addmm = torch.addmm
for _ in range(4): step()
acc.clear(); cnt.clear()
s = time.perf_counter()
for _ in range(4): step()
total = time.perf_counter() - s
print(f"4 steps {total*1e3:.0f} ms")
for k in acc: print(f"  {k}: {acc[k]*1e3:.0f} ms over {cnt[k]} calls ({100*acc[k]/total:.1f}%)")
