"""Find finished and failed runs under a runs root and pick the ones a table cell needs.

Everything comes from what runs record (flix.record): results.json, or failed.json
with the error and the resolved config; a run is identified by that config alone.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from flix.record import FAILED, READ_ERRORS, RESULTS, RunRecord, read_failure, read_results
from flix.report.labels import METHOD_LABELS, TRAINS

PAPER_DROPOUT = 0.7  # the paper's feature dropout p, the control of Table 3 (conf/train.yaml's default; a test checks)
PAPER_RANK = None  # config rank.lang null: the method's ranks for the mixture kind


def has_features(method: str) -> bool:
    """Whether one of the paper's methods has feature adapters (the LoRA baselines have none):
    labels.TRAINS, for a cell that has no run to say."""
    return TRAINS[method][0]


@dataclass(frozen=True)
class Selection:
    """Which runs make one cell: method and mixture, plus the two ablated settings."""

    method: str
    mixture: str
    dropout: float = PAPER_DROPOUT
    lang_ranks: tuple = (PAPER_RANK,)
    dropout_mode: str = "independent"

    def matches(self, run: RunRecord) -> bool:
        if (run.method, run.mixture) != (self.method, self.mixture) or run.lang_rank not in self.lang_ranks:
            return False
        if not (run.features if run.features is not None else has_features(self.method)):  # dropout changes nothing
            return True
        return run.dropout is not None and math.isclose(run.dropout, self.dropout) and run.dropout_mode == self.dropout_mode

    def describe(self) -> str:
        ranks = " or ".join("the paper's ranks" if r is None else f"language rank {r}" for r in self.lang_ranks)
        mode = "" if self.dropout_mode == "independent" else f" {self.dropout_mode}"
        dropout = f"dropout {self.dropout:g}{mode}, " if has_features(self.method) else ""
        return f"{self.method} on {self.mixture} ({dropout}{ranks})"


@dataclass
class RunIndex:
    """All runs of one scale; `skipped` lists runs of other scales found under the root."""

    root: Path
    runs: list[RunRecord] = field(default_factory=list)
    skipped: list[RunRecord] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # records that cannot be read or trusted, and why
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (a copy left out, the record kept)

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.finished]

    def select(self, selection: Selection) -> Selected:
        """The runs matching `selection`, ordered by seed; finished runs of different
        settings are never averaged: they come back as a conflict, with none finished. A
        failed run of a seed that a finished run fills is left out: the cell has that seed
        (e.g. an earlier attempt at another data root), so no note of it stands beside it."""
        matching = sorted((r for r in self.runs if selection.matches(r)), key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
        finished = [r for r in matching if r.finished]
        failed = [r for r in matching if not r.finished and r.seed not in {f.seed for f in finished}]
        conflict = conflict_of(finished)
        return Selected([], failed, conflict) if conflict else Selected(finished, failed, None)


class Selected(NamedTuple):
    finished: list[RunRecord]
    failed: list[RunRecord]
    conflict: str | None  # why the finished runs were not averaged


def conflict_of(runs: list[RunRecord]) -> str | None:
    """The settings (besides the seed) that the runs record differently, if any. A key
    only some runs record (a setting added later) is not a conflict."""
    shared = set.intersection(*(set(r.setting) for r in runs)) if runs else set()
    differ = sorted(key for key in shared if len({r.setting[key] for r in runs}) > 1)
    if not differ:
        return None
    shown = "; ".join(f"{key}: {' vs '.join(sorted({r.setting[key] for r in runs}))}" for key in differ[:3])
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    return f"runs of different settings, not averaged ({shown}{more}); keep one setting under the runs root: {', '.join(str(r.path) for r in runs)}"


RUN_NAME = re.compile(r"^(\w+)-drop")  # conf/train.yaml run_name: METHOD-drop...


def read_run(path: Path) -> RunRecord | None:
    """A finished run the tables can trust (flix.record.read_results, None if not a flix
    run's); ValueError for a method the report does not know, or that its results.json,
    its directory name or what it trained (its FLix block) contradicts: an edited record
    would fill another method's row."""
    run = read_results(path)
    if run is None:
        return None
    if run.method not in TRAINS:
        raise ValueError(f"unknown method {run.method!r}: the report's methods are {', '.join(METHOD_LABELS)} (flix/report/labels.py)")
    if run.named_method != run.method:
        raise ValueError(f"method {run.named_method!r} but its config says {run.method!r}")
    named = RUN_NAME.match(run.path.name)
    if named and named.group(1) != run.method:
        raise ValueError(f"method {run.method!r} in a run directory named for {named.group(1)!r}")
    if run.adapters is not None and run.adapters.kind != TRAINS[run.method]:
        raise ValueError(f"method {run.method!r} but its FLix block has features {run.adapters.features} and shared_rank {run.adapters.shared_rank}")
    return run


def run_files(root: Path, name: str) -> list[Path]:
    """Every `name` file under root at any depth, following symlinked folders as the study
    does (it finds a run through its path), each real folder once."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # temp copies (flix records), .hydra: no runs
        real = os.path.realpath(folder)
        if real in seen:  # a link loop, or a second path to the same runs
            dirs.clear()
            continue
        seen.add(real)
        if name in files:
            found.append(Path(folder) / name)
    return sorted(found)


def collect(root: str | Path, scale: str | None = None) -> RunIndex:
    """Every run under `root` (any depth, through symlinked folders). A directory with
    results.json counts as finished even if an older failed.json is still there (the rerun
    succeeded). A record that cannot be read or trusted, whatever is wrong with it, is
    named in `unreadable` and skipped: the rest renders. Copies of one run count once
    (`duplicates`)."""
    root = Path(root)
    runs, unreadable = [], []
    done = set()
    for path in run_files(root, RESULTS):
        done.add(path.parent)
        try:
            if run := read_run(path):  # None: not a flix run's results.json
                runs.append(run)
        except READ_ERRORS as error:  # truncated, corrupted, edited
            unreadable.append((path, f"{type(error).__name__}: {error}"))
    for path in run_files(root, FAILED):
        try:
            if path.parent not in done:
                runs.append(read_failure(path))
        except READ_ERRORS as error:  # e.g. the failure of seed=abc
            unreadable.append((path, f"{type(error).__name__}: {error}"))
    runs, duplicates = once(runs)
    if scale is None:
        return RunIndex(root, runs, unreadable=unreadable, duplicates=duplicates)
    keep = [r for r in runs if r.scale in (None, scale)]
    return RunIndex(root, keep, [r for r in runs if r.scale not in (None, scale)], unreadable, duplicates)


def once(runs: list[RunRecord]) -> tuple[list[RunRecord], list[tuple[Path, Path]]]:
    """Each finished run once: copies of one run (the same setting and seed, e.g. a records
    folder inside the runs root) would count as more seeds. The first path is kept; the
    others come back as (copy, kept) for a warning."""
    kept: dict[tuple, RunRecord] = {}
    out, duplicates = [], []
    for run in runs:
        key = (run.method, run.mixture, run.seed, tuple(sorted(run.setting.items())))
        if run.finished and key in kept:
            duplicates.append((run.path, kept[key].path))
            continue
        if run.finished:
            kept[key] = run
        out.append(run)
    return out, duplicates
