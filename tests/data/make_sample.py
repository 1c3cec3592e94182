"""Regenerate tests/data/xtreme_up_sample/ from the real mini copy, deterministically.

    python tests/data/make_sample.py [SOURCE]   # default: $FLIX_DATA_ROOT, else ../shared/data/xtreme_up_mini

The sample holds every file the smoke scale's mixtures read (two languages per task,
conf/scale/smoke.yaml) plus the few datasets the tests read by name, SHAPE lines of
each split chosen with seed 0 (flix.data.subsample.scale_copy). Its README stays.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from flix.data.examples import TASKS
from flix.data.subsample import scale_copy

HERE = Path(__file__).resolve().parent
OUT = HERE / "xtreme_up_sample"
SHAPE = {"train": 16, "validation": 8, "test": 8}
EXTRA = {("translation", "sw")}  # read by name in tests


def main(argv: list[str]) -> int:
    source = Path(argv[0] if argv else os.environ.get("FLIX_DATA_ROOT") or HERE.parents[2] / "shared" / "data" / "xtreme_up_mini")
    for task in TASKS:  # a dataset dropped from the sample must not linger (README.md stays)
        shutil.rmtree(OUT / task, ignore_errors=True)
    counts = scale_copy(source, OUT, "smoke", seed=0, per_split=SHAPE, extra=EXTRA, progress=False)
    print(f"wrote {sum(counts.values())} examples in {len(counts)} files to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
