"""Trust, round 4 (issue 38): committed run records are input. One real smoke run's record,
copied into a scratch runs root and edited one field at a time, must never write outside
the report, stand in for another run, bring a file in through a link, crash a report, be
counted twice, or be half-copied; LaTeX comments stay comments; a snapshot keeps the
user's files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
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
        (lambda r: r["test"]["ner"].update({'=HYPERLINK("x")': 1.0}), "test language of ner is '=HYPERLINK(\"x\")', not a plain name"),
        (set_key("model", "tiny\n\\input{/etc/passwd}"), "model is 'tiny\\n\\\\input{/etc/passwd}', not one line of text"),
    ],
    ids=["versions", "string-score", "dropout-mode", "test-ids", "langs-string", "no-eval-sets", "average", "nan-stats", "csv", "newline"],
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
    assert "No space left on device" in capsys.readouterr().err
    assert not list(dest.rglob("results.json")) and not list(dest.rglob("*.jsonl"))  # before: whole results, torn predictions
    assert not [p for p in dest.rglob("*") if p.name.endswith(".tmp")]  # nothing left behind


def test_a_killed_copy_is_never_counted(tmp_path, runs):
    """What a kill -9 mid-copy leaves (a hidden temp folder) is no run, for the report or a copy."""
    from flix.report.collect import collect

    root, run = runs
    shutil.copytree(run, run.with_name(f".{run.name}.abcd1234.tmp"))
    assert len(collect(root, "smoke").finished) == 1 and not collect(root, "smoke").duplicates


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
