"""What a run records, and the arithmetic over it: results.json (a finished run) and
failed.json (a failed one), both carrying the resolved config the report identifies
runs by; set averages, the selection metric, the `single` merge, per-language tables.

results.json keys: the run's identity (method, mixture, study, scale, seed, model,
data_root, variant), `eval_sets` ({name: task, langs, zero_shot, validation, test
averages}), `validation` and `test` ({task: {lang: score}}) of the kept checkpoint,
`test_stats` (per-example statistics, `flix.metrics.example_stats`), best_step,
best_validation_average, history, train_loss, featureless_fraction,
trainable_parameters, flix (the FLixConfig), train_seconds, time_seconds, commit,
config_hash and config.
"""

from __future__ import annotations

import subprocess
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

from flix.data.mixtures import EvalSet, Mixture
from flix.io import atomic_write_json, atomic_write_text

RESULTS = "results.json"
FAILED = "failed.json"
SPLITS = ("validation", "test")


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


def selection_metric(scores: dict[str, dict[str, float]], eval_sets: list[EvalSet]) -> float:
    """The paper's model selection: the average over the mixture's supervised sets
    (languages, or tasks); zero-shot sets never pick the checkpoint unless there is nothing else."""
    supervised = [s for s in eval_sets if not s.zero_shot] or eval_sets
    return float(np.mean(list(set_averages(scores, supervised).values())))


def eval_set_entries(eval_sets: list[EvalSet], validation: dict, test: dict) -> dict:
    """results.json `eval_sets`: each set's definition and its split averages."""
    scores = {"validation": validation, "test": test}
    return {
        s.name: {"task": s.task, "langs": list(s.langs), "zero_shot": s.zero_shot}
        | {split: set_averages(scores[split], [s]).get(s.name) for split in SPLITS}
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
    per_dataset = ("best_step", "history", "train_loss", "featureless_fraction")
    merged = {"validation": {}, "test": {}, "test_stats": {}, **{k: {} for k in per_dataset}, "trainable_parameters": 0, "train_seconds": 0.0}
    for part in parts:
        for split in ("validation", "test", "test_stats"):
            for task, langs in part[split].items():
                merged[split].setdefault(task, {}).update(langs)
        ((task, langs),) = part["test"].items()
        key = f"{task}.{next(iter(langs))}"
        for k in per_dataset:
            merged[k][key] = part[k]
        merged["trainable_parameters"] += part["trainable_parameters"]
        merged["train_seconds"] += part["train_seconds"]
    merged["flix"] = parts[0]["flix"] if parts else {}
    return merged


def write_results(run_dir: Path, mixture: Mixture, body: dict, head: dict, tail: dict) -> dict:
    """results.json (head, eval_sets, body, tail, in that key order) and tables/<split>.csv."""
    results = {**head, "eval_sets": eval_set_entries(mixture.eval_sets, body["validation"], body["test"]), **body, **tail}
    for split in SPLITS:
        atomic_write_text(run_dir / "tables" / f"{split}.csv", per_language_table(results[split]).to_csv(float_format="%.2f"))
    atomic_write_json(run_dir / RESULTS, results)
    return results


def write_failure(run_dir: Path, err: BaseException, config: dict) -> None:
    """failed.json: the error, its traceback and the resolved config (the run's identity)."""
    atomic_write_json(run_dir / FAILED, {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(), "config": config})


def summary_line(results: dict) -> str:
    sets = ", ".join(f"{k} {v['test']:.1f}" for k, v in results["eval_sets"].items() if v["test"] is not None)
    return f"[flix] {results['method']} on {results['mixture']} ({results['scale']}): test {sets}; best step {results['best_step']}; {results['time_seconds']:.0f}s"
