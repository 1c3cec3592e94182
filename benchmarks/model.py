"""`python -m benchmarks.model`: FLix on a real pretrained model against the frozen base and LoRA.

Training rows time one optimizer step per real micro-batch: the micro-batches a --scale
run of --mixture (with any --override) trains on, as `Trainer.train_step` builds them (its
sampler, `flix.pipeline.batching.step_batches`: packed rows where the scale packs and the
model packs exactly, else length-sorted padded rows); each round the next one, the same
examples for every case; example i routed to task i mod 4 and a random language, so a
batch has at least 4 feature combinations (packed rows: routed per token):

    base              the frozen model alone: forward + backward to its input embeddings
    compute_matched   one always-on rank-6 adapter, SparseAdamW
    peft_lora         peft LoRA rank 6 on the same projections, torch AdamW, with the
                      model's own `labels=` loss (full-vocabulary logits) on the same
                      examples as left-padded rows with an attention mask: a user's step
    flix D=...        task rank 4 + language rank 2, feature dropout 0.7, D features

All but peft_lora take the run's micro-batches and the training loss
(`flix.pipeline.batching.loss_sum`: the output layer at labelled positions only). Each step's useful arithmetic (real tokens through the
blocks, real targets through the output layer, forward + input-gradient backward:
`flix.pipeline.flops.useful_flops`, from the model's shapes) is put against a square
matmul (2048 float32 on a CPU: sgemm) timed three times just before and just after that
step, per round: the host's speed moves within seconds here, so only a rate measured next
to a step says how fast the machine was while it ran.

Generation rows time greedy decoding of --new-tokens tokens for --gen-batch prompts of
--gen-seq tokens, each prompt its own feature combination: `base` (no adapters),
`peft_adapter_names` (one peft LoRA per combination) and `flix` (routing).

All cases share one copy of the base weights and run in interleaved rounds (each in a
shuffled order); each row is a median. Then a few profiled steps of each FLix-layer case
split its time into the adapters' own work and the frozen rest (`benchmarks.attribute`, CPU only).
A fresh process measures the peak memory of one micro-batch at a scale's worst-case
sizes (--memory-scale). On CUDA the cases run under bf16 autocast (adapters and
optimizer state stay float32), as training does; `--bf16 true` runs that path on the
CPU too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import options

TASKS = options.GEMMA_TASKS


def main(argv: list[str] | None = None) -> int:
    parser = options.parser(
        "python -m benchmarks.model",
        __doc__,
        out=None,
        out_help="JSON report, written atomically (default reports/bench/model-<device>.json)",
        repeats=5,
        warmup=1,
        features="8,64,512,4096",
    )
    positive = options.at_least(1)
    parser.add_argument("--model", default="gemma3_270m", help="a conf/model option (default gemma3_270m)")
    parser.add_argument("--scale", default="cpu", help="the scale whose micro-batches are timed (conf/scale; default cpu)")
    parser.add_argument("--mixture", default="multilingual_ner", help="the mixture they come from (conf/mixture; default multilingual_ner)")
    parser.add_argument("--data-root", help="XTREME-UP data root (default: the scale's data.root, e.g. FLIX_DATA_ROOT)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run config override for the timed micro-batches, repeatable (e.g. scale.packing=false: padded rows)",
    )
    parser.add_argument("--gen-batch", type=positive, default=16, help="prompts per generation batch, one combination each (default 16)")
    parser.add_argument("--gen-seq", type=positive, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--new-tokens", type=positive, default=16, help="greedy tokens per prompt (default 16)")
    parser.add_argument("--memory-scale", default="mini", help="scale whose micro-batch peak memory is measured; 'none' skips it")
    parser.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    parser.add_argument(
        "--attribute",
        type=options.at_least(0),
        default=3,
        metavar="N",
        help="profiled steps per adapter case that split its time into the adapters' own work and the frozen rest (CPU; default 3, 0 skips)",
    )
    parser.add_argument(
        "--bf16",
        choices=("auto", "true", "false"),
        default="auto",
        help="bf16 autocast for every case: auto (on CUDA only, as training does) | true | false",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rescore",
        type=Path,
        metavar="JSON",
        help="print a saved report with its targets checked by this code (and write it to --out, if given); runs nothing",
    )
    parser.add_argument("--probe-memory", nargs=3, type=int, metavar=("BATCH", "PROMPT", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes: list[int] = []
    if not args.rescore:  # a saved report is only checked again: nothing runs
        sizes = options.feature_counts(parser, args.features, 2 * TASKS, f"{TASKS} tasks and at least as many languages")
    from benchmarks.model_run import run  # torch and the models load only now

    return run(args, sizes)


if __name__ == "__main__":
    sys.exit(main())
