"""`python -m benchmarks.loss`: the output layer and the loss at the labelled rows of a micro-batch, flix.loss's way against full logits.

A FLix step computes the output layer only at labelled positions (a cpu NER micro-batch
has 70-300 of them), one vocabulary block at a time, its input gradient in the same pass
(`flix.loss.linear_cross_entropy`). This times that, forward and backward, against what
a model's own loss does with the same rows (full-vocabulary logits, then cross-entropy),
beside the square matmul timed in the same rounds, and measures in a child process how
much memory each holds above its inputs. Gemma 3 270M's output layer by default (262,144
x 640, random weights: the arithmetic does not depend on them).
"""

from __future__ import annotations

import sys

from benchmarks import options


def main(argv: list[str] | None = None) -> int:
    parser = options.parser(
        "python -m benchmarks.loss", __doc__, out=None, out_help="also write the figures as JSON", repeats=7, warmup=1, features=None
    )
    parser.add_argument("--rows", default="72,145,290,600", help="labelled rows per micro-batch, comma-separated (default 72,145,290,600)")
    parser.add_argument("--vocab", type=options.at_least(2), default=262144, help="output layer rows (default 262144, Gemma 3's vocabulary)")
    parser.add_argument("--width", type=options.at_least(1), default=640, help="hidden size (default 640, Gemma 3 270M's)")
    args = parser.parse_args(argv)
    try:
        row_counts = sorted({int(r) for r in args.rows.split(",")})
    except ValueError:
        parser.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    if row_counts[0] < 1:
        parser.error("every --rows count must be >= 1")

    from benchmarks.loss_run import run  # torch loads only now

    return run(args, row_counts)


if __name__ == "__main__":
    sys.exit(main())
