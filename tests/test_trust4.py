"""Trust, round 4 (issue 38): committed run records are input. One real smoke run's record,
copied into a scratch runs root and edited one field at a time, must never write outside
the report, stand in for another run, bring a file in through a link, crash a report, be
counted twice, or be half-copied; LaTeX comments stay comments; a snapshot keeps the
user's files."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "flix" / "report" / "paper"
FAST = ["scale.steps=2", "scale.eval_every=2", "scale.eval_examples=2", "scale.test_examples=2", "train.threads=1"]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, data_root):
    """A one-run study (FLix on multilingual NER, smoke) trained for real: its name, its
    planned run, and the run's folder (named by its config hash, as the pipeline names it)."""
    from flix.pipeline import study

    tmp = tmp_path_factory.mktemp("trust4")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLIX_RUNS", str(tmp / "runs"))
        mp.setenv("FLIX_DATA_ROOT", str(data_root))
        (tmp / "one.yaml").write_text(json.dumps({"sweeps": [{"method": ["flix"], "mixture": ["multilingual_ner"]}]}))
        name = str(tmp / "one.yaml")
        assert study.main([name, "--logger", "none", "--no-report", *FAST]) == 0
        (run,) = study.plan(study.load_study(name), ["scale=smoke", "logger=none", "study=one", *FAST])
    assert (run.run_dir / "results.json").is_file() and run.run_dir.name.startswith("flix-drop0.7-rankpaper-seed0-")
    return name, run


@pytest.fixture
def runs(tmp_path, study_run):
    """A scratch runs root with a copy of the real run (its folder name kept): (root, run folder)."""
    _, run = study_run
    root = tmp_path / "runs" / "smoke"
    copy = root / "multilingual_ner" / run.run_dir.name
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "best_adapter", ".lock"))
    return root, copy


def edit(run_dir: Path, change) -> None:
    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    change(results)
    path.write_text(json.dumps(results))


def report(root: Path, out: Path) -> dict:
    from flix.report.render import render

    return render(root, out, "smoke", PAPER)


# -- 1: names used in paths ---------------------------------------------------------------


def test_a_record_cannot_write_outside_the_report(tmp_path, runs):
    root, run = runs
    good = run.with_name(run.name.replace("seed0", "seed1"))  # a second run, so the report has one to render
    shutil.copytree(run, good)

    def pwned(results):
        results["mixture"] = results["config"]["mixture"]["name"] = "x/../../../pwned"

    edit(run, pwned)
    edit(good, lambda r: r["config"].update(seed=1, run_name=good.name))
    out = tmp_path / "a" / "b" / "c" / "out"
    summary = report(root, out)  # before: pwned.md and pwned.csv three levels above out, exit 0
    assert not [p for p in tmp_path.rglob("*pwned*")]
    assert summary["runs"] == 1 and "mixture is 'x/../../../pwned', not a plain name" in summary["unreadable"][0]


# -- 2: a record stands only for its own run --------------------------------------------------


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda r: r["config"].update(dropout=0.3), "its run name 'flix-drop0.7-"),
        (lambda r: (r["config"]["scale"].update(steps=100000), r.update(config_hash="0123456789")), "config_hash '0123456789'"),
    ],
    ids=["dropout", "steps-and-hash"],
)
def test_a_record_edited_into_another_setting_is_refused(tmp_path, runs, study_run, change, reason, capsys):
    from flix.pipeline import study
    from flix.report.collect import collect

    _, planned = study_run
    root, run = runs
    edit(run, change)
    assert reason in collect(root, "smoke").unreadable[0][1]  # the report names it
    records = tmp_path / "records"
    shutil.copytree(root, records)
    fresh = study.PlannedRun(planned.overrides, tmp_path / "fresh" / planned.run_dir.name, planned.cfg, records / "multilingual_ner" / run.name)
    assert study.restore_records([fresh]) == 0  # before: restored, and the planned run never trained
    assert not (fresh.run_dir / "results.json").exists() and "not restored" in capsys.readouterr().err


def test_a_record_whose_config_decides_other_results_is_not_restored(tmp_path, runs, study_run, capsys):
    """More steps with the hash and the run name left alone: only recomputing what decides the
    run's results from the record's config tells it from the planned run."""
    from flix.pipeline import study

    _, planned = study_run
    root, run = runs
    edit(run, lambda r: r["config"]["scale"].update(steps=100000))
    fresh = study.PlannedRun(planned.overrides, tmp_path / "fresh" / planned.run_dir.name, planned.cfg, run)
    assert study.restore_records([fresh]) == 0
    err = capsys.readouterr().err
    assert "scale.steps: 100000 recorded, 2 planned" in err and "the run trains again" in err
    # the record as trained is restored
    shutil.rmtree(run)
    shutil.copytree(planned.run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "best_adapter", ".lock"))
    assert study.restore_records([fresh]) == 1 and fresh.status == "done"


# -- 3 and 10: regular files only -------------------------------------------------------------


def test_records_copy_no_file_through_a_link(tmp_path, runs, capsys):
    from flix.record import main as records

    root, run = runs
    secret = tmp_path / "secret"
    secret.write_text("not for the repository\n")
    (run / "train.log").unlink()
    (run / "train.log").symlink_to(secret)
    dest = tmp_path / "dest"
    assert records([str(root), str(dest)]) == 1  # before: 0, and the secret's text in dest/.../train.log
    assert "train.log is not a regular file" in capsys.readouterr().err and not list(dest.rglob("*"))

    (run / "train.log").unlink()
    (run / "train.log").write_text("a log\n")
    target = dest / "multilingual_ner" / run.name
    target.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    (target / "train.log").symlink_to(victim)  # a link already in DEST
    assert records([str(root), str(dest)]) == 0
    assert victim.read_text() == "mine\n"  # before: overwritten through the link
    assert not (target / "train.log").is_symlink() and (target / "train.log").read_text() == "a log\n"


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_report_reads_no_device_or_fifo(tmp_path, runs, kind):
    root, run = runs
    predictions = sorted((run / "predictions" / "test").glob("*.jsonl"))[0]
    predictions.unlink()
    if kind == "fifo":
        os.mkfifo(predictions)
    else:
        predictions.symlink_to("/dev/zero")
    script = f"from flix.report.render import render; s = render({str(root)!r}, {str(tmp_path / 'out')!r}, 'smoke', {str(PAPER)!r}); print(s['runs'])"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=REPO)  # before: a hang
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
    (row,) = csv.DictReader((tmp_path / "out" / "runs.csv").open())
    assert row["empty_test"] == ""  # not counted: a file that is not one is not read


# -- 5, 6, 12, 16: one schema; a bad record is named and skipped ------------------------------


def set_key(keys: str, value):
    def change(results):
        *inner, last = keys.split(".")
        target = results
        for key in inner:
            target = target[key]
        target[last] = value

    return change


def drop_key(key: str):
    return lambda results: results.pop(key)


def first_lang(results) -> str:
    return results["eval_sets"]["ner"]["langs"][0]


def edit_scores(key: str, value: float):
    """Every language's `key` score (test, test_nll) and its set's average set to `value`:
    a record consistent in itself except with its per-example statistics."""

    def change(results):
        results[key]["ner"] = {lang: value for lang in results[key]["ner"]}
        results["eval_sets"]["ner"][key] = value

    return change


@pytest.mark.parametrize(
    "change, reason",
    [
        (set_key("versions", [1]), "versions is [1], not a {package: version} object"),
        (set_key("eval_sets.ner.test", "77.7"), "eval_sets ner test is '77.7', not a finite number"),
        (set_key("config.train.dropout_mode", 5), "config.train.dropout_mode is 5, not a plain name"),
        (set_key("test_ids", 3), "test_ids is not a {task: {language: [one per example]}} object"),
        (set_key("eval_sets.ner.langs", "am"), "eval_sets ner langs is 'am', not a list of languages"),
        (drop_key("eval_sets"), "no eval_sets"),
        (set_key("eval_sets.ner.test", 1e308), "eval_sets ner test is 1e+308, but its languages' test scores average"),
        (lambda r: r["test_stats"]["ner"][first_lang(r)][0].__setitem__(0, float("nan")), "test_stats of ner/"),
        (edit_scores("test", 77.7), "is 77.7, but its examples' test_stats give 0.0"),
        (edit_scores("test_nll", 0.5), "is 0.5, but its examples' test_example_nll give"),
        (lambda r: r["test"]["ner"].update({'=HYPERLINK("x")': 1.0}), "test language of ner is '=HYPERLINK(\"x\")', not a plain name"),
        (set_key("model", "tiny\n\\input{/etc/passwd}"), "model is 'tiny\\n\\\\input{/etc/passwd}', not one line of text"),
    ],
    ids=[
        "versions",
        "string-score",
        "dropout-mode",
        "test-ids",
        "langs-string",
        "no-eval-sets",
        "average",
        "nan-stats",
        "score-vs-stats",
        "nll-vs-examples",
        "csv",
        "newline",
    ],
)
def test_a_record_off_the_schema_is_named_and_skipped(tmp_path, runs, change, reason):
    from flix.pipeline import study

    root, run = runs
    good = run.with_name(run.name.replace("seed0", "seed1"))
    shutil.copytree(run, good)
    edit(good, lambda r: r["config"].update(seed=1, run_name=good.name))
    edit(run, change)
    summary = report(root, tmp_path / "out")  # before: a traceback, or (no eval_sets) the run silently left out
    assert summary["runs"] == 1 and len(summary["unreadable"]) == 1, summary["unreadable"]
    assert summary["unreadable"][0].startswith(str(run / "results.json")) and reason in summary["unreadable"][0], summary["unreadable"]
    assert study.PlannedRun([], run).status == "damaged"  # before: complete
    for tex in (tmp_path / "out").glob("*.tex"):
        assert not [line for line in tex.read_text().splitlines() if line.startswith("\\input")]


def test_an_interval_is_shown_only_for_the_value_it_rests_on(tmp_path, runs, monkeypatch):
    """The print path, should a record reach it unchecked: a value its per-example statistics do
    not give is shown without an interval and with a note saying why (before: 77.7 [0.0, 0.0]);
    statistics that are not finite give no "[nan, nan]"."""
    import numpy as np

    from flix.record import check
    from flix.report.cells import Cell
    from flix.report.formats import cell_text
    from flix.report.tables import DASH
    from flix.report.uncertainty import Evidence

    root, run = runs
    edit(run, edit_scores("test", 77.7))
    monkeypatch.setattr(check, "_check_example_scores", lambda results, scores: None)  # a path around the record check
    summary = report(root, tmp_path / "out")
    assert summary["runs"] == 1 and not summary["unreadable"]
    table = (tmp_path / "out" / "table2.md").read_text()
    assert "77.7" in table and "77.7 [" not in table  # before: 77.7 [0.0, 0.0]°
    assert "no interval (its runs' per-example statistics give 0, not the value shown (77.7))" in table
    nan = Evidence((0,), np.array([float("nan")]), np.full((100, 1), float("nan")), ())
    assert cell_text(Cell(float("nan"), None, evidence=nan)) == DASH  # before: "nan [nan, nan]°"
    assert "[" not in cell_text(Cell(1.0, None, evidence=nan))


def test_a_newline_in_recorded_text_stays_in_its_latex_comment(runs):
    from flix.report.collect import collect
    from flix.report.formats import Page, table_tex
    from flix.report.tables import build_all

    root, _ = runs
    index = collect(root, "smoke")
    index.finished[0].model = "tiny\n\\input{/etc/passwd}"  # what a record could say, were it read
    index.finished[0].versions = {"torch\n\\input{/etc/shadow}": "2\n\\input{/etc/group}"}
    page = Page("smoke", "now")
    for table in build_all(index, PAPER):
        lines = table_tex(table, page).splitlines()
        assert not [line for line in lines if line.startswith("\\input")], lines[:12]


# -- 7, 8, 16: copies counted once; a copy is whole or absent --------------------------------------


def test_copies_of_one_run_count_once(tmp_path, runs):
    from flix.record import main as records

    root, run = runs
    assert records([str(root), str(root / "copy")]) == 0
    assert records([str(root), str(root / "copy")]) == 0  # before: copy/copy/..., three "seeds"
    assert len(list(root.rglob("results.json"))) == 2
    summary = report(root, tmp_path / "out")
    assert summary["runs"] == 1 and len(summary["duplicates"]) == 1 and "counted once" in summary["duplicates"][0]
    cells = (tmp_path / "out" / "cells.csv").read_text()
    assert "0 0" not in cells


def test_a_copy_that_fails_half_way_leaves_no_record(tmp_path, runs, monkeypatch, capsys):
    import errno

    from flix.record import copy as record_copy
    from flix.record import main as records

    root, run = runs
    real = shutil.copyfileobj

    def full_disk(source, target, *args):
        if "predictions" in target.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target, *args)

    monkeypatch.setattr(record_copy.shutil, "copyfileobj", full_disk)
    dest = tmp_path / "dest"
    assert records([str(root), str(dest)]) == 1
    err = capsys.readouterr().err  # one line naming the file and what to do
    assert err.count("\n") == 1 and f"no space left on device while writing {dest}" in err and "free space" in err
    assert not list(dest.rglob("results.json")) and not list(dest.rglob("*.jsonl"))  # before: whole results, torn predictions
    assert not [p for p in dest.rglob("*") if p.name.endswith(".tmp")]  # nothing left behind


def test_a_killed_copy_is_never_counted(tmp_path, runs):
    """What a kill -9 mid-copy leaves (a hidden temp folder) is no run, for the report or a copy."""
    from flix.report.collect import collect

    root, run = runs
    shutil.copytree(run, run.with_name(f".{run.name}.abcd1234.tmp"))
    assert len(collect(root, "smoke").finished) == 1 and not collect(root, "smoke").duplicates


def _restore_and_hang(fresh, flag: Path) -> None:
    """A study's restore that stops for good half-way through the predictions (to be killed)."""
    from flix.pipeline import study
    from flix.record import copy as record_copy

    real = shutil.copyfileobj

    def copy_then_hang(source, target, *args):
        real(source, target, *args)
        if "predictions" in target.name:
            flag.touch()
            time.sleep(600)

    record_copy.shutil.copyfileobj = copy_then_hang
    study.restore_records([fresh])


def test_a_study_killed_mid_restore_restores_the_run_next_time(tmp_path, runs, study_run):
    """kill -9 while a study restores a record: no complete-looking run is left, and the next
    study restores the record whole (before: results.json and torn predictions, which every
    later study took for a finished run and never restored again)."""
    import multiprocessing

    from flix.pipeline import study

    _, planned = study_run
    root, run = runs
    fresh = study.PlannedRun(planned.overrides, tmp_path / "fresh" / planned.run_dir.name, planned.cfg, run)
    flag = tmp_path / "copying"
    child = multiprocessing.get_context("fork").Process(target=_restore_and_hang, args=(fresh, flag))
    child.start()
    deadline = time.monotonic() + 120
    while not flag.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert flag.exists()
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    fresh = study.PlannedRun(planned.overrides, fresh.run_dir, planned.cfg, run)
    assert fresh.status == "missing"  # what the kill left is no run
    assert study.restore_records([fresh]) == 1 and fresh.status == "done"
    from flix.record.copy import record_files

    for name in record_files(run):
        assert (fresh.run_dir / name).read_bytes() == (run / name).read_bytes(), name
    assert not list(fresh.run_dir.parent.glob(".*"))  # the killed copy's temp folder is gone


def test_records_replace_an_older_record_whole_and_say_so(tmp_path, runs, capsys):
    from flix.record import main as records

    root, run = runs
    dest = tmp_path / "dest"
    target = dest / "multilingual_ner" / run.name
    target.mkdir(parents=True)
    (target / "failed.json").write_text('{"error": "an older failure"}')
    (target / "results.json").write_text("{}")
    assert records([str(root), str(dest)]) == 0
    assert not (target / "failed.json").exists()  # before: kept, stale
    assert (target / "results.json").read_text() == (run / "results.json").read_text()
    assert f"{target}: the record there was replaced" in capsys.readouterr().err


def test_export_to_a_file_is_one_line(tmp_path, capsys):
    from flix.pipeline.export_command import main as export_main

    out = tmp_path / "adapters"
    out.write_text("a file")
    assert export_main([str(tmp_path / "none"), str(out), "--model", "tiny"]) == 2  # before: FileExistsError traceback
    assert f"{out} is a file, not a folder" in capsys.readouterr().err


# -- 4: a snapshot removes only what a render wrote ---------------------------------------------


def test_snapshot_keeps_the_users_files(tmp_path, runs):
    from flix.report.cli import main as report_main

    root, _ = runs
    out = tmp_path / "paper"
    out.mkdir()
    (out / "thesis.tex").write_text("my thesis\n")
    (out / "table9.md").write_text("a table an older render made\n")
    assert report_main(["--runs", str(root), "--out", str(out), "--snapshot"]) == 0
    assert (out / "thesis.tex").read_text() == "my thesis\n"  # before: deleted
    assert not (out / "table9.md").exists()  # no manifest yet: the report's own names go
    (out / "table9.md").write_text("the user's now\n")
    assert report_main(["--runs", str(root), "--out", str(out), "--snapshot"]) == 0
    assert (out / "table9.md").exists() and (out / "thesis.tex").exists()  # the last render did not write it


# -- 14: a render that fails half-way leaves the last report whole ------------------------------


def test_a_failed_render_leaves_the_last_report_whole(tmp_path, runs, monkeypatch):
    import errno

    from flix.report import figure

    root, run = runs
    out = tmp_path / "out"
    report(root, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    second = run.with_name(run.name.replace("seed0", "seed1"))  # a second seed: every table changes
    shutil.copytree(run, second)
    edit(second, lambda r: r["config"].update(seed=1, run_name=second.name))

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(figure, "plot", full_disk)  # tables and appendices are written by then
    with pytest.raises(OSError):
        report(root, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # before: new tables beside the old figure


# -- 15: a data file that cannot be read is found before training -------------------------------


@pytest.mark.parametrize("damage", ["folder", "dangling-link", "not-utf8"])
def test_a_test_file_that_cannot_be_read_is_found_before_training(tmp_path, data_root, damage):
    from conftest import train_cmd

    from flix.data import reader
    from flix.pipeline.run_config import compose, load_mixture_for

    root = tmp_path / "data"  # the data, file by file through links, with one test file damaged
    for path in data_root.rglob("*"):
        if path.is_file():
            (root / path.relative_to(data_root)).parent.mkdir(parents=True, exist_ok=True)
            (root / path.relative_to(data_root)).symlink_to(path)
    mixture = load_mixture_for(compose([f"data.root={root}", "mixture=multitask_sw", "scale=smoke"]))
    test_file = reader.dataset_path(root, *[f for f in mixture.required_files() if f[1] == "test"][0])
    test_file.unlink()
    if damage == "folder":
        test_file.mkdir()
    elif damage == "dangling-link":
        test_file.symlink_to(tmp_path / "gone.jsonl")
    else:
        test_file.write_bytes('{"text": "ok", "target": "ok"}\n'.encode() + b'{"text": "caf\xe9", "target": ""}\n')
    run_dir = tmp_path / "run"
    done = subprocess.run(train_cmd(run_dir, root), capture_output=True, text=True, timeout=300, cwd=REPO)
    said = {"folder": "a folder", "dangling-link": "a dangling link", "not-utf8": ":2: not UTF-8 (byte 0xe9)"}[damage]
    assert done.returncode == 2 and said in done.stderr and str(test_file) in done.stderr, done.stderr[-2000:]
    assert not run_dir.exists() and "Traceback" not in done.stderr  # before: found after training and validation


# -- 13: a quantized base that cannot run is refused from the command line -----------------------


def test_a_quantized_base_that_cannot_run_is_refused_before_hydra(tmp_path, monkeypatch):
    import importlib.util

    from flix.pipeline import run_config

    fsdp = run_config.override_problems(["model.quantize=nf4", "train.parallel=fsdp"])
    assert fsdp and "FSDP shards floating-point weights" in fsdp[0]  # before: [] (Hydra ran, then a traceback)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    missing = run_config.override_problems(["model.quantize=nf4"])
    assert missing and "needs bitsandbytes, which is not installed" in missing[0]
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "flix.train", "model.quantize=nf4", "train.parallel=fsdp", "logger=none", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 2 and "FSDP shards floating-point weights" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not run_dir.exists()


# -- 14: a full disk (a real one: a small tmpfs in a user and mount namespace, no root needed) ------


def _can_mount_a_small_disk() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "mount -t tmpfs -o size=64k tmpfs /tmp 2>/dev/null"  # in its own mount namespace: /tmp here is untouched
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe], capture_output=True).returncode == 0


SMALL_DISK = pytest.mark.skipif(not _can_mount_a_small_disk(), reason="needs unshare (user and mount namespaces) to mount a small tmpfs")


def on_small_disk(disk: Path, size_kb: int, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the bash `script` (with $DISK, $PY and `args` as $1...) where DISK is a tmpfs of
    size_kb, seen by this command alone; whatever must outlive it is copied out by the script."""
    disk.mkdir()
    wrapped = f'mount -t tmpfs -o size={size_kb}k tmpfs "$DISK" || exit 99\n{script}'
    env = {**os.environ, "DISK": str(disk), "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    command = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", wrapped, "bash", *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode != 99, done.stderr
    return done


FILL = """import sys
with open(sys.argv[1], "ab", buffering=0) as f:  # the disk is full: one file takes every free block
    for chunk in (1 << 16, 512):
        try:
            while True:
                f.write(bytes(chunk))
        except OSError:
            pass
"""
SNAPSHOT = """
fill() { $PY "$S/fill.py" "$DISK/filler"; }
snapshot() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) > "$2"; find "$1" -name '.*' > "$2.hidden"; }
"""


@pytest.mark.slow
@SMALL_DISK
def test_a_full_disk_names_the_file_and_keeps_what_was_there(tmp_path, runs):
    """`flix report` and `flix records` into a full disk: one line naming the file and saying to
    free space, exit 1, the last report and the older record whole, no temp left behind
    (before: a traceback). An adapter, a peft export and a results.json likewise: the error
    names the path (before: `SafetensorError ... os error 28` without one), the old copy stays."""
    root, run = runs
    older = tmp_path / "older"  # one record; root gets a second seed (every table changes)
    shutil.copytree(root, older)
    second = run.with_name(run.name.replace("seed0", "seed1"))
    shutil.copytree(run, second)
    edit(second, lambda r: r["config"].update(seed=1, run_name=second.name))
    (run / "train.log").write_text("a newer log\n")  # the record in dest is replaced by a changed one
    seen = tmp_path / "seen"
    seen.mkdir()
    script = (
        SNAPSHOT
        + """
set -u
S=$1; OLDER=$2; ROOT=$3
$PY -m flix report --runs "$OLDER" --scale smoke --out "$DISK/out" > /dev/null 2>&1 || exit 98
$PY -m flix records "$OLDER" "$DISK/dest" 2> /dev/null || exit 97
snapshot "$DISK/out" "$S/out.before"; snapshot "$DISK/dest" "$S/dest.before"
fill
$PY -m flix report --runs "$ROOT" --scale smoke --out "$DISK/out" > /dev/null 2> "$S/report.err"; echo $? > "$S/report.rc"
$PY -m flix records "$ROOT" "$DISK/dest" 2> "$S/records.err"; echo $? > "$S/records.rc"
snapshot "$DISK/out" "$S/out.after"; snapshot "$DISK/dest" "$S/dest.after"
rm "$DISK/filler"
$PY - "$DISK" "$S" <<'PY'
import json, subprocess, sys
from pathlib import Path
import torch
from flix import FLixConfig, get_flix_model
from flix.base_models import load_model
from flix.io import atomic_write_json
disk, seen = map(Path, sys.argv[1:])
model = get_flix_model(load_model({"name": "tiny"})[0], FLixConfig(features={"task": ["ner"], "lang": ["sw"]}, ranks={"task": 2, "lang": 2}))
with torch.no_grad():
    next(iter(model.flix_layers().values())).flix_B[1:] = 0.5
model.save_pretrained(disk / "adapter")
model.export_peft({"task": "ner", "lang": "sw"}, disk / "peft")
atomic_write_json(disk / "results.json", {"test": 1})
kept = {p: p.read_bytes() for p in [*disk.rglob("adapter/*"), *disk.rglob("peft/*"), disk / "results.json"] if p.is_file()}
subprocess.run([sys.executable, str(seen / "fill.py"), str(disk / "filler")], check=True)
errors = {}
for name, write in [
    ("adapter", lambda: model.save_pretrained(disk / "adapter")),
    ("peft", lambda: model.export_peft({"task": "ner", "lang": "sw"}, disk / "peft")),
    ("results", lambda: atomic_write_json(disk / "results.json", {"test": 2})),
]:
    try:
        write()
        errors[name] = None
    except OSError as err:
        errors[name] = f"{type(err).__name__}: {err}"
    except Exception as err:  # what a full disk must not give
        errors[name] = f"not an OSError: {type(err).__name__}: {err}"
intact = all(p.read_bytes() == data for p, data in kept.items())
hidden = [str(p) for p in disk.rglob(".*") if p.name.endswith((".tmp", ".old"))]  # temp copies left behind
(seen / "writes.json").write_text(json.dumps({"errors": errors, "intact": intact, "hidden": hidden, "disk": str(disk)}))
PY
"""
    )
    (seen / "fill.py").write_text(FILL)
    done = on_small_disk(tmp_path / "disk", 8192, script, str(seen), str(older), str(root))
    assert done.returncode == 0, done.stderr[-3000:]
    disk = tmp_path / "disk"
    for command, folder in (("report", "out"), ("records", "dest")):
        err = (seen / f"{command}.err").read_text()
        assert (seen / f"{command}.rc").read_text().strip() == "1", err
        assert "Traceback" not in err and err.count("\n") == 1, err  # one line
        assert err.startswith(f"flix {command}: no space left on device while writing {disk / folder}/") and "free space" in err, err
        assert (seen / f"{folder}.after").read_text() == (seen / f"{folder}.before").read_text()  # the last report / record whole
        assert (seen / f"{folder}.after.hidden").read_text() == (seen / f"{folder}.before.hidden").read_text()  # no temp left
    writes = json.loads((seen / "writes.json").read_text())
    for name, path in (("adapter", disk / "adapter"), ("peft", disk / "peft"), ("results", disk / "results.json")):
        error = writes["errors"][name]
        assert error and error.startswith(f"WriteError: no space left on device while writing {path}") and "free space" in error, error
    assert writes["intact"] and not writes["hidden"], writes


@pytest.mark.slow
@SMALL_DISK
def test_a_full_disk_during_training_is_one_line_and_the_run_resumes(tmp_path, data_root):
    """A disk full before a run starts, or one that fills while the last checkpoint is written:
    one line naming the disk or the checkpoint folder and what to do, exit 1, the previous
    checkpoint whole (before: a traceback; for the adapter, `SafetensorError ... os error 28`
    without a path); once space is freed the same command resumes and gives the
    uninterrupted run's results."""
    from conftest import train_cmd

    reference = tmp_path / "reference"
    subprocess.run(train_cmd(reference, data_root), check=True, cwd=REPO, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    blocks = sum(-(-p.stat().st_size // 4096) * 4 for p in reference.rglob("*") if p.is_file())  # KiB, as tmpfs counts them
    checkpoint = (reference / "checkpoints" / "latest" / "state.pt").stat().st_size // 1024
    # room for the whole run, but not for a second checkpoint beside the first while it replaces it
    size = blocks + checkpoint // 2
    seen = tmp_path / "seen"
    seen.mkdir()
    script = """
S=$1; SIZE=$2; shift 2
"$@" hydra.run.dir="$DISK/run" > /dev/null 2> "$S/start.err"; echo $? > "$S/start.rc"; ls -A "$DISK" > "$S/start.ls"
mount -o remount,size=${SIZE}k "$DISK"
"$@" hydra.run.dir="$DISK/run" > /dev/null 2> "$S/full.err"; echo $? > "$S/full.rc"
cp -a "$DISK/run" "$S/after"
mount -o remount,size=262144k "$DISK"  # space freed
"$@" hydra.run.dir="$DISK/run" > /dev/null 2> "$S/resumed.err"; echo $? > "$S/resumed.rc"
cp -a "$DISK/run/results.json" "$S/results.json"; ls -a "$DISK/run" > "$S/resumed.ls"
"""
    disk = tmp_path / "disk"
    done = on_small_disk(disk, 32, script, str(seen), str(size), *train_cmd(disk / "unused", data_root)[:-1])
    assert done.returncode == 0, done.stderr[-3000:]
    # a disk full before the run starts: one line before Hydra writes anything (before: Hydra's traceback)
    assert (seen / "start.rc").read_text().strip() == "1" and not (seen / "start.ls").read_text().strip()
    assert (seen / "start.err").read_text() == (
        f"flix.train: error: no space left on device under {disk} (32 KiB free): free space on that disk and run the command again\n"
    )
    err = (seen / "full.err").read_text()
    assert (seen / "full.rc").read_text().strip() == "1", err[-3000:]
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
    (line,) = [line for line in err.replace("\r", "\n").splitlines() if "no space left" in line]  # said once
    assert line.endswith(
        f"flix.train: error: no space left on device while writing {disk / 'run' / 'checkpoints' / 'latest'}: "
        "free space on that disk and run the command again (the run resumes from its last checkpoint)"
    ), line
    after = seen / "after"
    import torch

    assert torch.load(after / "checkpoints" / "latest" / "state.pt", weights_only=True)["step"] == 2  # the previous one, whole
    assert not [p for p in after.rglob("*") if p.name.endswith((".tmp", ".old"))] and not (after / "results.json").exists()
    resumed = (seen / "resumed.err").read_text()
    assert (seen / "resumed.rc").read_text().strip() == "0", resumed[-3000:]
    assert "from step 2" in resumed
    got, want = json.loads((seen / "results.json").read_text()), json.loads((reference / "results.json").read_text())
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6) and got["test"] == want["test"]
    assert got["test_nll"] == want["test_nll"] or all(got["test_nll"][t] == pytest.approx(v, rel=1e-6) for t, v in want["test_nll"].items())
    assert "failed.json" not in (seen / "resumed.ls").read_text().split()


LAUNCH = [sys.executable, "-m", "flix", "launch", "--standalone", "--nproc_per_node=2", "-m", "flix.train"]


@pytest.mark.slow
def test_a_settings_error_under_flix_launch_is_one_line(tmp_path, data_root):
    """Two processes meet the same missing data root: the first says it, once; no torchrun
    summary (before: the line twice, then torchrun's ChildFailedError traceback); no run folder."""
    run_dir = tmp_path / "run"
    args = ["scale=smoke", "mixture=multitask_sw", "logger=none", "data.root=/nonexistent/xtreme_up", f"hydra.run.dir={run_dir}"]
    done = subprocess.run([*LAUNCH, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.splitlines()
    assert line.startswith("flix.train: error: XTREME-UP data root /nonexistent/xtreme_up"), line
    assert not run_dir.exists()


def test_a_lost_peer_is_told_from_a_failure_of_its_own(monkeypatch):
    """The second process of a run whose first died (a full disk, say) fails in its next
    collective with gloo's "Connection closed by peer": that is the other's failure, which the
    other says; this one waits for the launcher and says one line, no traceback (a CI run of
    the full-disk test below caught the traceback)."""
    import torch.distributed as dist

    from flix.pipeline.distributed import peer_failed

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:11495. "
        "This is typically caused by a remote worker crashing."
    )
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not peer_failed(gloo)  # one process: no peer to lose
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert peer_failed(gloo) and peer_failed(dist.DistBackendError("NCCL error")) and peer_failed(RuntimeError("Connection reset by peer"))
    assert not peer_failed(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) and not peer_failed(OSError(28, "No space left on device"))


@pytest.mark.slow
@SMALL_DISK
def test_a_full_disk_under_flix_launch_is_one_line(tmp_path, data_root):
    """The disk fills while rank 0 writes a checkpoint of a two-process run: flix's one line,
    exit 1, and nothing of torchrun's (before: its agent's log line and a 30-line traceback)."""
    from conftest import train_cmd

    reference = tmp_path / "reference"
    subprocess.run(train_cmd(reference, data_root), check=True, cwd=REPO, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    blocks = sum(-(-p.stat().st_size // 4096) * 4 for p in reference.rglob("*") if p.is_file())
    size = blocks + (reference / "checkpoints" / "latest" / "state.pt").stat().st_size // 2048
    seen = tmp_path / "seen"
    seen.mkdir()
    script = """
S=$1; shift
"$@" hydra.run.dir="$DISK/run" > /dev/null 2> "$S/full.err"; echo $? > "$S/full.rc"
"""
    overrides = train_cmd(tmp_path / "unused", data_root)[3:-1]  # the same settings, after `python -m flix.train`
    done = on_small_disk(tmp_path / "disk", size, script, str(seen), *LAUNCH, *overrides, "train.threads=1")
    assert done.returncode == 0, done.stderr[-3000:]
    err = (seen / "full.err").read_text()
    assert (seen / "full.rc").read_text().strip() == "1", err[-3000:]
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err).replace("\r", "\n")  # progress bars' cursor moves
    (line,) = [line for line in text.splitlines() if "no space left" in line]  # said once, by the first process
    assert line.endswith("free space on that disk and run the command again (the run resumes from its last checkpoint)"), line
    assert not [word for word in ("Traceback", "ChildFailedError", "failed (exitcode", "error_file") if word in err], err[-3000:]


KILLED_RENDER = """
import os, signal, sys, time
from pathlib import Path
from flix.report import figure, render
from flix.report.cli import main
how, runs, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if how == "kill-while-writing":  # the tables sit in the temp folder; the figure never comes
    figure.plot = lambda *args, **kwargs: ((out.parent / "writing").touch(), time.sleep(600))
else:  # a signal once 3 of the report's files have moved into out
    replace, moved = os.replace, []
    def replace_then_signal(source, target):
        replace(source, target)
        moved.append(target) if Path(target).parent == out else None
        if len(moved) == 3:
            os.kill(os.getpid(), signal.SIGTERM if how == "term-while-moving" else signal.SIGKILL)
    render.os.replace = replace_then_signal
main(["--runs", runs, "--scale", "smoke", "--out", str(out)])
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill-while-writing", "term-while-moving", "kill-while-moving"])
def test_a_render_killed_part_way_leaves_one_report_not_two_mixed(tmp_path, runs, how):
    """A render killed while it writes leaves the last report (every file the same inode); a
    SIGTERM or Ctrl-C while its files move in waits until all have moved; a SIGKILL there
    (nothing can hold it) is finished by the next `flix report` before anything else. Before:
    3 files of the new report beside the old ones."""
    from flix.report.cli import main as report_main

    root, run = runs
    out = tmp_path / "out"
    assert report_main(["--runs", str(root), "--scale", "smoke", "--out", str(out)]) == 0
    inodes = lambda: {p.name: p.stat().st_ino for p in out.iterdir() if p.is_file() and p.name != ".rendered"}  # noqa: E731
    before = inodes()
    second = run.with_name(run.name.replace("seed0", "seed1"))
    shutil.copytree(run, second)
    edit(second, lambda r: r["config"].update(seed=1, run_name=second.name))
    child = subprocess.Popen([sys.executable, "-c", KILLED_RENDER, how, str(root), str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    if how == "kill-while-writing":
        deadline = time.monotonic() + 240
        while not (tmp_path / "writing").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child.kill()
    child.wait(timeout=240)
    assert child.returncode == {"term-while-moving": -signal.SIGTERM}.get(how, -signal.SIGKILL), child.stderr.read()[-3000:]
    after = inodes()
    assert after.keys() == before.keys()
    if how == "kill-while-writing":
        assert after == before  # the last report, whole
    elif how == "term-while-moving":
        assert all(after[name] != before[name] for name in before)  # the new report, whole
    else:
        assert sum(after[name] != before[name] for name in before) == 3  # mixed until the next flix report ...
        assert report_main(["--runs", str(tmp_path / "none"), "--out", str(out)]) == 2  # ... even one that renders nothing
        after = inodes()
        assert all(after[name] != before[name] for name in before)  # finished: the killed render's report, whole
    assert report_main(["--runs", str(root), "--scale", "smoke", "--out", str(out)]) == 0
    assert not list(out.glob(".render.*"))  # what the killed render left is gone
