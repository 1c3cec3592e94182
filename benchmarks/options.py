"""The options every benchmark takes, declared once: --out, --repeats, --warmup, --features, --threads."""

from __future__ import annotations

import argparse
from pathlib import Path

# Tasks in benchmarks.model_cases' Gemma feature spaces (a count D needs as many languages).
GEMMA_TASKS = 4


def at_least(minimum: int):
    """An argparse type: an int >= minimum, else a usage error that names the option."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse's message for a non-number: "invalid int value"
    return parse


def parser(prog: str, doc: str, *, out: Path | None, out_help: str, repeats: int, warmup: int, features: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser (description: its docstring's first paragraph) with the shared
    options and their defaults (--features only where `features` is given)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=out, help=out_help)
    p.add_argument("--repeats", type=at_least(1), default=repeats, help=f"timed rounds; each figure is a median over them (default {repeats})")
    p.add_argument("--warmup", type=at_least(0), default=warmup, help=f"untimed rounds first (default {warmup})")
    if features is not None:
        p.add_argument("--features", default=features, help=f"FLix feature counts D, comma-separated (default {features})")
    p.add_argument("--threads", type=at_least(1), default=2, help="torch CPU threads (default 2)")
    return p


def feature_counts(parser: argparse.ArgumentParser, text: str, minimum: int, why: str) -> list[int]:
    """--features "8,64,..." as sorted distinct ints, each >= minimum (else a usage error)."""
    try:
        sizes = sorted({int(d) for d in text.split(",")})
    except ValueError:
        parser.error(f"--features must be comma-separated integers, got {text!r}")
    if sizes[0] < minimum:
        parser.error(f"every --features count must be >= {minimum} ({why})")
    return sizes
