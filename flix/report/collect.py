"""Find finished and failed runs under a runs root and pick the ones a table cell needs.

Everything comes from what runs record (flix.record): results.json, or failed.json
with the error and the resolved config; a run is identified by that config alone.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

from flix.pipeline.methods import load_method
from flix.pipeline.run_config import CONF, setting
from flix.record import FAILED, RESULTS, identity

DEFAULT_DROPOUT = float(OmegaConf.load(CONF / "train.yaml").dropout)
PAPER_RANK = None  # config rank.lang null: the method's ranks for the mixture kind


@dataclass
class RunRecord:
    """One run directory: its identity, and either its results or why it failed."""

    path: Path
    method: str | None = None
    mixture: str | None = None
    seed: int | None = None
    scale: str | None = None
    dropout: float | None = None
    lang_rank: int | None = None
    dropout_mode: str = "independent"
    results: dict | None = None
    failure: str | None = None
    setting: dict = field(default_factory=dict)  # flix.pipeline.run_config.setting: what must agree across seeds

    @property
    def eval_sets(self) -> dict:
        return (self.results or {}).get("eval_sets") or {}


def has_features(method: str) -> bool:
    """Whether feature dropout changes the method (the LoRA baselines have no features)."""
    return bool(load_method(method)["features"])


@dataclass(frozen=True)
class Selection:
    """Which runs make one cell: method and mixture, plus the two ablated settings."""

    method: str
    mixture: str
    dropout: float = DEFAULT_DROPOUT
    lang_ranks: tuple = (PAPER_RANK,)
    dropout_mode: str = "independent"

    def matches(self, run: RunRecord) -> bool:
        if (run.method, run.mixture) != (self.method, self.mixture) or run.lang_rank not in self.lang_ranks:
            return False
        if not has_features(self.method):
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

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.results is not None]

    def select(self, selection: Selection) -> Selected:
        """The runs matching `selection`, ordered by seed; finished runs of different
        settings are never averaged: they come back as a conflict, with none finished."""
        matching = sorted((r for r in self.runs if selection.matches(r)), key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
        finished = [r for r in matching if r.results is not None]
        failed = [r for r in matching if r.results is None]
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


def _record(path: Path, config: dict, data_root: str | None = None, **body) -> RunRecord:
    known = identity(config)
    seed, dropout, rank = known["seed"], known["dropout"], known["lang_rank"]
    return RunRecord(
        path=path,
        method=known["method"],
        mixture=known["mixture"],
        seed=None if seed is None else int(seed),
        scale=known["scale"],
        dropout=None if dropout is None else float(dropout),
        lang_rank=None if rank is None else int(rank),
        dropout_mode=known["dropout_mode"],
        setting=setting(config) | ({"data_root": json.dumps(data_root)} if data_root else {}),
        **body,
    )


# what reading a damaged or hand-edited record can raise: the report names and skips it
READ_ERRORS = (OSError, ValueError, TypeError, AttributeError, RecursionError)
RUN_NAME = re.compile(r"^(\w+)-drop")  # conf/train.yaml run_name: METHOD-drop...


def read_results(path: Path) -> RunRecord:
    """A finished run; ValueError if the file is not a flix results.json the tables can
    trust: scores that are not finite numbers, or a method that its FLix block or
    directory name contradicts (an edited record would fill another method's row)."""
    results = json.loads(path.read_text())
    if not isinstance(results, dict):
        raise ValueError("not a JSON object")
    record = _record(path.parent, results.get("config") or {}, results.get("data_root"), results=results)
    if "method" in results and "eval_sets" in results:  # else not a flix run's: collect() leaves it out
        _check_scores(results)
        _check_method(record, results)
    return record


def _check_scores(results: dict) -> None:
    for split in ("validation", "test"):
        scores = results.get(split)
        if not isinstance(scores, dict) or not all(isinstance(langs, dict) for langs in scores.values()):
            raise ValueError(f"{split} is not a {{task: {{language: score}}}} object")
        for task, langs in scores.items():
            for lang, score in langs.items():
                if not _finite(score):
                    raise ValueError(f"{split} score of {task}/{lang} is {score!r}, not a finite number")
    sets = results["eval_sets"]
    if not isinstance(sets, dict) or not all(isinstance(s, dict) and isinstance(s.get("task"), str) for s in sets.values()):
        raise ValueError("eval_sets is not a {name: {task: ..., ...}} object")
    for name, entry in sets.items():
        for key, value in entry.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"eval_sets {name} {key} is {value!r}, not a finite number")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_method(record: RunRecord, results: dict) -> None:
    method = load_method(record.method)  # ValueError for a method conf/method/ does not have
    if results["method"] != record.method:
        raise ValueError(f"method {results['method']!r} but its config says {record.method!r}")
    named = RUN_NAME.match(record.path.name)
    if named and named.group(1) != record.method:
        raise ValueError(f"method {record.method!r} in a run directory named for {named.group(1)!r}")
    flix = results.get("flix")
    if isinstance(flix, dict):  # what was trained: feature adapters, an always-on one, or both
        trained = (bool(flix.get("features")), bool(flix.get("shared_rank")))
        expected = (bool(method["features"]), method["shared_rank"] != 0)
        if trained != expected:
            raise ValueError(
                f"method {record.method!r} but its FLix block has features {flix.get('features')} and shared_rank {flix.get('shared_rank')}"
            )


def read_failure(path: Path) -> RunRecord:
    """A failed run, never a crash on odd files: without a config it matches no cell."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        data = {"error": f"unreadable {FAILED} ({error})"}
    data = data if isinstance(data, dict) else {"error": str(data)}
    reason = str(data.get("error") or "").strip() or "no reason recorded"
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    return _record(path.parent, config, failure=reason.splitlines()[0])


def run_files(root: Path, name: str) -> list[Path]:
    """Every `name` file under root at any depth, following symlinked folders as the study
    does (it finds a run through its path), each real folder once."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
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
    named in `unreadable` and skipped: the rest renders."""
    root = Path(root)
    runs, unreadable = [], []
    for path in run_files(root, RESULTS):
        try:
            runs.append(read_results(path))
        except READ_ERRORS as error:  # truncated, corrupted, edited
            unreadable.append((path, f"{type(error).__name__}: {error}"))
    done = {r.path for r in runs} | {p.parent for p, _ in unreadable}
    for path in run_files(root, FAILED):
        try:
            if path.parent not in done:
                runs.append(read_failure(path))
        except READ_ERRORS as error:  # e.g. the failure of seed=abc
            unreadable.append((path, f"{type(error).__name__}: {error}"))
    # a results.json without these is not a flix run's
    runs = [r for r in runs if r.results is None or ("method" in r.results and "eval_sets" in r.results)]
    if scale is None:
        return RunIndex(root, runs, unreadable=unreadable)
    keep = [r for r in runs if r.scale in (None, scale)]
    return RunIndex(root, keep, [r for r in runs if r.scale not in (None, scale)], unreadable)
