"""`flix compare A B`: are two runs roots' records the same runs with the same results?

The check a change that should not move any number needs (a refactor, a faster kernel, a
new default that is off): run the same study before and after, then compare. Runs pair by
their folder (setting and config hash); in each pair results.json must agree in every key
but the times, the commit and the versions, and the predictions and tables must be equal
byte for byte. Numbers agree exactly unless --rtol allows a relative difference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from flix.io import read_regular_text
from flix.record.copy import find_runs

# How and where a run ran, not what it computed.
IGNORED = frozenset({"time_seconds", "train_seconds", "commit", "versions"})
COMPARED_FOLDERS = ("predictions", "tables")


def compare(a: Path, b: Path, rtol: float = 0.0, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every difference between the runs under a and under b, one line each (empty: the same);
    `ignore`: results.json keys (dotted, e.g. config.scale.packing) a change added on purpose."""
    runs_a = {run.relative_to(a): run for run in find_runs(a)}
    runs_b = {run.relative_to(b): run for run in find_runs(b)}
    lines = [f"{name}: only under {a}" for name in sorted(runs_a.keys() - runs_b.keys())]
    lines += [f"{name}: only under {b}" for name in sorted(runs_b.keys() - runs_a.keys())]
    for name in sorted(runs_a.keys() & runs_b.keys()):
        ra, rb = runs_a[name], runs_b[name]
        finished = [(r / "results.json").is_file() for r in (ra, rb)]
        if not all(finished):
            lines += [] if finished == [False, False] else [f"{name}: failed under {b if finished[0] else a} only"]
            continue
        results_a = json.loads(read_regular_text(ra / "results.json"))
        results_b = json.loads(read_regular_text(rb / "results.json"))
        found = _differences(results_a, results_b, "", rtol)
        lines += [f"{name}/results.json: {d}" for d in found if d.split(":")[0].split(" ")[0] not in ignore]
        lines += [f"{name}/{f}" for f in _different_files(ra, rb)]
    return lines


def _differences(x, y, key: str, rtol: float) -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        out = []
        for k in sorted(x.keys() | y.keys()):
            if k in IGNORED and not key:
                continue
            where = f"{key}.{k}" if key else k
            if k not in x or k not in y:
                out.append(f"{where} only in {'the first' if k in x else 'the second'}")
            else:
                out += _differences(x[k], y[k], where, rtol)
        return out
    if isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            return [f"{key}: {len(x)} items vs {len(y)}"]
        found = [d for i, (u, v) in enumerate(zip(x, y)) for d in _differences(u, v, f"{key}[{i}]", rtol)]
        return found[:1] + ([f"{key}: {len(found) - 1} more items differ"] if len(found) > 1 else [])
    if _numbers(x, y):
        same = x == y or (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rtol, abs_tol=0.0)
        return [] if same else [f"{key}: {x!r} vs {y!r}"]
    return [] if x == y else [f"{key}: {json.dumps(x)[:80]} vs {json.dumps(y)[:80]}"]


def _numbers(x, y) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))


def _different_files(ra: Path, rb: Path) -> list[str]:
    out = []
    for folder in COMPARED_FOLDERS:
        files_a = {p.relative_to(ra) for p in (ra / folder).rglob("*") if p.is_file()}
        files_b = {p.relative_to(rb) for p in (rb / folder).rglob("*") if p.is_file()}
        out += [f"{p}: only in one" for p in sorted(files_a ^ files_b)]
        out += [f"{p}: differs" for p in sorted(files_a & files_b) if (ra / p).read_bytes() != (rb / p).read_bytes()]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flix compare",
        description="Compare two runs roots (or records copied by `flix records`): the same runs, the same results.json "
        "except times, commit and versions, the same predictions and tables. Exit 0 when they agree, 1 with one line per difference.",
    )
    parser.add_argument("a", type=Path, help="a runs root, e.g. runs/smoke before a change")
    parser.add_argument("b", type=Path, help="the other, e.g. the same study after it")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for numbers (default 0: exactly equal)")
    parser.add_argument(
        "--ignore", action="append", default=[], metavar="KEY", help="a results.json key to leave out, dotted (e.g. a setting the change added)"
    )
    args = parser.parse_args(argv)
    for root in (args.a, args.b):
        if not root.is_dir():
            parser.error(f"{root}: no such directory")
    differences = compare(args.a, args.b, args.rtol, tuple(args.ignore))
    for line in differences:
        print(line)
    pairs = len({r.relative_to(args.a) for r in find_runs(args.a)} & {r.relative_to(args.b) for r in find_runs(args.b)})
    verdict = "the same" if not differences else f"{len(differences)} difference(s)"
    print(f"flix compare: {pairs} run(s) in both; {verdict}", file=sys.stderr)
    return 1 if differences else 0
