"""How long each command line takes to answer --help (target: under 2 s), a fresh process
each time, interleaved across commands; prints the median and the slowest of the rounds.

tests/test_startup.py checks the property behind it (no --help loads torch, transformers
or pandas); this prints the figure, which depends on the machine and its load.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from flix.io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 2.0
COMMANDS = [
    ["-m", "flix.train", "--help"],
    ["-m", "flix", "--help"],
    *[["-m", "flix", name, "--help"] for name in ("study", "report", "records", "data", "score", "offline", "export", "serve", "bench", "launch")],
    ["-m", "flix", "bench", "run", "--help"],
    *[["-m", f"benchmarks.{name}", "--help"] for name in ("adapters", "model", "layer", "sharded_memory", "quantized_memory")],
]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds over every command (default 5)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    seconds: dict[str, list[float]] = {" ".join(c[1:]): [] for c in COMMANDS}
    for _ in range(args.repeats):
        for command in COMMANDS:  # interleaved: a burst of load hits every command alike
            started = time.perf_counter()
            subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, check=True)
            seconds[" ".join(command[1:])].append(time.perf_counter() - started)
    print(f"--help start-up, {args.repeats} rounds (target < {TARGET_S:g} s)")
    rows = {name: {"median_s": statistics.median(t), "max_s": max(t)} for name, t in seconds.items()}
    for name, row in rows.items():
        verdict = "ok" if row["median_s"] < TARGET_S else "SLOW"
        print(f"  {name:<24} median {row['median_s']:5.2f} s   max {row['max_s']:5.2f} s   {verdict}")
    if args.out:
        atomic_write_json(args.out, {"target_s": TARGET_S, "repeats": args.repeats, "commands": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
