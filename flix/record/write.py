"""Writing what a run records: the builders of results.json's parts (the pipeline's run
and trainer call them), the writers of results.json and failed.json, and the arithmetic
over scores (set averages, the selection metric, the `single` merge, per-language tables).
The keys are described in flix/record/__init__.py.
"""

from __future__ import annotations

import subprocess
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from flix.data.mixtures import EvalSet, Mixture
from flix.io import atomic_write_json, atomic_write_text

RESULTS = "results.json"
FAILED = "failed.json"
SPLITS = ("validation", "test")
SCORE_KEYS = ("validation", "test", "validation_nll", "test_nll")  # {task: {lang: value}}
# {task: {lang: [one entry per test example]}}: test_stats per test_ids, test_example_nll per test_nll_ids
EXAMPLE_KEYS = ("test_ids", "test_stats", "test_nll_ids", "test_example_nll")


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

# -- builders: the pipeline's run and trainer make results.json with these ---------------


def head(*, method: str, mixture: str, study, scale: str, seed: int, model: str, data_root: str, variant: str) -> dict:
    """results.json's first keys: who the run is (data_root: the data folder's name)."""
    return {
        "method": method,
        "mixture": mixture,
        "study": study,
        "scale": scale,
        "seed": seed,
        "model": model,
        "data_root": data_root,
        "variant": variant,
    }


def example_entries(*, stats: dict, nll: dict, ids: dict, nll_ids: dict) -> dict:
    """results.json's per-test-example keys ({task: {lang: [one per example]}}): the greedy
    outputs' statistics on the examples `ids`, the target NLL on the examples `nll_ids`."""
    return {"test_stats": stats, "test_example_nll": nll, "test_ids": ids, "test_nll_ids": nll_ids}


def body(
    *,
    best_step: int,
    best_validation_average: float,
    best_validation_nll: float,
    selection: dict,
    validation: dict,
    test: dict,
    validation_nll: dict,
    test_nll: dict,
    per_example: dict,
    history: list,
    train_loss: list,
    featureless_fraction: list,
    trainable_parameters: int,
    flix: dict,
    train_seconds: float,
) -> dict:
    """One trained adapter's part of results.json (`per_example`: `example_entries`)."""
    return {
        "best_step": best_step,
        "best_validation_average": best_validation_average,
        "best_validation_nll": best_validation_nll,
        "selection": selection,
        "validation": validation,
        "test": test,
        "validation_nll": validation_nll,
        "test_nll": test_nll,
        **per_example,
        "history": history,
        "train_loss": train_loss,
        "featureless_fraction": featureless_fraction,
        "trainable_parameters": trainable_parameters,
        "flix": flix,
        "train_seconds": train_seconds,
    }


def tail(*, time_seconds: float, commit: str | None, versions: dict, config_hash: str, config: dict) -> dict:
    """results.json's last keys: where the run came from (`config`: the resolved config)."""
    return {"time_seconds": time_seconds, "commit": commit, "versions": versions, "config_hash": config_hash, "config": portable(config)}


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


SELECT_BY = ("metric", "nll", "final")


def selection_key(average: float | None, nll: float, step: int, select_by: str) -> tuple[float, ...]:
    """How validations rank (larger is better; a tie keeps the earlier step). `metric`:
    the paper's average validation metric, ties (all-zero validations included) broken by
    the lower average target NLL; `nll` (train.select_by=nll): the lower NLL alone;
    `final`: the last step (no selection)."""
    if select_by not in SELECT_BY:
        raise ValueError(f"train.select_by={select_by!r}: use one of {', '.join(SELECT_BY)}")
    if select_by == "final":
        return (step,)
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
    import pandas as pd  # here, not at import: command lines start without it

    frame = pd.DataFrame(scores)
    frame.index.name = "language"
    return frame.sort_index()


def split_tables(results: dict) -> dict[str, pd.DataFrame]:
    """Each split's scores as a per-language table (tables/<split>.csv, W&B)."""
    return {split: per_language_table(results[split]) for split in SPLITS}


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
    for split, table in split_tables(results).items():
        atomic_write_text(run_dir / "tables" / f"{split}.csv", table.to_csv(float_format="%.2f"))
    atomic_write_json(run_dir / RESULTS, results)
    return results


def write_failure(run_dir: Path, err: BaseException, config: dict) -> None:
    """failed.json: the error, its traceback and the resolved config (the run's identity)."""
    atomic_write_json(run_dir / FAILED, {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(), "config": portable(config)})


def summary_line(results: dict) -> str:
    sets = ", ".join(f"{k} {v['test']:.1f}" for k, v in results["eval_sets"].items() if v["test"] is not None)
    return f"[flix] {results['method']} on {results['mixture']} ({results['scale']}): test {sets}; best step {results['best_step']}; {results['time_seconds']:.0f}s"


def summary_metrics(results: dict) -> dict:
    """What a paper table reads from a run (a tracker's run summary): test and validation of
    each evaluation set (a table column), their averages over the supervised sets, the
    selected step and its validation average."""
    out = {"best_step": results.get("best_step"), "best_validation_average": results.get("best_validation_average")}
    for split in ("test", "validation"):
        values = {name: entry.get(split) for name, entry in (results.get("eval_sets") or {}).items()}
        out |= {f"{split}/{name}": v for name, v in values.items() if v is not None}
        supervised = [v for name, v in values.items() if v is not None and not results["eval_sets"][name].get("zero_shot")]
        if supervised:
            out[f"{split}/average"] = sum(supervised) / len(supervised)
    return out
