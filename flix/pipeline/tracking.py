"""Experiment tracking: W&B (offline by default) or nothing.

Each run opens and finishes its own W&B run, so multirun sweeps never mix runs.
Offline files land under the run directory; `wandb sync RUN_DIR/wandb/offline-run-*`
uploads them later. WANDB_MODE=online (with a key) uploads live.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pandas as pd

from flix.record import summary_metrics

log = logging.getLogger("flix")


def say(message: str) -> None:
    """A line for the terminal (stderr) and for the run's log file (RUN_DIR/train.log
    under Hydra, whose handlers the logger reaches)."""
    print(message, file=sys.stderr, flush=True)
    log.info(message)


class NullTracker:
    records = False  # whether anything logged is kept

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summarize(self, results: dict) -> None:
        pass

    def log_table(self, name: str, frame: pd.DataFrame) -> None:
        pass

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(NullTracker):
    records = True

    def __init__(self, run_dir: Path, project: str, group: str, name: str, config: dict, mode: str, tags: list[str], resume_id: str | None):
        import wandb

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE", mode)
        self.run = wandb.init(
            project=project,
            group=group,
            job_type="train",
            name=name,
            config=config,
            dir=str(run_dir),
            mode=mode,
            tags=tags,
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="finish_previous",
            # no banners: offline, nothing (a study would print hundreds of lines); online, the run's link
            settings=wandb.Settings(silent=mode == "offline", quiet=True),
        )
        # the dashboard's summary shows the selected checkpoint, not the last validation
        self.run.define_metric("validation/average", summary="max")

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, frame: pd.DataFrame) -> None:
        self.run.log({name: self._wandb.Table(dataframe=frame.reset_index())})

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        artifact = self._wandb.Artifact(name, type=kind)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def summarize(self, results: dict) -> None:
        self.run.summary.update(summary_metrics(results))

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class ScopedTracker(NullTracker):
    """Log through `tracker` with keys under `prefix/` and steps moved by `offset`."""

    def __init__(self, tracker: NullTracker, prefix: str, offset: int):
        self.tracker, self.prefix, self.offset = tracker, prefix, offset

    def log(self, metrics: dict, step: int) -> None:
        self.tracker.log({f"{self.prefix}/{k}": v for k, v in metrics.items()}, step=step + self.offset)

    def summarize(self, results: dict) -> None:
        pass  # the whole run's results are summarised once, by the tracker it scopes


def make_tracker(cfg, run_dir: Path, name: str, group: str, config: dict, resume_id: str | None = None, tags: list[str] = ()) -> NullTracker:
    if cfg.name == "none":
        return NullTracker()
    if cfg.name != "wandb":
        raise ValueError(f"unknown logger {cfg.name!r}: use logger=wandb or logger=none")
    return WandbTracker(run_dir, cfg.project, group, name, config, cfg.mode, [*tags, *(cfg.get("tags") or [])], resume_id)
