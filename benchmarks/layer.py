"""`python -m benchmarks.layer`: one adapted projection on the CPU, forward and backward to its input, at a real
model's width, for the frozen layer alone, compute-matched LoRA (one always-on feature)
and FLix on mixed batches.

A whole-model step on a noisy machine moves by more than the few percent the adapters
cost; one layer runs in milliseconds, so many interleaved rounds give a tight ratio. Use
it to choose between implementations of the FLix layer; `benchmarks.model` says what a
whole step costs. The attributed column is `benchmarks.model`'s in-step estimate
(`benchmarks.attribute`) for the same layer, to hold against the wall-time ratio beside
it, which is tight here. The upstream gradient is a fixed dense tensor, as in training (a
`.sum().backward()` would hand the layer a stride-0 gradient and time copies instead).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from benchmarks import options
from benchmarks.attribute import attributed_ratio, own_time
from benchmarks.cases import ALPHA
from benchmarks.model_cases import TASKS, gemma_features, mixed_features
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


def main(argv: list[str] | None = None) -> int:
    parser = options.parser(
        "python -m benchmarks.layer", __doc__, out=None, out_help="also write the figures as JSON", repeats=40, warmup=5, features="8,4096"
    )
    positive = options.at_least(1)
    parser.add_argument("--d-in", type=positive, default=640, help="input width (default 640, Gemma 3 270M's hidden size)")
    parser.add_argument("--d-out", type=positive, default=2048, help="output width (default 2048, its MLP width)")
    parser.add_argument("--batch", type=positive, default=8, help="examples, each its own feature combination (default 8)")
    parser.add_argument("--tokens", type=positive, default=120, help="tokens per example (default 120)")
    parser.add_argument(
        "--attribute",
        type=options.at_least(0),
        default=10,
        metavar="N",
        help="profiled steps per adapted case for the attributed ratio, as benchmarks.model's (default 10, 0 skips)",
    )
    args = parser.parse_args(argv)
    sizes = options.feature_counts(parser, args.features, 2 * TASKS, f"{TASKS} tasks and at least as many languages")
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
        cases[f"flix D={d}"] = layer_case(args.d_in, args.d_out, x, grad, config, mixed_features(space, args.batch, 1, gen)[0])
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


if __name__ == "__main__":
    sys.exit(main())
