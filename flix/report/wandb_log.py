"""Log a rendered report to W&B: its tables, its figure, and the files as one artifact."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def log_to_wandb(out_dir: str | Path, project: str = "flix", wandb_dir: str | Path | None = None, files: list[Path] | None = None) -> Path:
    """One W&B run of job_type "report" (offline unless WANDB_MODE says otherwise, as
    for training runs); returns its local run directory. `files`: what this render wrote
    (default: every file in out_dir). W&B files go under wandb_dir (default out_dir),
    never into the artifact."""
    import wandb

    out_dir = Path(out_dir)
    files = sorted(files if files is not None else (p for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")))
    run = wandb.init(
        project=project,
        job_type="report",
        name=f"report-{out_dir.name}",
        dir=str(wandb_dir or out_dir),
        mode=os.environ.get("WANDB_MODE", "offline"),
        reinit="finish_previous",
    )
    try:
        tables = {p.stem: wandb.Table(dataframe=pd.read_csv(p, dtype=str, keep_default_na=False)) for p in files if p.suffix == ".csv"}
        images = {p.stem: wandb.Image(str(p)) for p in files if p.suffix == ".png"}
        run.log({f"report/{name}": value for name, value in {**tables, **images}.items()})
        artifact = wandb.Artifact(f"report-{out_dir.name}", type="report")
        for path in files:
            artifact.add_file(str(path))
        run.log_artifact(artifact)
        return Path(run.dir).parent
    finally:
        run.finish()
