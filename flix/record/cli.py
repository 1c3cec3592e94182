"""`flix records RUNS DEST`: copy runs' records (no weights, no checkpoints) elsewhere,
keeping their layout, so that a report renders from them alone (reports/<scale>/runs)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from flix.record.write import FAILED, RESULTS

# A run's record: what a report, a re-score or a reader needs, and nothing heavy (no
# weights, no checkpoints). Committed under reports/<scale>/runs/ for real runs.
RECORD = (RESULTS, FAILED, "train.log", "predictions", "tables", ".hydra/overrides.yaml")


def copy_records(runs_root: Path, dest: Path) -> list[Path]:
    """Copy the record of every run under `runs_root` (a folder with results.json or
    failed.json) to the same relative folder under `dest`; returns the copied run folders."""
    runs_root, dest = Path(runs_root), Path(dest)
    runs = sorted({p.parent for name in (RESULTS, FAILED) for p in runs_root.rglob(name)})
    for run_dir in runs:
        target = dest / run_dir.relative_to(runs_root)
        for name in RECORD:
            source = run_dir / name
            if source.is_dir():
                shutil.copytree(source, target / name, dirs_exist_ok=True)
            elif source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
    return [dest / r.relative_to(runs_root) for r in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flix records",
        description="Copy runs' records (results.json, failed.json, train.log, predictions/, tables/, the overrides; "
        "no weights or checkpoints) to another folder, keeping their layout: e.g. "
        "`flix records runs/cpu reports/cpu/runs`, then `flix report --runs reports/cpu/runs` renders from them alone.",
    )
    parser.add_argument("runs", type=Path, help="a runs root (e.g. runs/cpu) or one run directory")
    parser.add_argument("dest", type=Path, help="where the records go (e.g. reports/cpu/runs)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs}: no such directory")
    copied = copy_records(args.runs, args.dest)
    print(f"flix records: {len(copied)} run record(s) copied to {args.dest}", file=sys.stderr)
    return 0 if copied else 1
