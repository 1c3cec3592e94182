"""`flix bench`: benchmarks that print figures (speed targets live here, not in unit tests).

flix bench adapters   FLix's step and mixed-batch inference time against LoRA
flix bench model      FLix on a real pretrained model (Gemma 3 270M): step, generation, memory
flix bench layer      one adapted projection at a real width: tight ratios for layer changes
flix bench run        the expected wall time of one training run on this machine
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {"adapters": "flix.bench.adapters", "model": "flix.bench.model", "layer": "flix.bench.layer", "run": "flix.bench.run"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        print(f"flix bench: name a benchmark ({', '.join(BENCHMARKS)})\n\n{__doc__.strip()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0)
