"""`python -m benchmarks.adapters`: FLix's speed against LoRA, on a small Llama-style model.

Training rows time one step (forward, backward, optimizer step, zero_grad) on a
mixed batch: `none` (frozen base, only input gradients), `compute_matched` (one
always-on rank-6 adapter), `flix` with D features (task rank 4 + language rank 2,
feature dropout 0.7), and `peft_lora` (peft LoRA rank 6, torch AdamW). Inference
rows time a batch whose examples all use different feature combinations, FLix's
routing against peft's `adapter_names` (one LoRA per combination), with the base
model alone (`none`) for reference, in two modes: `forward` (one no-grad forward
over the whole prompt) and `generate` (greedy generation of --new-tokens tokens per
sequence: prefill plus token-by-token decoding, the serving workload). Cases are timed
in interleaved rounds, so a slower or busier moment of the machine falls on every
case alike; each row is the median over rounds (the minimum and all times are in
the JSON too).

The targets: FLix (D=8) within 10% of compute_matched, FLix at the largest D within
10% of D=8, and mixed-batch inference at least 2x faster than peft (checked for each
mode). Both inference paths pay the same base model, so peft / base bounds the last
ratio; the report prints that ceiling beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import options


def main(argv: list[str] | None = None) -> int:
    parser = options.parser(
        "python -m benchmarks.adapters",
        __doc__,
        out=Path("reports/bench/adapters.json"),
        out_help="JSON report (written atomically)",
        repeats=9,
        warmup=2,
        features="8,64,512,4096",
    )
    positive = options.at_least(1)
    parser.add_argument("--batch", type=positive, default=16, help="examples per batch (default 16)")
    parser.add_argument("--seq", type=positive, default=128, help="tokens per example (default 128)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per sequence in `generate` mode (default 16)")
    parser.add_argument("--hidden", type=positive, default=256, help="model width; MLP 4x, heads of 64 (default 256)")
    parser.add_argument("--layers", type=positive, default=4, help="transformer layers (default 4)")
    parser.add_argument("--vocab", type=options.at_least(4), default=1024, help="vocabulary size (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = options.feature_counts(parser, args.features, 2, "at least one task and one language")
    from benchmarks.adapters_run import run  # torch and the models load only now

    return run(args, sizes)


if __name__ == "__main__":
    sys.exit(main())
