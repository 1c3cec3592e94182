"""Faults a run must survive: crafted and truncated checkpoints, kills at random moments,
two processes on one run, a killed study, a full disk, bad settings and files, corrupted
results and runs of different settings in one report cell. (Data-layer faults: a user's
file in the download folder, gzip bombs and duplicate members in tests/test_download.py;
NER targets that disagree with their spans, unknown labels, deep nesting and empty files
in tests/test_reader.py and tests/test_metrics.py.)"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import train_cmd
from test_report import PAPER, write_run

from flix.io import COMPLETE, atomic_dir, atomic_write_text, recover, recover_tree
from flix.lock import RunLocked, run_lock
from flix.pipeline.checkpoint import STATE, load_checkpoint, save_checkpoint
from flix.pipeline.checks import ConfigError, check_run
from flix.pipeline.run_config import load_mixture_for
from flix.pipeline.trainer import Trainer
from flix.report.render import render

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def faults_cmd(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    """A run long enough to kill at random moments, checkpointing every step."""
    return train_cmd(run_dir, data_root, "scale.steps=24", "scale.eval_every=6", "scale.checkpoint_every=1", *extra)


def leftovers(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".old"))]


def newest_complete_step(run_dir: Path) -> int:
    """The step of the newest checkpoint a resume could use (read only: nothing moved)."""
    ckpts = run_dir / "checkpoints"
    candidates = [ckpts / "latest", ckpts / ".latest.old", *[t for t in ckpts.glob(".latest.*.tmp") if (t / COMPLETE).exists()]]
    steps = [torch.load(c / STATE, weights_only=True)["step"] for c in candidates if (c / STATE).is_file()]
    return max(steps, default=0)


# -- checkpoints -------------------------------------------------------------------------


class _Exploit:
    """Unpickling this runs a command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def trainer(compose, tmp_path):
    cfg = compose("mixture=multitask_sw")
    return Trainer.from_config(cfg, load_mixture_for(cfg), tmp_path)


def test_crafted_checkpoint_is_refused_and_runs_nothing(trainer, tmp_path):
    """A state.pt that would run code on unpickling is refused with a message naming the
    file and what to do, and its code never runs; a real checkpoint loads with weights_only."""
    good = tmp_path / "checkpoints" / "good"
    save_checkpoint(good, trainer.model, trainer.optimizer, trainer.scheduler, {"step": 3})
    assert load_checkpoint(good, trainer.model, trainer.optimizer, trainer.scheduler)["step"] == 3

    marker = tmp_path / "pwned"
    bad = tmp_path / "checkpoints" / "latest"
    bad.mkdir(parents=True)
    torch.save({"adapter": _Exploit(marker)}, bad / STATE)
    with pytest.raises(RuntimeError, match=r"state\.pt: refused to load.*Delete"):
        load_checkpoint(bad, trainer.model, trainer.optimizer, trainer.scheduler)
    assert not marker.exists()


def test_truncated_checkpoint_names_its_file(trainer, tmp_path):
    path = tmp_path / "checkpoints" / "latest"
    save_checkpoint(path, trainer.model, trainer.optimizer, trainer.scheduler, {"step": 3})
    data = (path / STATE).read_bytes()
    (path / STATE).write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=rf"{path / STATE}: unreadable checkpoint.*Delete"):
        load_checkpoint(path, trainer.model, trainer.optimizer, trainer.scheduler)


def test_full_disk_names_the_checkpoint_and_keeps_the_last_one(trainer, tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "latest"
    save_checkpoint(path, trainer.model, trainer.optimizer, trainer.scheduler, {"step": 3})

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # where a full disk surfaces
    with pytest.raises(OSError, match=rf"no space left on device while writing {path}"):
        save_checkpoint(path, trainer.model, trainer.optimizer, trainer.scheduler, {"step": 4})
    with pytest.raises(OSError, match=rf"no space left on device while writing {tmp_path / 'results.json'}"):
        atomic_write_text(tmp_path / "results.json", "{}")
    monkeypatch.undo()
    assert load_checkpoint(path, trainer.model, trainer.optimizer, trainer.scheduler)["step"] == 3
    assert leftovers(tmp_path) == [] and not (tmp_path / "results.json").exists()


# -- crash-safe replacement ------------------------------------------------------------------


def _complete_dir(path: Path, step: int, complete: bool = True) -> None:
    path.mkdir(parents=True)
    (path / "step").write_text(str(step))
    if complete:
        (path / COMPLETE).touch()


@pytest.mark.parametrize(
    "state, expected",
    [
        ({"old": 1}, 1),  # killed between the renames: only .old
        ({"old": 1, "tmp": 2}, 2),  # same, the new copy complete: the newer wins
        ({"path": 1, "tmp": 2}, 2),  # killed after the write, before the renames
        ({"path": 1, "partial": 2}, 1),  # killed while writing: the partial copy goes
        ({"partial": 2}, None),
    ],
)
def test_recover_finds_the_newest_complete_copy(tmp_path, state, expected):
    path = tmp_path / "latest"
    if "path" in state:
        _complete_dir(path, state["path"])
    if "old" in state:
        _complete_dir(tmp_path / ".latest.old", state["old"])
    if "tmp" in state:
        _complete_dir(tmp_path / ".latest.abcd1234.tmp", state["tmp"])
    if "partial" in state:
        _complete_dir(tmp_path / ".latest.zzzz9999.tmp", state["partial"], complete=False)
    found = recover(path)
    assert (found and int((path / "step").read_text())) == (expected or None)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["latest"] if expected else [])


def test_recover_tree_removes_killed_writes_only(tmp_path):
    (tmp_path / "tables").mkdir()
    killed = tmp_path / "tables" / ".test.csv.k2j4_x9a.tmp"
    killed.write_text("half")
    mine = tmp_path / "notes.tmp"  # not a flix temp name: kept
    mine.write_text("user file")
    _complete_dir(tmp_path / "checkpoints" / ".latest.old", 5)
    recover_tree(tmp_path)
    assert not killed.exists() and mine.exists()
    assert (tmp_path / "checkpoints" / "latest" / "step").read_text() == "5"


@pytest.mark.slow
def test_kills_at_random_moments_lose_nothing(tmp_path, data_root):
    """SIGKILL a run at random moments (bounded: 5 kills or 150 s), then let it finish: no
    complete checkpoint is ever lost, no temp is left, and the results equal an
    uninterrupted run's."""
    full = tmp_path / "full"
    subprocess.run(faults_cmd(full, data_root), check=True, env=ENV, capture_output=True, cwd=REPO)
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    newest, kills, deadline = 0, 0, time.time() + 150
    while kills < 5 and time.time() < deadline and not (run_dir / "results.json").exists():
        proc = subprocess.Popen(faults_cmd(run_dir, data_root), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        time.sleep(rng.uniform(3.0, 9.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        step = newest_complete_step(run_dir) if run_dir.exists() else 0
        assert step >= newest, f"kill {kills}: the newest complete checkpoint went from step {newest} to {step}"
        newest = step
        if (run_dir / "results.json").exists():
            json.loads((run_dir / "results.json").read_text())  # whole, never half-written
    subprocess.run(faults_cmd(run_dir, data_root), check=True, env=ENV, capture_output=True, cwd=REPO)
    assert leftovers(run_dir) == []
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, run_dir))
    for key in ("best_step", "validation", "test", "history", "train_loss"):
        assert a[key] == b[key], key


# -- one process per run ---------------------------------------------------------------------


@pytest.mark.slow
def test_second_process_on_a_running_run_exits_naming_the_holder(tmp_path, data_root):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        out = subprocess.run(faults_cmd(run_dir, data_root), env=ENV, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1
    assert f"is being run by pid {os.getpid()}" in out.stderr and "Traceback" not in out.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "failed.json").exists()


@pytest.mark.slow
def test_two_processes_on_one_run_do_the_work_once(tmp_path, data_root):
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen(faults_cmd(run_dir, data_root), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(2)
    ]
    outs = [(p.communicate()[1], p.returncode) for p in procs]
    assert sorted(code for _, code in outs) in ([0, 0], [0, 1]), outs
    for err, code in outs:
        assert "Traceback" not in err and "resuming" not in err  # nobody took over the other's work
        assert code == 0 or "is being run by pid" in err
    json.loads((run_dir / "results.json").read_text())


def test_a_holder_caught_before_it_writes_its_name_is_still_named(tmp_path):
    """The second process may try the lock between the holder's flock and its write of
    its pid: it reads the file again until the name is there."""
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, nothing written yet
    writer = threading.Timer(0.3, lambda: os.pwrite(fd, b"pid 4242 on elsewhere since now\n", 0))
    writer.start()
    try:
        with pytest.raises(RunLocked, match="is being run by pid 4242 on elsewhere"):
            with run_lock(run_dir):
                pass
    finally:
        writer.join()
        os.close(fd)


def test_a_waiting_process_gets_the_lock_when_it_is_released(tmp_path):
    got = threading.Event()

    def wait_for_it():
        with run_lock(tmp_path, wait=True):
            got.set()

    with run_lock(tmp_path):
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.5)
        assert not got.is_set()
        with pytest.raises(RunLocked, match="is being run by pid"):
            with run_lock(tmp_path):
                pass
    waiter.join(10)
    assert got.is_set()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from flix.lock import run_lock\nimport time\nwith run_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
        with run_lock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path):  # the OS released it with its holder; the stale file is no obstacle
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def _alive_with(env_value: str) -> list[int]:
    """Pids of live processes whose environment holds env_value."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and env_value.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_sigterm_to_a_study_stops_its_sweep_too(tmp_path, data_root):
    study = tmp_path / "long.yaml"
    study.write_text("sweeps:\n  - method: [flix]\n    mixture: [multitask_sw]\n")
    runs = tmp_path / "runs"
    env = {**ENV, "FLIX_RUNS": str(runs), "FLIX_DATA_ROOT": str(data_root)}
    log = tmp_path / "study.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flix.pipeline.study",
            str(study),
            "--logger",
            "none",
            "--no-report",
            "--",
            "scale.steps=500",
            "scale.checkpoint_every=50",
            "scale.eval_every=250",
            "train.threads=1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        cwd=REPO,
    )
    deadline = time.time() + 120
    while not list(runs.rglob(".lock")):
        assert time.time() < deadline and proc.poll() is None, "the sweep never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in log.read_text()
    assert _alive_with(str(runs)) == []
    with run_lock(next(runs.rglob(".lock")).parent):
        pass


# -- bad input up front ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("scale.steps=0", "scale.steps"),
        ("scale.eval_every=0", "scale.eval_every"),
        ("scale.checkpoint_every=0", "scale.checkpoint_every"),
        ("scale.micro_batch_size=0", "scale.micro_batch_size"),
        ("scale.eval_examples=0", "scale.eval_examples"),
        ("scale.warmup_steps=-1", "scale.warmup_steps"),
        ("scale.warmup_steps=100", "scale.warmup_steps"),
        ("rank.lang=0", "rank.lang"),
        ("dropout=1.0", "dropout"),
        ("model=gemma3_270m model.path=/no/such/model", "model.path"),
        ("model=hub model.name=/no/such/model", "model.name"),
    ],
)
def test_bad_settings_fail_before_anything_loads(compose, override, key):
    cfg = compose("mixture=multitask_sw", *override.split())
    with pytest.raises(ConfigError, match=rf"{key}="):
        check_run(cfg, load_mixture_for(cfg))


def test_an_empty_test_file_fails_before_training(compose, data_root, tmp_path):
    root = tmp_path / "data"
    for task in ("ner", "qa_in_lang"):
        for split in ("train", "validation", "test"):
            (root / task / split).mkdir(parents=True)
            for src in (data_root / task / split).glob("*.jsonl"):
                (root / task / split / src.name).write_bytes(b"" if split == "test" and src.stem == "sw" and task == "ner" else src.read_bytes())
    cfg = compose("mixture=multitask_sw", f"data.root={root}")
    with pytest.raises(ConfigError, match=rf"{root / 'ner' / 'test' / 'sw.jsonl'}: empty"):
        check_run(cfg, load_mixture_for(cfg))


def test_usage_errors_exit_2_without_a_traceback(tmp_path, data_root):
    run_dir = tmp_path / "run"
    out = subprocess.run(faults_cmd(run_dir, data_root, "scale.steps=0"), env=ENV, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "scale.steps=0: must be an integer >= 1" in out.stderr and "Traceback" not in out.stderr
    assert not run_dir.exists()  # refused before Hydra: no run folder, no failed.json to show up in reports


# -- what the report reads ---------------------------------------------------------------------


def test_report_never_averages_runs_of_different_settings(tmp_path):
    root = tmp_path / "smoke"
    for seed, steps in ((0, 24), (1, 99)):  # the same cell, but one trained longer
        run_dir = write_run(root, ("flix", "multilingual_ner", seed, 0.7, None), {"ner": 50.0 + seed})
        results = json.loads((run_dir / "results.json").read_text())
        results["config"]["scale"]["steps"] = steps
        (run_dir / "results.json").write_text(json.dumps(results))
    summary = render(root, tmp_path / "out", "smoke", PAPER)
    assert summary["tables"]["table2"]["filled"] == 0
    assert "runs of different settings, not averaged (scale.steps: 24 vs 99)" in (tmp_path / "out" / "table2.md").read_text()
    # one setting again: averaged over both seeds
    results["config"]["scale"]["steps"] = 24
    (run_dir / "results.json").write_text(json.dumps(results))
    assert render(root, tmp_path / "out", "smoke", PAPER)["tables"]["table2"]["filled"] == 1


def test_report_skips_a_corrupted_results_json_and_renders_the_rest(tmp_path):
    root = tmp_path / "smoke"
    write_run(root, ("flix", "multilingual_ner", 0, 0.7, None), {"ner": 50.0})
    broken = write_run(root, ("compute_matched", "multilingual_ner", 0, 0.7, None), {"ner": 40.0})
    text = (broken / "results.json").read_text()
    (broken / "results.json").write_text(text[: len(text) // 2])
    summary = render(root, tmp_path / "out", "smoke", PAPER)
    assert summary["runs"] == 1 and summary["tables"]["table2"]["filled"] >= 1
    assert summary["unreadable"] and str(broken / "results.json") in summary["unreadable"][0]


def test_a_damaged_results_json_is_named_and_force_runs_again(compose, tmp_path):
    from flix.pipeline.run import run

    cfg = compose("mixture=multitask_sw")
    run(cfg, tmp_path)
    (tmp_path / "results.json").write_text('{"method": "fl')
    with pytest.raises(RuntimeError, match=rf"{tmp_path / 'results.json'}: unreadable.*force=true"):
        run(cfg, tmp_path)
    assert run(compose("mixture=multitask_sw", "force=true"), tmp_path)["method"] == "flix"


def test_files_are_written_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert (atomic_write_text(tmp_path / "a.json", "{}").stat().st_mode & 0o777) == 0o644
        with atomic_dir(tmp_path / "adapter") as d:
            (d / "w").write_text("x")
        assert ((tmp_path / "adapter").stat().st_mode & 0o777) == 0o755
    finally:
        os.umask(old)
