"""Experiment tracking: W&B (offline by default) or nothing.

Each run opens and finishes its own W&B run, so multirun sweeps never mix runs.
Offline files land under the run directory, and the run says where in one line; `flix
sync` (flix.pipeline.sync) uploads every offline run under runs/ later. WANDB_MODE=online
uploads live, and needs an API key: a run without one is refused before it starts
(flix.pipeline.checks).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd

from flix.record import summary_metrics

log = logging.getLogger("flix")


def say(message: str) -> None:
    """A line for the terminal (stderr) and for the run's log file (RUN_DIR/train.log
    under Hydra, whose handlers the logger reaches)."""
    print(message, file=sys.stderr, flush=True)
    log.info(message)


def say_once(message: str, wait: float = 30.0, everyone: bool = False) -> None:
    """`say` an error a run ends with, once under torchrun: every process meets the same
    settings, data or disk error. The first says it; the others first wait up to `wait`
    seconds, in which the launcher stops them once the first has failed, and say it only if
    they are still running (an error that they alone met). `everyone`: rank 0 waits too (an
    error that follows another process's, whichever rank that was)."""
    if everyone or os.environ.get("RANK", "0") != "0":
        time.sleep(wait)
    say(message)


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


OFFLINE_MODES = ("offline", "dryrun", "disabled")  # WANDB_MODE values that never contact a server


def wandb_mode(logger) -> str:
    """The mode a W&B run takes: WANDB_MODE, else conf/logger/wandb.yaml's (offline)."""
    return os.environ.get("WANDB_MODE") or str(logger.get("mode") or "offline")


def wandb_key_problems(logger) -> list[str]:
    """An online W&B logger with no API key (WANDB_API_KEY, `wandb login`'s netrc entry),
    which wandb.init would refuse only once the run had started: found from this machine's
    settings, without contacting a server."""
    from flix.pipeline.sync import has_wandb_key

    if logger.name != "wandb" or wandb_mode(logger) in OFFLINE_MODES or has_wandb_key():
        return []
    return [
        f"W&B logs online (WANDB_MODE={wandb_mode(logger)}) but no API key is configured: run `wandb login` (or set WANDB_API_KEY), "
        "or pass logger=none; without WANDB_MODE, runs log offline and `flix sync` uploads them later"
    ]


class WandbTracker(NullTracker):
    records = True

    def __init__(self, run_dir: Path, project: str, group: str, name: str, config: dict, mode: str, tags: list[str], resume_id: str | None):
        import wandb

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE") or mode
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
        if mode in ("offline", "dryrun"):  # say so once, and how the files reach the server
            say(offline_line(Path(self.run.dir).parent, run_dir))

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


def offline_line(offline: Path, run_dir: Path) -> str:
    """Where an offline run's files are, and the one command that uploads them: `flix sync`
    takes every offline run under the runs root (a whole study's, its report's too)."""
    from flix.pipeline.sync import runs_root

    root = runs_root()
    under = root.resolve() in run_dir.resolve().parents
    command = f"`flix sync` uploads it and every other offline run under {root}/ (a whole study)" if under else f"`flix sync {run_dir}` uploads it"
    return f"[flix] W&B logs offline to {_shown(offline)}; {command}, after `wandb login`"


def _shown(path: Path) -> Path:
    """A path relative to the current folder where it is under it (as the user typed runs/)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


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
