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

from benchmarks import options

TASKS = options.GEMMA_TASKS


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
    from benchmarks.layer_run import run  # torch and the models load only now

    return run(args, sizes)


if __name__ == "__main__":
    sys.exit(main())
