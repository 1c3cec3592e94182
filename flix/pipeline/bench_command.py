"""`flix bench`: the expected time of one run here, or the repository's speed benchmarks.

flix bench run        the expected wall time of one training run on this machine (flix/pipeline/estimate.py)
flix bench adapters   FLix's step and mixed-batch inference time against LoRA (benchmarks/adapters.py)
flix bench model      FLix on a real pretrained model (Gemma 3 270M): step, generation, memory (benchmarks/model.py)
flix bench layer      one adapted projection at a real width: tight ratios for layer changes (benchmarks/layer.py)
flix bench loss       the output layer and loss at labelled rows, flix.loss against full logits (benchmarks/loss.py)

The last four live in the repository's top-level benchmarks/, not in the package: they
need a checkout, and run as `python -m benchmarks.NAME` in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = ("adapters", "model", "layer", "loss")
REPO = Path(__file__).resolve().parents[2]  # the checkout, when flix is installed from one (pip install -e)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if argv[:1] == ["run"]:
        from flix.pipeline.estimate import main as estimate

        return estimate(argv[1:])
    if not argv or argv[0] not in BENCHMARKS:
        print(f"flix bench: name a benchmark (run, {', '.join(BENCHMARKS)})\n\n{__doc__.strip()}", file=sys.stderr)
        return 2
    return run_benchmark(argv[0], argv[1:])


def run_benchmark(name: str, args: list[str], repo: Path = REPO) -> int:
    """`python -m benchmarks.NAME ARGS` with the checkout importable, in the caller's
    directory (so that a relative --out lands where the caller means)."""
    if not (repo / "benchmarks" / f"{name}.py").is_file():
        print(
            f"flix bench {name}: no benchmarks/ folder at {repo}: the benchmarks run from a repository checkout (pip install -e . there)",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], env=env).returncode
