"""Run a study (experiments/NAME.yaml) as Hydra multiruns, then render its tables.

    python -m flix study study_a --scale smoke [--seeds 0,1,2] [--force] [--launcher parallel] [-- key=value ...]

Each sweep of the study is one `python -m flix.train -m ...`. Runs whose directory
(named by the hash of their resolved config) already holds results.json are skipped by
the run itself, so an interrupted study picks up where it stopped. A failing run writes
failed.json and the others go on; the study then lists the failures and exits 1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
RECORDS = REPO / "reports"  # committed run records: reports/<scale>/runs/<mixture>/<run> (flix records)
LAUNCHERS = ("basic", "parallel", "slurm")
TABLE = "table"  # a sweep's one name of the table it feeds (not swept; the runs' W&B group)


@dataclass
class PlannedRun:
    overrides: list[str]
    run_dir: Path
    cfg: DictConfig | None = None
    record: Path | None = None  # where its committed record would be

    @property
    def status(self) -> str:
        return self.state()[0]

    def state(self) -> tuple[str, str]:
        """(status, why): done (a results.json the report reads), running (another process
        holds the run), damaged (a results.json the report cannot read), failed or missing."""
        from flix.lock import busy
        from flix.record import FAILED, READ_ERRORS, RESULTS, read_failure
        from flix.report.collect import read_run

        results = self.run_dir / RESULTS
        if results.exists():
            try:
                if read_run(results) is None:
                    raise ValueError("not a flix run's record (no method, no eval_sets)")
                return "done", "complete"
            except READ_ERRORS as err:
                damage = f"{results} cannot be read ({type(err).__name__}: {err}); --force trains it again"
        if holder := busy(self.run_dir):
            return "running", f"being trained by {holder}; rerun the study when it ends"
        if results.exists():
            return "damaged", damage
        if (self.run_dir / FAILED).exists():
            return "failed", read_failure(self.run_dir / FAILED).failure
        return "missing", "no results.json"


def load_study(name: str) -> dict:
    """experiments/NAME.yaml, or a study file of one's own (a path ending in .yaml)."""
    path = Path(name) if name.endswith(".yaml") else EXPERIMENTS / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
        raise SystemExit(f"flix study: no study {name!r} ({path}); studies: {', '.join(names)}")
    study = OmegaConf.to_container(OmegaConf.load(path))
    for i, sweep in enumerate(study.get("sweeps") or []):
        if not isinstance(sweep.get(TABLE, ""), str):
            raise SystemExit(f"flix study: {path}: sweeps[{i}].{TABLE} must be one name (the paper table the sweep feeds)")
        bad = [k for k, v in sweep.items() if k != TABLE and (not isinstance(v, list) or not v)]
        if bad:
            raise SystemExit(f"flix study: {path}: sweeps[{i}].{bad[0]} must be a non-empty list of values")
    return study


def with_seeds(study: dict, seeds: list[int]) -> dict:
    """Every sweep once per seed (a `seed` sweep key): the report averages over seeds. A
    study with `order: seed` runs every sweep of one seed before the next seed, so that a
    study stopped part-way has as many seeds of every condition (paired comparisons stay balanced)."""
    if study.get("order") == "seed":
        return {**study, "sweeps": [{**sweep, "seed": [seed]} for seed in seeds for sweep in study["sweeps"]]}
    return {**study, "sweeps": [{**sweep, "seed": list(seeds)} for sweep in study["sweeps"]]}


def sweep_args(sweep: dict) -> list[str]:
    """Hydra multirun overrides: key=v1,v2,..."""
    return [f"{key}={values}" if key == TABLE else f"{key}={','.join(str(v) for v in values)}" for key, values in sweep.items()]


def expand(sweep: dict) -> list[list[str]]:
    swept = {k: v for k, v in sweep.items() if k != TABLE}
    return [[f"{k}={v}" for k, v in zip(swept, combo)] for combo in itertools.product(*swept.values())]


def plan(study: dict, common: list[str], records: Path | None = None) -> list[PlannedRun]:
    """Every run of the study with the directory it writes to (composed, not run) and where
    its committed record would be (under `records`; default reports/<scale>/runs)."""
    from flix.pipeline.run_config import compose

    runs = []
    for sweep in study["sweeps"]:
        for overrides in expand(sweep):
            cfg = compose([*common, *overrides], hydra=True)
            run_dir = REPO / cfg.hydra.sweep.dir / cfg.hydra.sweep.subdir  # sweeps run with cwd=REPO
            root = records if records is not None else RECORDS / str(cfg.scale.name) / "runs"
            runs.append(PlannedRun(overrides, run_dir, cfg, root / cfg.hydra.sweep.subdir))
    return runs


def restore_records(runs: list[PlannedRun]) -> int:
    """Put the committed record of each run not done into its run directory, so that the
    sweep finds it complete and does not train it again; returns how many. A record is
    restored only if it is the planned run's (flix.record.setting `same_run`: its config
    decides the same results, its hash names the run's folder); else one line says why and
    the run trains again."""
    import json

    from flix.io import read_regular_text
    from flix.record import READ_ERRORS, RESULTS, copy_records
    from flix.record.setting import same_run
    from flix.report.collect import read_run

    restored = 0
    for r in runs:
        if r.record is None or r.status == "done" or r.status == "running" or not os.path.lexists(r.record / RESULTS):
            continue
        try:
            if read_run(r.record / RESULTS) is None:
                raise ValueError("not a flix run's record")
            recorded = json.loads(read_regular_text(r.record / RESULTS))
            planned = OmegaConf.to_container(r.cfg, resolve=False)
            planned.pop("hydra", None)
            same_run(recorded["config"], OmegaConf.to_container(OmegaConf.create(planned), resolve=True), recorded.get("config_hash"), r.run_dir.name)
        except READ_ERRORS as err:
            print(f"[flix study] {r.record / RESULTS} not restored ({err}); the run trains again", file=sys.stderr)
            continue
        try:
            if copy_records(r.record, r.run_dir, say=lambda line: print(f"[flix study] {line}; the run trains again", file=sys.stderr)):
                restored += 1
        except OSError as err:  # a full disk (flix.io.WriteError names the file)
            print(f"[flix study] {r.record} not restored: {err}; the run trains again", file=sys.stderr)
    return restored


def problems(runs: list[PlannedRun]) -> list[str]:
    """What would fail at once in the runs still to do (a bad data root, a missing file, a
    bad setting), each message once: checked before anything launches."""
    from flix.data.mixtures import MixtureError
    from flix.data.reader import DataError
    from flix.pipeline.checks import ConfigError, check_run
    from flix.pipeline.run_config import load_mixture_for

    found: dict[str, list[str]] = {}
    for r in runs:
        if r.status == "done":
            continue
        try:
            check_run(r.cfg, load_mixture_for(r.cfg))
        except (ConfigError, MixtureError, DataError) as err:
            found.setdefault(str(err), []).append(" ".join(r.overrides))
    return [f"{message}\n  (runs: {'; '.join(who[:3])}{' ...' if len(who) > 3 else ''})" for message, who in found.items()]


def launch(study: dict, common: list[str], launcher: str, jobs: int) -> list[int]:
    """One Hydra multirun per sweep; returns their exit codes."""
    extra = [] if launcher == "basic" else [f"hydra/launcher={launcher}"]
    if launcher == "parallel":
        extra.append(f"hydra.launcher.n_jobs={jobs}")
    codes = []
    for sweep in study["sweeps"]:
        cmd = [sys.executable, "-m", "flix.train", "-m", *common, *sweep_args(sweep), *extra]
        print("[flix study] " + " ".join(cmd[1:]), flush=True)
        codes.append(run_child(cmd))
    return codes


def run_child(cmd: list[str]) -> int:
    """Run one sweep; a SIGTERM or SIGINT to the study goes to the sweep too and the study
    waits for it to end, then stops (an orphaned sweep would race a rerun of the study)."""
    child = subprocess.Popen(cmd, cwd=REPO)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # further Ctrl-Cs while the study exits: no traceback
        print(f"[flix study] stopped by {signal.Signals(received[0]).name}; the sweep ended (exit {code}); rerun to go on", file=sys.stderr)
        raise SystemExit(128 + received[0])
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flix study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="a file stem under experiments/ (study_a, study_b, ablations) or a path to a study .yaml")
    from flix.pipeline.run_config import choices

    parser.add_argument("--scale", default=os.environ.get("SCALE", "smoke"), choices=choices("scale"))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds: every run of the study once per seed (default 0)")
    parser.add_argument("--logger", default="wandb", choices=["wandb", "none"])
    parser.add_argument("--force", action="store_true", help="run again even runs that are complete")
    parser.add_argument("--launcher", default="basic", choices=LAUNCHERS, help="basic: one after another; parallel: joblib; slurm: submitit")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once with --launcher parallel")
    parser.add_argument("--no-report", action="store_true", help="do not render the report afterwards")
    parser.add_argument("--snapshot", action="store_true", help="render into the committed reports/<scale>/ (default: outputs/reports/<scale>)")
    parser.add_argument(
        "--records",
        type=Path,
        help="committed run records to restore (default reports/<scale>/runs here; e.g. the main checkout's when the study runs from a worktree pinned to older code)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options

    study = load_study(args.study)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    study = with_seeds(study, seeds)
    common = [f"scale={args.scale}", f"logger={args.logger}", f"study={Path(args.study).stem}", *args.overrides] + (
        ["force=true"] if args.force else []
    )
    if args.records is not None and not args.records.is_dir():
        parser.error(f"--records {args.records}: no such directory (a folder like reports/{args.scale}/runs)")
    runs = plan(study, common, args.records)
    if not args.force and (restored := restore_records(runs)):
        where = args.records or Path(RECORDS.name) / args.scale / "runs"
        print(f"[flix study] {restored} run(s) restored from their committed records under {where}")
    print(f"[flix study] {args.study} at scale {args.scale}: {len(runs)} runs, {counts(runs)}" + (" (forced again)" if args.force else ""))
    if found := problems(runs):
        for message in found:
            print(f"flix study: error: {message}", file=sys.stderr)
        print("flix study: nothing was launched.", file=sys.stderr)
        return 2
    started = time.time()
    launch(study, common, args.launcher, args.jobs)
    print(f"[flix study] {len(runs)} runs, {counts(runs)} in {time.time() - started:.0f}s")
    failed = False
    for r in runs:  # one line for each run not complete
        status, why = r.state()
        if status != "done":
            failed |= status != "running"  # another process's run is not a failure of this study
            print(
                f"[flix study] {'RUNNING ELSEWHERE' if status == 'running' else 'FAILED'} {' '.join(r.overrides)} -> {r.run_dir}: {why}",
                file=sys.stderr,
            )
    if not args.no_report:
        _report(args.scale, args.logger, args.snapshot)
    return 1 if failed else 0


def counts(runs: list[PlannedRun]) -> str:
    """7 complete, 1 damaged: how many runs are in each state, complete first."""
    found = Counter(r.status for r in runs)
    names = {"done": "complete", "running": "being trained by another process"}
    return ", ".join(f"{found[s]} {names.get(s, s)}" for s in ("done", "running", "damaged", "failed", "missing") if found[s] or s == "done")


def _report(scale: str, logger: str, snapshot: bool) -> None:
    from flix.report.cli import main as report

    runs = REPO / os.environ.get("FLIX_RUNS", "runs") / scale
    where = ["--snapshot"] if snapshot else []  # else flix report's uncommitted default ($FLIX_REPORTS)
    if os.environ.get("WANDB_MODE", "offline") == "offline":
        os.environ.setdefault("WANDB_SILENT", "true")  # the report's W&B runs, like the training runs: no banners
    report(["--runs", str(runs), "--scale", scale, *where] + (["--wandb"] if logger == "wandb" else []))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before or after a sweep (during one, run_child says what stopped)
        print("[flix study] stopped by Ctrl-C; rerun to go on", file=sys.stderr)
        sys.exit(130)
