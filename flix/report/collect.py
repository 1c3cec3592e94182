"""Find finished and failed runs under a runs root and pick the ones a table cell needs.

Everything comes from what runs record (flix.results): results.json, or failed.json
with the error and the resolved config; a run is identified by that config alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from flix.config import CONF
from flix.methods import load_method
from flix.results import FAILED, RESULTS, identity

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

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.results is not None]

    def select(self, selection: Selection) -> tuple[list[RunRecord], list[RunRecord]]:
        """(finished, failed) runs matching `selection`, ordered by seed."""
        matching = sorted((r for r in self.runs if selection.matches(r)), key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
        return [r for r in matching if r.results is not None], [r for r in matching if r.results is None]


def _record(path: Path, config: dict, **body) -> RunRecord:
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
        **body,
    )


def read_results(path: Path) -> RunRecord:
    results = json.loads(path.read_text())
    return _record(path.parent, results.get("config") or {}, results=results)


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


def collect(root: str | Path, scale: str | None = None) -> RunIndex:
    """Every run under `root` (any depth). A directory with results.json counts as
    finished even if an older failed.json is still there (the rerun succeeded)."""
    root = Path(root)
    runs = [read_results(p) for p in sorted(root.rglob(RESULTS))]
    done = {r.path for r in runs}
    runs += [read_failure(p) for p in sorted(root.rglob(FAILED)) if p.parent not in done]
    # a results.json without these is not a flix run's
    runs = [r for r in runs if r.results is None or ("method" in r.results and "eval_sets" in r.results)]
    if scale is None:
        return RunIndex(root, runs)
    keep = [r for r in runs if r.scale in (None, scale)]
    return RunIndex(root, keep, [r for r in runs if r.scale not in (None, scale)])
