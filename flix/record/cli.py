"""`flix records RUNS DEST`: copy runs' records (no weights, no checkpoints) elsewhere,
keeping their layout, so that a report renders from them alone (reports/<scale>/runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flix.record.copy import copy_records


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
    try:
        copied = copy_records(args.runs, args.dest)
    except OSError as err:  # a full disk (flix.io.WriteError names the file): the records copied before stay
        print(f"flix records: {err}", file=sys.stderr)
        return 1
    print(f"flix records: {len(copied)} run record(s) copied to {args.dest}", file=sys.stderr)
    return 0 if copied else 1
