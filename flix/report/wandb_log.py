"""Log a rendered report to W&B: each table beside the training runs it was made from
(same group), and the whole render as one artifact."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def table_group(path: Path) -> str | None:
    """The training runs' group suffix (a study's `table`) a report file belongs to:
    table1.csv -> table1, appendix_multitask_sw.csv -> appendix; None for files that
    span tables (index.html, cells.csv, figure2.*)."""
    stem = path.stem
    if stem.startswith("appendix_"):
        return "appendix"
    if stem.startswith("table") or stem == "dropout_modes":
        return stem
    return None


def _log_run(wandb, project: str, group: str, name: str, files: list[Path], wandb_dir: Path, artifact: str | None) -> Path:
    run = wandb.init(
        project=project,
        group=group,
        job_type="report",
        name=name,
        dir=str(wandb_dir),
        mode=os.environ.get("WANDB_MODE", "offline"),
        reinit="finish_previous",
    )
    try:
        tables = {p.stem: wandb.Table(dataframe=pd.read_csv(p, dtype=str, keep_default_na=False)) for p in files if p.suffix == ".csv"}
        images = {p.stem: wandb.Image(str(p)) for p in files if p.suffix == ".png"}
        run.log({f"report/{key}": value for key, value in {**tables, **images}.items()})
        if artifact:
            bundle = wandb.Artifact(artifact, type="report")
            for path in files:
                bundle.add_file(str(path))
            run.log_artifact(bundle)
        return Path(run.dir).parent
    finally:
        run.finish()


def log_to_wandb(
    out_dir: str | Path, scale: str, project: str = "flix", wandb_dir: str | Path | None = None, files: list[Path] | None = None
) -> list[Path]:
    """W&B runs of job_type "report" (offline unless WANDB_MODE says otherwise, as for
    training runs); returns their local run directories, the whole render's first.

    One run `report-<scale>` in group `<scale>/report` logs every table and figure and
    the files as one artifact; then one run per table in the group its training runs
    use (`<scale>/table1`, ...), so a table's group on the dashboard holds its runs and
    the table they made. `files`: what this render wrote (default: every file in
    out_dir). W&B files go under wandb_dir (default out_dir), never into the artifact."""
    import wandb

    out_dir = Path(out_dir)
    wandb_dir = Path(wandb_dir or out_dir)
    files = sorted(files if files is not None else (p for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")))
    dirs = [_log_run(wandb, project, f"{scale}/report", f"report-{scale}", files, wandb_dir, artifact=f"report-{scale}")]
    by_table: dict[str, list[Path]] = {}
    for path in files:
        if (group := table_group(path)) is not None:
            by_table.setdefault(group, []).append(path)
    for group, members in sorted(by_table.items()):
        dirs.append(_log_run(wandb, project, f"{scale}/{group}", f"report-{scale}-{group}", members, wandb_dir, artifact=None))
    return dirs
