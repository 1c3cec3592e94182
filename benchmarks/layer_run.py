"""The work of `python -m benchmarks.layer` (its options and docs are in benchmarks/layer.py,
which parses them before anything here loads torch)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.attribute import attributed_ratio, own_time
from benchmarks.cases import ALPHA, mixed_routes
from benchmarks.model_cases import gemma_features
from benchmarks.timing import paired_ratio, stats, time_interleaved
from flix import kernels
from flix.io import atomic_write_json
from flix.layer import FLixLayer
from flix.pipeline.methods import method_config
from flix.pipeline.versions import versions
from flix.routing import Router


def layer_case(d_in: int, d_out: int, x: torch.Tensor, grad: torch.Tensor, config=None, features: list[dict] | None = None) -> Callable[[], None]:
    """One forward + backward of a (FLix-adapted, when config is given) bias-free Linear."""
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    if config is None:
        layer, params = base, []
    else:
        router = Router(config.space)
        router.set(config.space.rows(features or [{}] * x.shape[0]))
        layer = FLixLayer(base, router, config.scaling, config.sparse_grad)
        with torch.no_grad():
            layer.flix_B.normal_(0, 0.02)
        params = [layer.flix_A, layer.flix_B]

    def step() -> None:
        for p in [x, *params]:
            p.grad = None
        layer(x).backward(grad)

    return step


def run(args, sizes: list[int]) -> int:
    torch.set_num_threads(args.threads)
    kernels.use(True)  # the compiled CPU kernels, as scale=cpu runs use them (the snapshots were measured so)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.d_in, generator=gen).requires_grad_()
    grad = torch.randn(args.batch, args.tokens, args.d_out, generator=gen)
    cases = {"frozen": layer_case(args.d_in, args.d_out, x, grad)}
    cm = method_config("compute_matched", gemma_features(sizes[0]), "joint", alpha=ALPHA)
    cases["compute_matched"] = layer_case(args.d_in, args.d_out, x, grad, cm)
    for d in sizes:
        space = gemma_features(d)
        config = method_config("flix", space, "joint", alpha=ALPHA)
        cases[f"flix D={d}"] = layer_case(args.d_in, args.d_out, x, grad, config, mixed_routes(space, args.batch, 1, gen)[0])
    ms = time_interleaved(cases, args.warmup, args.repeats)
    # The estimate `benchmarks.model` relies on, checked here against the tight wall-time ratio.
    attributed = {name: own_time(step, args.attribute) for name, step in cases.items() if name != "frozen" and args.attribute}

    rows = []
    print(f"flix bench layer: {args.d_in} -> {args.d_out}, {args.batch} examples x {args.tokens} tokens, forward + backward, {args.threads} threads")
    print(f"{'case':<18} {'ms':>8} {'/ frozen [95%]':>24} {'/ compute_matched [95%]':>26} {'attributed [95%]':>24}")
    for name, times in ms.items():
        vs_frozen, vs_cm = paired_ratio(times, ms["frozen"]), paired_ratio(times, ms["compute_matched"])
        rows.append({"case": name, **stats("ms", times), "vs_frozen": vs_frozen, "vs_compute_matched": vs_cm})
        ratios = [vs_frozen, vs_cm]
        if name in attributed:
            rows[-1]["attributed_vs_frozen"] = attributed_ratio(attributed[name])
            ratios.append(rows[-1]["attributed_vs_frozen"])
        cells = [f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]" for r in ratios]
        print(f"{name:<18} {rows[-1]['ms']:>8.2f} {cells[0]:>24} {cells[1]:>26} {cells[2] if len(cells) > 2 else '':>24}".rstrip())
    if args.out:
        atomic_write_json(args.out, {"rows": rows, "config": {**vars(args), "out": str(args.out), "versions": versions()}})
        print(f"wrote {args.out}")
    return 0
