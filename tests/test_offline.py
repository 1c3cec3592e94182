"""Offline GPU runs: parts within their size limit, an install from them with no index into
a fresh virtual environment, and a run that packs the report and resumes from its archive."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from flix.data.mixture_files import load_mixture_by_name
from flix.data.reader import dataset_path
from flix.pipeline import offline, offline_stage

REPO = Path(__file__).resolve().parents[1]
FAST = ["scale.steps=2", "scale.eval_every=2", "scale.eval_examples=2", "scale.test_examples=2", "train.threads=1"]


def test_parts_stay_within_the_limit_largest_first(tmp_path):
    sizes = {"a": 50, "b": 40, "c": 30, "d": 20, "e": 10}
    files = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
        files.append(tmp_path / name)
    parts = offline_stage.pack_parts(files, tmp_path / "out", limit=60)
    contents = [json.loads((p / "PART.json").read_text())["files"] for p in parts]
    assert contents == [{"a": 50, "e": 10}, {"b": 40, "d": 20}, {"c": 30}]
    assert all(sum(c.values()) <= 60 for c in contents)
    with pytest.raises(SystemExit, match="over the"):
        offline_stage.pack_parts(files, tmp_path / "again", limit=45)


@pytest.fixture
def probe_wheel(tmp_path) -> Path:
    """A pure-Python wheel built here, standing in for PyPI's (tests never download)."""
    src = tmp_path / "probe"
    (src / "flixprobe").mkdir(parents=True)
    (src / "flixprobe" / "__init__.py").write_text("ANSWER = 42\n")
    (src / "pyproject.toml").write_text(
        '[project]\nname = "flixprobe"\nversion = "1.0"\n[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(src)], check=True
    )
    return wheels


@pytest.mark.slow
def test_stage_install_run_pack_and_resume(tmp_path, data_root, probe_wheel):
    # data: just the files the study reads, as a user's subset would be
    data = tmp_path / "data"
    for task, split, lang in load_mixture_by_name("multitask_sw", "mini").required_files():
        target = dataset_path(data, task, split, lang)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dataset_path(data_root, task, split, lang), target)
    staging = tmp_path / "staging"
    parts = offline.stage(staging, data, ["flixprobe"], [probe_wheel], limit_mib=60)
    assert {f.name for p in parts for f in p.iterdir()} >= {"flixprobe-1.0-py3-none-any.whl", offline.DATA_ARCHIVE}

    # the staged wheels install into a fresh virtual environment with no index
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    links = [arg for p in parts for arg in ("--find-links", str(p))]
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", *links, "flixprobe"], check=True)
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import flixprobe; print(flixprobe.ANSWER)"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "42"

    # there: install, run the study within its minutes, pack one archive
    study = tmp_path / "tiny_study.yaml"
    study.write_text(json.dumps({"sweeps": [{"method": ["flix", "compute_matched"], "mixture": ["multitask_sw"]}]}))
    cmd = [
        sys.executable,
        "-m",
        "flix.pipeline.offline",
        "run",
        "--parts",
        str(staging),
        "--minutes",
        "10",
        "--scale",
        "smoke",
        "--study",
        str(study),
        "--work",
        str(tmp_path / "work"),
    ]
    first = subprocess.run([*cmd, "--out", str(tmp_path / "out1"), "--", *FAST], cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    archive = tmp_path / "out1" / "flix-smoke.tar.gz"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        summary = json.load(tar.extractfile("logs/summary.json"))
    assert {"report/index.html", "report/table2.csv", "logs/bench-run.json"} <= set(names)
    assert sum(n.endswith("/results.json") for n in names) == 2 and summary["done"] == summary["runs"] == 2
    assert not any("best_adapter" in n or "checkpoints" in n for n in names)  # weights stay there

    # the next call, given that archive, skips the finished runs
    second = subprocess.run(
        [*cmd, "--out", str(tmp_path / "out2"), "--resume", str(archive), "--no-bench", "--", *FAST], cwd=REPO, capture_output=True, text=True
    )
    assert second.returncode == 0 and "2 runs, 2 complete" in second.stdout, second.stdout + second.stderr
