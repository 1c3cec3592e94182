"""Find finished and failed runs under a runs root and pick the ones a table cell needs.

A run directory holds `results.json` (written by flix.train.run) or, when it failed,
`failed.json`. A failed run is identified from failed.json's own keys (`method`,
`mixture`, `seed`, `scale`, `dropout`, `lang_rank` or a `config` like results.json's),
else from Hydra's `.hydra/config.yaml` beside it, else from the directory name that
conf/train.yaml gives runs (`<mixture>/<method>-drop<p>-rank<rank>-seed<n>-<hash>`); its
reason is the first line of the first of `error`, `reason`, `message`, `exception`
(flix.train writes `error` and `traceback`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RESULTS, FAILED = "results.json", "failed.json"
DEFAULT_DROPOUT = 0.7
PAPER_RANK = None  # config rank.lang null: the paper's ranks for the mixture kind
# Feature dropout only changes methods that have features; the LoRA baselines ignore it.
DROPOUT_METHODS = ("flix", "flix_shared")
_DIR_NAME = re.compile(r"^(?P<method>\w+?)-drop(?P<dropout>[0-9.]+)-(?:lang|rank)(?P<rank>\w+?)-seed(?P<seed>\d+)(?:-\w+)?$")
_REASON_KEYS = ("error", "reason", "message", "exception")


@dataclass
class Run:
    """One run directory: its identity, and either its results or why it failed."""

    path: Path
    method: str | None
    mixture: str | None
    seed: int | None
    scale: str | None
    dropout: float | None
    lang_rank: int | None
    results: dict | None = None
    dropout_mode: str = "independent"
    failure: str | None = None

    @property
    def eval_sets(self) -> dict:
        return (self.results or {}).get("eval_sets") or {}


@dataclass(frozen=True)
class Selection:
    """Which runs make one cell: method and mixture, plus the two ablated settings."""

    method: str
    mixture: str
    dropout: float = DEFAULT_DROPOUT
    lang_ranks: tuple = (PAPER_RANK,)
    dropout_mode: str = "independent"

    def matches(self, run: Run) -> bool:
        if (run.method, run.mixture) != (self.method, self.mixture) or run.lang_rank not in self.lang_ranks:
            return False
        if self.method not in DROPOUT_METHODS:
            return True
        return run.dropout is not None and math.isclose(run.dropout, self.dropout) and run.dropout_mode == self.dropout_mode

    def describe(self) -> str:
        ranks = " or ".join("the paper's ranks" if r is None else f"language rank {r}" for r in self.lang_ranks)
        mode = "" if self.dropout_mode == "independent" else f" {self.dropout_mode}"
        dropout = f"dropout {self.dropout:g}{mode}, " if self.method in DROPOUT_METHODS else ""
        return f"{self.method} on {self.mixture} ({dropout}{ranks})"


@dataclass
class RunIndex:
    """All runs of one scale; `skipped` lists runs of other scales found under the root."""

    root: Path
    runs: list[Run] = field(default_factory=list)
    skipped: list[Run] = field(default_factory=list)

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.results is not None]

    def select(self, selection: Selection) -> tuple[list[Run], list[Run]]:
        """(finished, failed) runs matching `selection`, ordered by seed."""
        matching = sorted((r for r in self.runs if selection.matches(r)), key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
        return [r for r in matching if r.results is not None], [r for r in matching if r.results is None]


def _rank(value) -> int | None:
    return None if value in (None, "paper", "null") else int(value)


def _from_config(config: dict) -> dict:
    """Identity keys from a resolved (results.json) or raw (Hydra) train config."""
    def name(key):
        value = config.get(key)
        return value.get("name") if isinstance(value, dict) else value

    rank = config.get("rank") or {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    return {
        "method": name("method"),
        "mixture": name("mixture"),
        "seed": config.get("seed"),
        "scale": name("scale"),
        "dropout": config.get("dropout"),
        "lang_rank": rank.get("lang") if isinstance(rank, dict) else rank,
        "dropout_mode": train.get("dropout_mode"),
    }


def _from_dir_name(path: Path) -> dict:
    match = _DIR_NAME.match(path.name)
    if not match:
        return {"mixture": path.parent.name}
    return {
        "method": match["method"],
        "mixture": path.parent.name,
        "seed": match["seed"],
        "dropout": match["dropout"],
        "lang_rank": match["rank"],
    }


def _make_run(path: Path, known: dict, **body) -> Run:
    dropout, seed = known.get("dropout"), known.get("seed")
    return Run(
        path=path,
        method=known.get("method"),
        mixture=known.get("mixture"),
        seed=None if seed is None else int(seed),
        scale=known.get("scale"),
        dropout=None if dropout is None else float(dropout),
        lang_rank=_rank(known.get("lang_rank")),
        dropout_mode=known.get("dropout_mode") or "independent",
        **body,
    )


def read_results(path: Path) -> Run:
    results = json.loads(path.read_text())
    known = _from_config(results.get("config") or {})
    known.update({k: results[k] for k in ("method", "mixture", "seed", "scale") if results.get(k) is not None})
    return _make_run(path.parent, known, results=results)


def read_failure(path: Path) -> Run:
    """A failed run: identity from the best source available, never a crash on odd files."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        data = {"error": f"unreadable failed.json ({error})"}
    data = data if isinstance(data, dict) else {"error": str(data)}
    known = _from_dir_name(path.parent)
    hydra = path.parent / ".hydra" / "config.yaml"
    if hydra.is_file():
        known.update({k: v for k, v in _from_config(yaml.safe_load(hydra.read_text()) or {}).items() if v is not None})
    known.update({k: v for k, v in _from_config(data.get("config") or {}).items() if v is not None})
    known.update({k: data[k] for k in ("method", "mixture", "seed", "scale", "dropout", "lang_rank") if data.get(k) is not None})
    reason = next((str(data[k]).strip() for k in _REASON_KEYS if str(data.get(k) or "").strip()), "no reason recorded")
    return _make_run(path.parent, known, failure=reason.splitlines()[0])


def collect(root: str | Path, scale: str | None = None) -> RunIndex:
    """Every run under `root` (any depth). A directory with results.json counts as
    finished even if an older failed.json is still there (the rerun succeeded)."""
    root = Path(root)
    runs = [read_results(p) for p in sorted(root.rglob(RESULTS))]
    done = {r.path for r in runs}
    runs += [read_failure(p) for p in sorted(root.rglob(FAILED)) if p.parent not in done]
    runs = [r for r in runs if r.results is None or ("method" in r.results and "eval_sets" in r.results)]
    if scale is None:
        return RunIndex(root, runs)
    keep = [r for r in runs if r.scale in (None, scale)]
    return RunIndex(root, keep, [r for r in runs if r.scale not in (None, scale)])
