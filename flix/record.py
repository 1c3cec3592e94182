"""What a run records, and the arithmetic over it: results.json (a finished run) and
failed.json (a failed one), both carrying the resolved config the report identifies
runs by; set averages, the selection metric, the `single` merge, per-language tables.

results.json keys: the run's identity (method, mixture, study, scale, seed, model,
data_root (the data folder's name), variant), `eval_sets` ({name: task, langs,
zero_shot, and the validation, test, validation_nll, test_nll averages}), `validation`
and `test` ({task: {lang: score}}, the paper's metric) and `validation_nll` and
`test_nll` ({task: {lang: mean target NLL}}) of the kept checkpoint; per test example,
in the same order: `test_ids`, `test_stats` (`flix.metrics.example_stats`) and
`test_example_nll`; `selection` (what picked the checkpoint: `by` and the validation
`sets`), best_step, best_validation_average, best_validation_nll, history,
train_loss, featureless_fraction, trainable_parameters, flix (the FLixConfig),
train_seconds, time_seconds, commit, config_hash and config (data.root as the folder's
name: records carry no machine's paths).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

from flix.data.mixtures import EvalSet, Mixture
from flix.io import atomic_write_json, atomic_write_text

RESULTS = "results.json"
FAILED = "failed.json"
SPLITS = ("validation", "test")
SCORE_KEYS = ("validation", "test", "validation_nll", "test_nll")  # {task: {lang: value}}
EXAMPLE_KEYS = ("test_ids", "test_stats", "test_example_nll")  # {task: {lang: [one entry per test example]}}


def git_commit(where: Path = Path(__file__).parent) -> str | None:
    """The commit of this code, "+dirty" when tracked files differ from it (None outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=where, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


# Read once, when this code is loaded: a sweep runs many jobs in one process, and HEAD may
# move while it does; results must name the code that made them.
CODE_COMMIT = git_commit()


def identity(config: dict) -> dict:
    """Who a run is, from its resolved config (results.json and failed.json `config`):
    the keys the report selects runs by."""

    def name(key):
        value = config.get(key)
        return value.get("name") if isinstance(value, dict) else value

    rank, train = config.get("rank") or {}, config.get("train") or {}
    return {
        "method": name("method"),
        "mixture": name("mixture"),
        "scale": name("scale"),
        "seed": config.get("seed"),
        "dropout": config.get("dropout"),
        "lang_rank": rank.get("lang"),  # None: the method's ranks for the mixture kind
        "dropout_mode": train.get("dropout_mode") or "independent",
    }


def set_averages(scores: dict[str, dict[str, float]], eval_sets: list[EvalSet]) -> dict[str, float]:
    """Average over each evaluation set's languages (a table column)."""
    out = {}
    for s in eval_sets:
        values = [scores[s.task][lang] for lang in s.langs if lang in scores.get(s.task, {})]
        if values:
            out[s.name] = float(np.mean(values))
    return out


def selection_metric(scores: dict[str, dict[str, float]], selection_sets: list[EvalSet]) -> float:
    """The paper's model selection: the average over the mixture's selection sets
    (`Mixture.selection_sets`: languages, or tasks) of the paper's metric, or of the NLL."""
    return float(np.mean(list(set_averages(scores, selection_sets).values())))


SELECT_BY = ("metric", "nll")


def selection_key(average: float, nll: float, select_by: str) -> tuple[float, ...]:
    """How validations rank (larger is better; a tie keeps the earlier step). `metric`:
    the paper's average validation metric, ties (all-zero validations included) broken by
    the lower average target NLL; `nll` (train.select_by=nll): the lower NLL alone."""
    if select_by not in SELECT_BY:
        raise ValueError(f"train.select_by={select_by!r}: use one of {', '.join(SELECT_BY)}")
    return (-nll,) if select_by == "nll" else (average, -nll)


def selection_entry(select_by: str, selection_sets: list[EvalSet]) -> dict:
    """results.json `selection`: what picked the kept checkpoint."""
    return {"by": select_by, "sets": [{"name": s.name, "task": s.task, "langs": list(s.langs)} for s in selection_sets]}


def eval_set_entries(eval_sets: list[EvalSet], body: dict) -> dict:
    """results.json `eval_sets`: each set's definition and its averages of SCORE_KEYS."""
    return {
        s.name: {"task": s.task, "langs": list(s.langs), "zero_shot": s.zero_shot}
        | {key: set_averages(body[key], [s]).get(s.name) for key in SCORE_KEYS if key in body}
        for s in eval_sets
    }


def per_language_table(scores: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Rows languages, columns tasks."""
    frame = pd.DataFrame(scores)
    frame.index.name = "language"
    return frame.sort_index()


def merge_datasets(parts: list[dict]) -> dict:
    """One results body from the per-dataset bodies of the `single` method: scores merged,
    per-dataset training records keyed TASK.LANG, parameters and seconds summed."""
    per_dataset = ("best_step", "best_validation_nll", "selection", "history", "train_loss", "featureless_fraction")
    nested = (*SCORE_KEYS, *EXAMPLE_KEYS)
    merged = {**{k: {} for k in nested}, **{k: {} for k in per_dataset}, "trainable_parameters": 0, "train_seconds": 0.0}
    for part in parts:
        for key in nested:
            for task, langs in part[key].items():
                merged[key].setdefault(task, {}).update(langs)
        ((task, langs),) = part["test"].items()
        key = f"{task}.{next(iter(langs))}"
        for k in per_dataset:
            merged[k][key] = part[k]
        merged["trainable_parameters"] += part["trainable_parameters"]
        merged["train_seconds"] += part["train_seconds"]
    merged["flix"] = parts[0]["flix"] if parts else {}
    return merged


def portable(config: dict) -> dict:
    """A resolved config as records keep it: the data root by its folder's name, so that
    committed records name no machine's paths (the run's directory hash used the full path)."""
    data = config.get("data")
    if isinstance(data, dict) and data.get("root"):
        return {**config, "data": {**data, "root": Path(str(data["root"])).name}}
    return config


def write_results(run_dir: Path, mixture: Mixture, body: dict, head: dict, tail: dict) -> dict:
    """results.json (head, eval_sets, body, tail, in that key order) and tables/<split>.csv."""
    results = {**head, "eval_sets": eval_set_entries(mixture.eval_sets, body), **body, **tail}
    for split in SPLITS:
        atomic_write_text(run_dir / "tables" / f"{split}.csv", per_language_table(results[split]).to_csv(float_format="%.2f"))
    atomic_write_json(run_dir / RESULTS, results)
    return results


def write_failure(run_dir: Path, err: BaseException, config: dict) -> None:
    """failed.json: the error, its traceback and the resolved config (the run's identity)."""
    atomic_write_json(run_dir / FAILED, {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(), "config": portable(config)})


def summary_line(results: dict) -> str:
    sets = ", ".join(f"{k} {v['test']:.1f}" for k, v in results["eval_sets"].items() if v["test"] is not None)
    return f"[flix] {results['method']} on {results['mixture']} ({results['scale']}): test {sets}; best step {results['best_step']}; {results['time_seconds']:.0f}s"


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
