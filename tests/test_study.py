"""Studies: sweeps as Hydra multiruns, skipping by config hash, failure isolation, launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flix.pipeline import study
from flix.record import read_failure

REPO = Path(__file__).resolve().parents[1]
FAST = ["scale.steps=2", "scale.eval_every=2", "scale.eval_examples=2", "scale.test_examples=2", "train.threads=1"]


@pytest.fixture
def runs_env(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("FLIX_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("FLIX_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("FLIX_DATA_ROOT", str(data_root))
    return tmp_path


@pytest.fixture
def own_study(tmp_path, monkeypatch):
    """A study file of the test's own, read by the real study code."""
    folder = tmp_path / "experiments"
    folder.mkdir()
    monkeypatch.setattr(study, "EXPERIMENTS", folder)

    def write(name: str, sweeps: list[dict]) -> str:
        (folder / f"{name}.yaml").write_text(json.dumps({"sweeps": sweeps}))
        return name

    return write


@pytest.mark.slow  # a minute under load: make test-all
def test_every_study_expands_into_composable_runs():
    for name, count in (("study_a", 3 * 2 + 1), ("study_b", None)):
        runs = study.plan(study.load_study(name), ["scale=smoke", "logger=none"])
        assert len({r.run_dir for r in runs}) == len(runs), name  # distinct configs, distinct dirs
        assert count is None or len(runs) == count, name
    # dropout=0.7 on in-language QA is the same configuration as rank=paper there: one run
    ablations = study.plan(study.load_study("ablations"), ["scale=smoke", "logger=none"])
    assert (len(ablations), len({r.run_dir for r in ablations})) == (12, 11)


@pytest.mark.slow  # several runs through hydra's launcher: make test-all
def test_shared_runs_have_one_directory_across_studies():
    """Ablation runs equal to Study B's (dropout 0.7, paper rank) are the same run."""
    b = {r.run_dir for r in study.plan(study.load_study("study_b"), ["scale=smoke"])}
    ablation = {r.run_dir for r in study.plan(study.load_study("ablations"), ["scale=smoke"])}
    assert len(ablation & b) == 4  # FLix with the paper's rank and dropout on the four multilingual mixtures


def test_unknown_study_lists_the_studies():
    with pytest.raises(SystemExit, match="study_a"):
        study.load_study("nope")


def test_a_bad_data_root_launches_nothing_and_says_it_once(own_study, runs_env, monkeypatch, capsys):
    monkeypatch.setenv("FLIX_DATA_ROOT", str(runs_env / "no_such_data"))
    name = own_study("wrong_root", [{"method": ["flix", "compute_matched"], "mixture": ["multitask_sw", "multilingual_ner"]}])
    assert study.main([name, "--logger", "none", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("is not a directory") == 1 and "nothing was launched" in err
    assert not (runs_env / "runs").exists()  # no run directory, no W&B run, no report


@pytest.mark.slow  # trains several smoke runs (a minute); test_train's sweep test keeps failure isolation in the fast tier
def test_failed_run_does_not_stop_the_study_and_completed_runs_are_skipped(own_study, runs_env, capsys):
    name = own_study("mixed", [{"mixture": ["multitask_sw"], "train.lr": [1e-3, 1e40], "train.max_grad_norm": [1e40]}])
    code = study.main([name, "--logger", "none", "--no-report", *FAST])
    err = capsys.readouterr().err
    assert code == 1 and err.count("[flix study] FAILED") == 1 and "overflow" in err
    runs = study.plan(study.load_study(name), ["scale=smoke", "logger=none", *FAST])
    assert sorted(r.status for r in runs) == ["done", "failed"]
    # failed.json carries the resolved config: the report knows which run failed from it alone
    failed = next(r for r in runs if r.status == "failed")
    record = read_failure(failed.run_dir / "failed.json")
    assert (record.method, record.mixture, record.seed, record.scale) == ("flix", "multitask_sw", 0, "smoke")
    assert "overflow" in record.failure and json.loads((failed.run_dir / "failed.json").read_text())["config"]["train"]["lr"] == 1e40
    done = next(r for r in runs if r.status == "done")
    mtime = (done.run_dir / "results.json").stat().st_mtime
    study.main([name, "--logger", "none", "--no-report", *FAST])
    assert (done.run_dir / "results.json").stat().st_mtime == mtime  # skipped, not run again
    study.main([name, "--logger", "none", "--no-report", "--force", *FAST])
    assert (done.run_dir / "results.json").stat().st_mtime > mtime  # FORCE runs it again


@pytest.mark.slow
def test_parallel_launcher_runs_a_sweep(runs_env, data_root):
    cmd = [
        sys.executable,
        "-m",
        "flix.train",
        "-m",
        "logger=none",
        "mixture=multitask_sw",
        "method=flix,compute_matched",
        "hydra/launcher=parallel",
        *FAST,
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=os.environ)
    results = list((runs_env / "runs" / "smoke" / "multitask_sw").glob("*/results.json"))
    assert sorted(json.loads(p.read_text())["method"] for p in results) == ["compute_matched", "flix"]


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 1 and "submitit" in cfg.hydra.launcher._target_


PAPER = REPO / "flix" / "report" / "paper"  # shipped with the package


@pytest.mark.slow
def test_make_studies_render_all_five_tables(runs_env):
    """`make study-a`, `make study-b` and `make ablations` at smoke scale fill every
    row and column of the paper's Tables 1-5 (about two minutes on 2 cores)."""
    import pandas as pd

    env = {**os.environ, "LOGGER": "none", "ARGS": "train.threads=1"}
    for target in ("study-a", "study-b", "ablations"):
        out = subprocess.run(["make", target], cwd=REPO, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    reports = runs_env / "reports" / "smoke"
    for n in range(1, 6):
        paper = pd.read_csv(next(PAPER.glob(f"table{n}_*.csv")), dtype=str)
        ours = pd.read_csv(reports / f"table{n}.csv", dtype=str)
        key = paper.columns[0]
        assert list(ours[key]) == list(paper[key]), f"table{n} rows"
        for column in paper.columns[1:]:
            values = pd.to_numeric(ours[column], errors="coerce")
            assert values.notna().all(), f"table{n} column {column!r} has a gap"
        for suffix in ("md", "tex"):
            assert (reports / f"table{n}.{suffix}").stat().st_size > 0
    assert "smoke numbers are a pipeline check" in (reports / "index.html").read_text()
    assert (reports / "figure2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_default_paths_have_no_stray_spaces():
    env = {k: v for k, v in os.environ.items() if k not in ("FLIX_RUNS", "FLIX_REPORTS")}
    out = subprocess.run(["make", "-n", "report", "SCALE=smoke"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert "--runs runs/smoke --out outputs/reports/smoke" in out.stdout
    snapshot = subprocess.run(["make", "-n", "report", "SCALE=smoke", "SNAPSHOT=1"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert "--runs runs/smoke --snapshot" in snapshot.stdout


def test_a_sweeps_table_is_passed_on_not_swept():
    sweep = study.load_study("ablations")["sweeps"][0]
    assert "table=table3" in study.sweep_args(sweep)
    assert all(not o.startswith("table=") for overrides in study.expand(sweep) for o in overrides)


@pytest.mark.slow  # several runs through hydra's launcher: make test-all
def test_seeds_run_every_sweep_once_per_seed(runs_env):
    """--seeds 0,1 plans each run of a study twice, in two directories."""
    one = study.plan(study.load_study("ablations"), ["scale=cpu", "logger=none"])
    two = study.plan(study.with_seeds(study.load_study("ablations"), [0, 1]), ["scale=cpu", "logger=none"])
    assert len(two) == 2 * len(one)
    assert len({r.run_dir for r in two}) == 2 * len({r.run_dir for r in one})  # runs shared by sweeps stay shared
    assert {o.split("=")[1] for r in two for o in r.overrides if o.startswith("seed=")} == {"0", "1"}
    assert all(r.run_dir.parts[-3] == "cpu" for r in two)


def test_the_hash_keys_runs_by_what_they_compute(data_root, monkeypatch):
    """The same data as a relative and an absolute path is one run; mixture notes, the
    variant a run does not use and how fast or how spread out it runs change nothing; the
    data, the method, the seed and a quantized base do."""
    from flix.pipeline.run_config import compose, config_hash

    monkeypatch.chdir(data_root.parent)
    base = config_hash(compose([f"data.root={data_root}", "mixture=multitask_sw"]))
    assert config_hash(compose([f"data.root={data_root.name}", "mixture=multitask_sw"])) == base
    assert (
        config_hash(compose([f"data.root={data_root}", "mixture=multitask_sw", "mixture.mini.notes=edited", "mixture.official.train.ner=[xx]"]))
        == base
    )
    for how_not_what in ("train.threads=1", "scale.cpu_kernels=true", "train.parallel=fsdp", "model.quantize=none"):
        assert config_hash(compose([f"data.root={data_root}", "mixture=multitask_sw", how_not_what])) == base, how_not_what
    for other in ("mixture.mini.train.ner=[yo]", "method=compute_matched", "seed=1", "data.root=/elsewhere", "model.quantize=nf4"):
        assert config_hash(compose([f"data.root={data_root}", "mixture=multitask_sw", other])) != base, other


@pytest.mark.slow  # trains and restores a smoke run three times
def test_a_committed_record_counts_as_done_and_is_not_trained_again(own_study, runs_env, tmp_path, monkeypatch, capsys):
    """Runs whose record sits under reports/<scale>/runs (flix records) are restored into the
    runs root and skipped, so a study on a new machine goes on from the committed records."""
    from flix.record import copy_records

    monkeypatch.setattr(study, "RECORDS", tmp_path / "reports")
    name = own_study("recorded", [{"mixture": ["multitask_sw"], "method": ["compute_matched"]}])
    assert study.main([name, "--logger", "none", "--no-report", *FAST]) == 0
    runs = tmp_path / "runs" / "smoke"
    copy_records(runs, tmp_path / "reports" / "smoke" / "runs")
    (planned,) = study.plan(study.load_study(name), ["scale=smoke", "logger=none", *FAST])
    recorded = (planned.run_dir / "results.json").read_text()
    import shutil

    shutil.rmtree(runs)  # a new machine: the records alone
    capsys.readouterr()
    assert study.main([name, "--logger", "none", "--no-report", *FAST]) == 0
    assert "1 run(s) restored from their committed records" in capsys.readouterr().out
    assert (planned.run_dir / "results.json").read_text() == recorded and not (planned.run_dir / "checkpoints").exists()

    # a study run from another checkout (a worktree pinned to older code) restores from --records
    shutil.rmtree(runs)
    shutil.move(tmp_path / "reports" / "smoke" / "runs", tmp_path / "elsewhere")
    capsys.readouterr()
    assert study.main([name, "--logger", "none", "--no-report", "--records", str(tmp_path / "elsewhere"), *FAST]) == 0
    assert f"1 run(s) restored from their committed records under {tmp_path / 'elsewhere'}" in capsys.readouterr().out
    assert (planned.run_dir / "results.json").read_text() == recorded
