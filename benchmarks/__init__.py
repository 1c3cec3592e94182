"""FLix's speed benchmarks: they print figures and write JSON reports under reports/bench/
(speed targets live here, not in unit tests). Run from the repository root:

    python -m benchmarks.adapters   FLix's step and mixed-batch inference time against LoRA (small Llama-style model)
    python -m benchmarks.model      FLix on a real pretrained model (Gemma 3 270M): step, generation, memory
    python -m benchmarks.layer      one adapted projection at a real width: tight ratios for layer changes

`flix bench adapters|model|layer ...` runs the same from a checkout; `flix bench run` (the
expected time of one training run) is part of the package (flix/pipeline/estimate.py).

Each NAME.py holds a benchmark's options and docs and parses them before NAME_run.py (the
work) loads torch, so `--help` answers at once. What they share: cases.py (ranks, feature spaces, routes, training steps), timing.py
(interleaved rounds, paired ratios, verdicts), attribute.py (the adapters' own time within
a profiled step) and options.py (the options every benchmark takes). The benchmarks import
flix; nothing in flix imports them.
"""
