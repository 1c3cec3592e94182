"""One run: train -> validate every N steps -> keep the best adapter -> test -> results
(started by `python -m flix.train`, flix/train.py).

Everything a table needs lands in the run directory: results.json, tables/*.csv,
predictions/, best_adapter/. Checkpoints under checkpoints/ make a rerun of the same
command in the same directory resume where it stopped, with identical results.
The recipe is here; its parts live in flix.pipeline.run_config (composing, the hash), flix.pipeline.trainer
(training, selection, test), flix.pipeline.checkpoint and flix.record (what runs record).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

import hydra.core.hydra_config
import numpy as np
import torch
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flix import record
from flix.data.mixtures import MixtureError
from flix.data.reader import DataError
from flix.io import WriteError, atomic_write_text, disk_full, recover_tree, write_error
from flix.lock import RunLocked, run_lock
from flix.pipeline import distributed
from flix.pipeline.checks import ConfigError, check_run
from flix.pipeline.run_config import config_hash, load_mixture_for
from flix.pipeline.tracking import NullTracker, ScopedTracker, make_tracker, say, say_once
from flix.pipeline.trainer import Trainer
from flix.pipeline.versions import versions
from flix.record import CODE_COMMIT, FAILED, RESULTS


def train_one(cfg: DictConfig, mixture, run_dir: Path, tracker, root: Path, rank_world: tuple[int, int]) -> dict:
    """Train, select and test one adapter; returns its part of results.json ({} off the main process)."""
    trainer = Trainer.from_config(cfg, mixture, run_dir, rank_world, root)
    state = trainer.fit(tracker)
    if not trainer.main:
        if trainer.sharded:  # a sharded model's forwards need every process
            trainer.test()
        return {}
    test, per_example = trainer.test()
    config = trainer.model.flix_config
    return record.body(
        best_step=state["best_step"],
        best_validation_average=state["best_score"],
        best_validation_nll=state["best_nll"],
        selection=record.selection_entry(cfg.train.select_by, mixture.selection_sets),
        validation=state["best_validation"],
        test=test.scores,
        validation_nll=state["best_validation_nll"],
        test_nll=test.nll,
        per_example=per_example,
        history=state["history"],
        train_loss=state["train_loss"],
        featureless_fraction=state["featureless_fraction"],
        trainable_parameters=trainer.model.num_trainable_parameters(),
        flix=config.to_dict() | {"active_rank": config.space.active_rank},
        train_seconds=state["train_seconds"],
    )


class NotStarted(ValueError):
    """A run refused by its checks, before it trained or wrote anything of its own."""


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole run; returns results (also written to run_dir/results.json)."""
    try:
        mixture = load_mixture_for(cfg)
        root = check_run(cfg, mixture)  # before any model loads or file is written; the data root, resolved once
    except (ConfigError, MixtureError, DataError) as err:
        raise NotStarted(str(err)) from err
    rank_world = distributed.setup()
    if rank_world[0] != 0:  # other data-parallel processes only train; the main one holds the lock
        return _train(cfg, mixture, run_dir, root, rank_world)
    with run_lock(run_dir, wait=bool(cfg.get("wait"))):
        recover_tree(run_dir)  # a crash's newest complete checkpoint back in place, temp files gone
        return _train(cfg, mixture, run_dir, root, rank_world)


def _train(cfg: DictConfig, mixture, run_dir: Path, root: Path, rank_world: tuple[int, int]) -> dict:
    process_rank = rank_world[0]
    if cfg.get("force") and process_rank == 0 and run_dir.exists():
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / RESULTS).unlink(missing_ok=True)
    if (run_dir / RESULTS).exists():
        say(f"[flix] {run_dir / RESULTS} exists: run already complete (force=true runs it again)")
        try:
            results = json.loads((run_dir / RESULTS).read_text())
        except ValueError as err:  # written atomically, so damaged afterwards
            raise RuntimeError(f"{run_dir / RESULTS}: unreadable ({err}); rerun with force=true to train this run again") from None
        if process_rank == 0 and cfg.logger.name != "none" and not (run_dir / LOGGED).exists():
            # made with logger=none (or before): log it now, so the W&B project has every run
            tracker = _tracker(cfg, mixture, run_dir)
            _publish(tracker, results, run_dir)
            _finish(tracker, run_dir, failed=False)
        return results
    if process_rank == 0:
        (run_dir / FAILED).unlink(missing_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    # `single` (method.per_dataset): one adapter per dataset, each in datasets/TASK.LANG.
    jobs = [(m, run_dir / "datasets" / m.name.split("/")[-1]) for m in mixture.per_dataset()] if cfg.method.per_dataset else [(mixture, run_dir)]
    if process_rank != 0:
        for part, part_dir in jobs:
            train_one(cfg, part, part_dir, NullTracker(), root, rank_world)
        return {}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tracker = _tracker(cfg, mixture, run_dir)
    started = time.time()
    failed = True
    try:
        # The single baseline trains one adapter per dataset into one W&B run: each logs
        # under its dataset's name, its steps following the previous one's.
        parts = [
            train_one(
                cfg, part, part_dir, tracker if len(jobs) == 1 else ScopedTracker(tracker, part_dir.name, i * cfg.scale.steps), root, rank_world
            )
            for i, (part, part_dir) in enumerate(jobs)
        ]
        body = record.merge_datasets(parts) if cfg.method.per_dataset else parts[0]
        head = record.head(
            method=cfg.method.name,
            mixture=mixture.name,
            study=cfg.study,
            scale=cfg.scale.name,
            seed=cfg.seed,
            model=cfg.model.name,
            data_root=root.resolve().name,
            variant=cfg.data.variant,
        )
        tail = record.tail(
            time_seconds=time.time() - started,
            commit=CODE_COMMIT,
            versions=versions(),
            config_hash=config_hash(cfg),
            config=resolved,
        )
        results = record.write_results(run_dir, mixture, body, head, tail)
        _publish(tracker, results, run_dir)
        say(record.summary_line(results))
        failed = False
        return results
    finally:
        _finish(tracker, run_dir, failed)


LOGGED = "wandb_logged"  # written once the run's results reached its W&B run


def run_label(cfg: DictConfig) -> str:
    """Every swept value, so runs of a sweep are told apart on the dashboard."""
    mode = "" if cfg.train.dropout_mode == "independent" else f"-{cfg.train.dropout_mode}"
    return f"{cfg.method.name}-{cfg.mixture.name}-drop{cfg.dropout}{mode}-rank{cfg.rank.name}-seed{cfg.seed}"


def _tracker(cfg: DictConfig, mixture, run_dir: Path):
    """W&B run grouped by the table it feeds (the study's sweep sets `table`), tagged by
    scale, mixture and method."""
    group = f"{cfg.scale.name}/{cfg.get('table') or cfg.study or mixture.name}"
    tags = [cfg.scale.name, mixture.name, cfg.method.name]
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return make_tracker(cfg.logger, run_dir, name=run_label(cfg), group=group, config=resolved, resume_id=_wandb_id(run_dir), tags=tags)


def _publish(tracker, results: dict, run_dir: Path) -> None:
    tracker.summarize(results)
    for split, table in record.split_tables(results).items():
        tracker.log_table(f"tables/{split}", table)
    tracker.log_artifact(run_dir / RESULTS, name=f"results-{run_dir.name}", kind="results")


def _finish(tracker, run_dir: Path, failed: bool) -> None:
    tracker.finish(failed=failed)  # a failed run ends failed on the dashboard
    if tracker.records and not failed:
        atomic_write_text(run_dir / LOGGED, "")


def _wandb_id(run_dir: Path) -> str:
    """Reuse the W&B run id when resuming, so a resumed run is one W&B run."""
    path = run_dir / "wandb_id"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id)
    return run_id


HYDRA_FILES = {".hydra", "train.log"}  # what Hydra writes into a run folder before the run starts


def remove_unstarted(run_dir: Path) -> None:
    """Remove the folder Hydra made for a run that never started, and the empty folders
    Hydra made above it under the runs root (FLIX_RUNS); a folder holding anything else (an
    earlier run's files) stays."""
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - HYDRA_FILES:
        return
    shutil.rmtree(run_dir)
    top = Path(os.environ.get("FLIX_RUNS") or "runs").resolve().parent  # the runs root goes too, if empty
    for parent in run_dir.resolve().parents:
        if parent == top or top not in parent.parents:
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


def hydra_job(cfg: DictConfig) -> float | None:
    """One Hydra job (`python -m flix.train`, flix/train.py): run, and turn failures into a
    failed.json and an exit code (a sweep goes on past a failed run)."""
    hydra_cfg = hydra.core.hydra_config.HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    logging.raiseExceptions = False  # a full disk is said once, by the write that needed the space, not by every log line
    try:
        try:
            results = run(cfg, run_dir)
        except NotStarted as err:
            if multirun:  # a sweep counts its failed runs by their failed.json (flix.pipeline.sweep): one below
                raise err.__cause__ from None
            # a failed.json is for runs that started: leave nothing (flix.train checks first; this is a second line)
            remove_unstarted(run_dir)
            say_once(f"flix.train: error: {err}")
            sys.exit(2)
        except torch.OutOfMemoryError as err:
            raise RuntimeError(
                f"out of memory: lower scale.micro_batch_size (now {cfg.scale.micro_batch_size}; the effective batch "
                f"stays scale.batch_size), scale.max_prompt_tokens or scale.eval_batch_size, or set train.gradient_checkpointing=true"
            ) from err
    except RunLocked as err:  # another process is on it: nothing of this run is ours to write
        say(f"[flix] {err}")
        if not multirun:
            sys.exit(1)
        return None
    except Exception as err:
        try:
            record.write_failure(run_dir, err, OmegaConf.to_container(cfg, resolve=True))  # the report names it
        except OSError:  # a full disk takes failed.json too: the line below says what to do
            pass
        if multirun:  # one failed run must not take the sweep down: go on
            say(f"[flix] FAILED {run_dir}: {type(err).__name__}: {err}")
            return None
        if isinstance(err, (ConfigError, MixtureError, DataError)):  # the message says what to change
            say_once(f"flix.train: error: {err}")
            sys.exit(2)
        if isinstance(err, WriteError) or disk_full(err):  # the path and what to do (a full disk: free space; the run resumes)
            named = err if isinstance(err, WriteError) else write_error(run_dir, err)
            say_once(f"flix.train: error: {named}" + (" (the run resumes from its last checkpoint)" if disk_full(err) else ""))
            sys.exit(1)
        if distributed.peer_failed(err):  # another process failed first and says why: not a traceback of ours too
            say_once(f"flix.train: error: another process of this run ended first ({err})", everyone=True)
            sys.exit(1)
        raise
    score = record.summary_metrics(results)["best_validation_average"]
    return score if isinstance(score, float) else None
