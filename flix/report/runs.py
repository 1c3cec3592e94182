"""runs.md and runs.csv: what every finished run cost, how it trained and what it scored
(wall time, training time, kept step, test score and NLL, featureless examples, last training
loss, empty test predictions), and the whole set's wall time and core-hours. From the records
alone, like the tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from flix.io import atomic_write_text, read_regular_text
from flix.record import RunRecord
from flix.report.collect import has_features
from flix.report.formats import Page, md_header, md_table
from flix.report.labels import METHOD_LABELS
from flix.report.tables import DASH

COLUMNS = {
    "run": "run",
    "seed": "seed",
    "commit": "code",
    "seconds": "wall time, s",
    "train_seconds": "of which training, s",
    "best_step": "kept step",
    "validations": "validation by step (score / NLL)",
    "test": "test, paper's metric",
    "test_nll": "test target NLL",
    "featureless": "featureless examples",
    "last_loss": "last training loss",
    "empty_test": "empty test predictions",
    "resumed": "resumed at step",
    "folder": "record",
}


def setting_label(run: RunRecord) -> str:
    """How the report names a run's setting: "FLix, p = 0.7 keep-one, language rank 1"."""
    label = METHOD_LABELS.get(run.method or "", run.method or "unknown method")
    if run.features if run.features is not None else has_features(run.method or "flix"):
        mode = "" if run.dropout_mode == "independent" else f" {run.dropout_mode.replace('_', '-')}"
        label += f", p = {run.dropout:g}{mode}" if run.dropout is not None else ""
    return label + ("" if run.lang_rank is None else f", language rank {run.lang_rank}")


def empty_predictions(run_dir: Path, split: str = "test") -> tuple[int, int] | None:
    """(empty outputs, examples) over the run's recorded predictions; None if none recorded
    or if they cannot be read (a damaged record leaves a dash, not a failed report; a link
    to /dev/zero or a FIFO is not read: regular files only)."""
    files = sorted((run_dir / "predictions" / split).glob("*.jsonl"))
    try:
        outputs = [json.loads(line)["prediction"] for path in files for line in read_regular_text(path).splitlines() if line.strip()]
        outputs = [text for text in outputs if text is not None]  # null: scored by NLL only, not generated
        return (sum(not text.strip() for text in outputs), len(outputs)) if outputs else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def resumed_steps(run_dir: Path) -> list[int]:
    """The steps a run resumed from, in order, from its log (flix.pipeline.trainer says so)."""
    try:
        text = read_regular_text(run_dir / "train.log", errors="replace")
    except OSError:  # none, or a link, device or FIFO: not read
        text = ""
    return [int(step) for step in re.findall(r"\[flix\] resuming .* from step (\d+)", text)]


def cores(device: str | None) -> int | None:
    """The CPU cores a run held, from its recorded device ("cpu (x86_64, 2 cores)")."""
    found = re.fullmatch(r"cpu \(.*?(\d+) cores\)", device or "")
    return int(found.group(1)) if found else None


def test_average(run: RunRecord, nll: bool = False) -> float | None:
    """The kept checkpoint's test score (or NLL), averaged over the run's evaluation sets as
    selection averages validation; None if any set lacks it."""
    values = [s.average("test", nll) for s in run.eval_sets.values()]
    return sum(values) / len(values) if values and None not in values else None


def validations(training) -> str | None:
    """'24: 6.8 / 1.05; 48: 6.2 / 0.68': every validation, so a reader sees what selection chose between."""
    if not training or not training.validations:
        return None
    return "; ".join(f"{step}: {_cell('test', score)} / {_cell('test_nll', nll)}" for step, score, nll in training.validations)


def runs_frame(runs: list[RunRecord]) -> pd.DataFrame:
    """One row per finished run, in the report's method order, then setting, then seed."""
    order = list(METHOD_LABELS)
    rows = []
    for run in sorted(runs, key=lambda r: (order.index(r.method) if r.method in order else len(order), setting_label(r), r.seed or 0)):
        training, empty = run.training, empty_predictions(run.path)
        best = training and training.best_step
        rows.append(
            {
                "run": setting_label(run),
                "seed": run.seed,
                "commit": (run.commit or "")[:7] or None,
                "seconds": training and training.seconds,
                "train_seconds": training and training.train_seconds,
                "best_step": " ".join(f"{k}:{v}" for k, v in best.items()) if isinstance(best, dict) else best,
                "validations": validations(training),
                "test": test_average(run),
                "test_nll": test_average(run, nll=True),
                "featureless": training and training.featureless,
                "last_loss": training and training.last_loss,
                "empty_test": None if empty is None else f"{empty[0]}/{empty[1]}",
                "resumed": " ".join(map(str, resumed_steps(run.path))) or None,
                "folder": f"{run.path.parent.name}/{run.path.name}",
                "device": run.versions.get("device"),
            }
        )
    return pd.DataFrame(rows, columns=[*COLUMNS, "device"])


def totals(frame: pd.DataFrame) -> list[str]:
    """The set's wall time, and its core-hours on each CPU device (wall time x the device's cores)."""
    known = frame.dropna(subset=["seconds"])
    lines = [
        f"{len(frame)} runs; wall time {known['seconds'].sum():.0f} s ({known['seconds'].sum() / 3600:.2f} h) over the {len(known)} that record it."
    ]
    for device, group in known.groupby(known["device"].fillna("device not recorded")):
        n = cores(device)
        hours = group["seconds"].sum() / 3600
        held = f"{hours * n:.2f} core-hours (wall time x {n} cores)" if n else f"{hours:.2f} h"
        lines.append(f"On {device}: {len(group)} runs, {held}.")
    return lines


def _cell(key: str, value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return DASH
    if key in ("seconds", "train_seconds"):
        return f"{value:.0f}"
    if key == "featureless":
        return f"{100 * value:.1f}%"
    if key in ("last_loss", "test_nll"):
        return f"{value:.2f}"
    if key == "test":
        return f"{value:.1f}"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


NOTE = (
    "Wall time: the whole run (training, validation, test); a resumed run's counts only its "
    "last process, its training time every step it kept. Validation: the average score and gold "
    "target NLL at each validation; the kept step is the best of them (by score, ties by lower "
    "NLL; by NLL under `train.select_by=nll`). Test: the kept checkpoint's score and "
    "gold target NLL, averaged over the run's evaluation sets; a table cell is the mean of its "
    "runs' over seeds. Featureless: the mean fraction of training examples whose features were "
    "all dropped. Empty: test examples whose greedy output was empty, from `predictions/test/`."
)


def runs_table(frame: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, total lines) of `runs_frame` as pages print them."""
    rows = [[_cell(key, record[key]) for key in COLUMNS] for record in frame.to_dict("records")]
    return list(COLUMNS.values()), rows, totals(frame)


def write_runs(frame: pd.DataFrame, runs: list[RunRecord], page: Page, out_dir: Path) -> list[Path]:
    """runs.md and runs.csv of `runs_frame(runs)` (read once by the caller, shared with index.html)."""
    header, rows, total = runs_table(frame)
    md = md_header("Runs: cost and training", page, runs) + "\n" + md_table(header, rows) + "\n" + "\n".join(total) + f"\n\n{NOTE}\n"
    return [
        atomic_write_text(out_dir / "runs.md", md),
        atomic_write_text(out_dir / "runs.csv", frame.to_csv(index=False, float_format="%.4f")),
    ]
