"""W&B as a researcher browses it, read back from the offline run files: names carry
every swept value, groups are the paper's tables, summaries hold the selected
checkpoint's scores, failed runs end failed, and reused runs get logged too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flix.pipeline.run import LOGGED, run

pytest.importorskip("wandb")

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "flix" / "report" / "paper"  # shipped with the package


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline .wandb file (a LevelDB-style log of 32 KiB
    blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # block trailer / padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def finished_records(path: Path, timeout: float = 120.0) -> list:
    """The file's records once W&B's service has written its exit record: on a loaded machine
    the service can still be writing after `finish()` returns (seen in CI: no records yet)."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_runs(run_dir: Path) -> list[dict]:
    """Each offline W&B run under run_dir as {run, summary, exit_code}."""
    out = []
    for file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        info = {"summary": {}, "exit_code": None}
        for record in finished_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info["run"] = record.run
            elif kind == "summary":
                for update in record.summary.update:
                    info["summary"][update.key or "/".join(update.nested_key)] = json.loads(update.value_json)
            elif kind == "exit":
                info["exit_code"] = record.exit.exit_code
        out.append(info)
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_a_run_is_named_grouped_tagged_and_summarised_like_the_paper(compose, tmp_path):
    results = run(compose("mixture=multitask_sw", "logger=wandb", "dropout=0.3", "table=table2"), tmp_path)
    (logged,) = offline_runs(tmp_path)
    assert logged["run"].display_name == "flix-multitask_sw-drop0.3-rankpaper-seed0"
    assert logged["run"].run_group == "smoke/table2" and logged["run"].job_type == "train"
    assert {"smoke", "multitask_sw", "flix"} <= set(logged["run"].tags)
    summary = logged["summary"]
    assert summary["best_step"] == results["best_step"]
    assert summary["best_validation_average"] == pytest.approx(results["best_validation_average"])
    for name, entry in results["eval_sets"].items():
        assert summary[f"test/{name}"] == pytest.approx(entry["test"])
    assert "test/average" in summary and "validation/average" in summary
    assert logged["exit_code"] == 0 and (tmp_path / LOGGED).exists()


def test_online_without_an_api_key_is_one_line_before_the_run_starts(compose, tmp_path, monkeypatch, data_root):
    from flix.pipeline.tracking import wandb_key_problems

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`, no W&B settings file
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("FLIX_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_MODE", "online")
    cmd = [sys.executable, "-m", "flix.train", "scale=smoke", "mixture=multitask_sw", f"data.root={data_root}", "logger=wandb"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr  # before: 15 s, then a 38-line traceback
    assert "no API key is configured: run `wandb login`" in done.stderr and "logger=none" in done.stderr
    assert not (tmp_path / "runs").exists()  # no run folder, no failed.json
    assert wandb_key_problems(compose("logger=none").logger) == []
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_key_problems(compose("logger=wandb").logger) == []  # offline needs no key
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key is found, never sent anywhere here
    assert wandb_key_problems(compose("logger=wandb").logger) == []


def test_a_failed_run_ends_failed(compose, tmp_path):
    with pytest.raises(RuntimeError, match="last good checkpoint"):
        run(compose("mixture=multitask_sw", "logger=wandb", "train.lr=1e30", "train.max_grad_norm=1e30", "scale.steps=30"), tmp_path)
    (logged,) = offline_runs(tmp_path)
    assert logged["exit_code"] == 1 and not (tmp_path / LOGGED).exists()


@pytest.mark.slow
def test_a_run_made_without_wandb_is_logged_when_reused_with_it(compose, tmp_path):
    results = run(compose("mixture=multitask_sw", "logger=none"), tmp_path)
    assert offline_runs(tmp_path) == []
    assert run(compose("mixture=multitask_sw", "logger=wandb"), tmp_path) == results  # not trained again
    (logged,) = offline_runs(tmp_path)
    assert logged["summary"]["best_step"] == results["best_step"] and logged["exit_code"] == 0
    run(compose("mixture=multitask_sw", "logger=wandb"), tmp_path)
    assert len(offline_runs(tmp_path)) == 1  # logged once


@pytest.mark.slow
def test_each_rendered_table_is_logged_in_its_training_runs_group(compose, tmp_path):
    from flix.report.render import render
    from flix.report.wandb_log import log_to_wandb

    runs = tmp_path / "runs"
    run(compose("mixture=multitask_sw", "logger=wandb", "table=table2"), runs / "one")
    summary = render(runs, tmp_path / "out", "smoke", PAPER)
    dirs = log_to_wandb(tmp_path / "out", "smoke", "flix-test", wandb_dir=tmp_path / "w", files=[Path(p) for p in summary["files"]])
    (trained,) = offline_runs(runs / "one")
    reports = {r["run"].run_group: r for r in offline_runs(tmp_path / "w")}
    assert len(reports) == len(dirs) and all(r["exit_code"] == 0 and r["run"].job_type == "report" for r in reports.values())
    assert trained["run"].run_group == "smoke/table2"
    assert "smoke/table2" in reports, sorted(reports)
    logged = {group: {"/".join(key.split("/")[:2]) for key in r["summary"]} for group, r in reports.items()}
    assert "report/table2" in logged["smoke/table2"] and "report/table1" not in logged["smoke/table2"], "a table beside its runs"
    assert {"report/table1", "report/table2", "report/figure2"} <= logged["smoke/report"], "the whole render, once"


def test_flix_sync_finds_every_offline_run_of_a_study_and_its_report(compose, tmp_path, monkeypatch, capsys):
    from flix.pipeline.sync import main as sync
    from flix.pipeline.sync import offline_runs
    from flix.report.render import render
    from flix.report.wandb_log import log_to_wandb

    runs = tmp_path / "runs" / "smoke"
    run(compose("mixture=multitask_sw", "logger=wandb"), runs / "multitask_sw" / "one")
    summary = render(runs, tmp_path / "out", "smoke", PAPER)
    reports = log_to_wandb(tmp_path / "out", "smoke", "flix-test", wandb_dir=runs, files=[Path(p) for p in summary["files"]])
    found = offline_runs(tmp_path / "runs")
    assert set(found) == {*(runs / "multitask_sw" / "one").glob("wandb/offline-run-*"), *reports} and len(found) == 1 + len(reports)
    monkeypatch.setenv("FLIX_RUNS", str(tmp_path / "runs"))
    assert sync(["--dry-run"]) == 0  # the default: the runs root
    out = capsys.readouterr().out
    assert f"flix sync: {len(found)} offline W&B run(s)" in out and f"wandb sync {' '.join(map(str, found))}" in out
    (found[0] / f"run-{found[0].name.rsplit('-', 1)[-1]}.wandb.synced").write_text("")  # what wandb sync leaves once uploaded
    assert offline_runs(tmp_path / "runs") == found[1:]
    # no key (a fresh process: wandb keeps what it read in this one): one line, nothing tried
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE")}
    env |= {"HOME": str(tmp_path), "NETRC": str(tmp_path / "netrc")}
    done = subprocess.run([sys.executable, "-m", "flix", "sync"], env=env, capture_output=True, text=True, timeout=120)
    assert (
        done.returncode == 2 and done.stderr.strip() == "flix sync: error: no W&B API key configured: run `wandb login` (or set WANDB_API_KEY) first"
    )
