"""One record: flix.record writes and reads results.json; the report places runs from
records alone (no conf/, no torch, nothing of the pipeline), old records included."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_report import PAPER, RUNS, STUDY_A, config_of, write_run

from flix.record import read_failure, read_results, write_failure
from flix.report.collect import PAPER_DROPOUT, collect
from flix.report.labels import TRAINS
from flix.report.render import render

REPO = Path(__file__).resolve().parents[1]
BELOW_THE_PIPELINE = [*(REPO / "flix" / "record").glob("*.py"), *(REPO / "flix" / "report").glob("*.py")]


def imported(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_record_and_report_import_nothing_above_them():
    assert BELOW_THE_PIPELINE
    for path in BELOW_THE_PIPELINE:
        above = [n for n in imported(path) if n.split(".")[0] in ("torch", "hydra") or n.startswith(("flix.pipeline", "flix.base_models"))]
        assert not above, f"{path.relative_to(REPO)} imports {above}"
    for path in (REPO / "flix" / "record").glob("*.py"):
        assert not [n for n in imported(path) if n.startswith("flix.report")], f"{path.relative_to(REPO)}: the record sits below the report"


def test_report_renders_from_records_alone_without_conf_or_torch(tmp_path):
    """The package copied without conf/ beside it renders the same cells, and imports
    neither torch nor the pipeline: a cell's selection comes from the records."""
    runs = tmp_path / "runs" / "smoke"
    for key, bases in RUNS.items():
        write_run(runs, key, bases)
    render(runs, tmp_path / "here", "smoke", PAPER)
    code = tmp_path / "code"
    shutil.copytree(REPO / "flix", code / "flix", ignore=shutil.ignore_patterns("__pycache__"))
    assert not (code / "conf").exists()
    script = (
        "import sys, flix\n"
        f"assert flix.__file__.startswith({str(code)!r}), flix.__file__\n"
        "from flix.report.render import render\n"
        f"render({str(runs)!r}, {str(tmp_path / 'there')!r}, 'smoke', {str(code / 'flix' / 'report' / 'paper')!r})\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'hydra', 'flix.pipeline'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # before: torch, hydra and flix.pipeline.methods, to read conf/method
    assert (tmp_path / "there" / "cells.csv").read_text() == (tmp_path / "here" / "cells.csv").read_text()


def test_the_reports_paper_facts_agree_with_conf():
    """The report's own words for the paper's methods and default dropout: what conf/ runs."""
    from flix.pipeline.methods import METHODS, load_method

    assert OmegaConf.load(REPO / "conf" / "train.yaml").dropout == PAPER_DROPOUT
    assert set(TRAINS) == set(METHODS)
    for method in METHODS:
        spec = load_method(method)
        assert TRAINS[method] == (bool(spec["features"]), spec["shared_rank"] != 0), method


def test_a_run_says_whether_it_has_features(tmp_path):
    """From the config's method (records since conf/method), else its FLix block, else
    unknown (older records: the report then goes by the paper's method)."""
    run_dir = write_run(tmp_path, ("compute_matched", "study_a", 0, 0.7, None), STUDY_A)
    path = run_dir / "results.json"
    assert read_results(path).features is None and read_results(path).adapters is None
    results = json.loads(path.read_text())
    results["flix"] = {"features": {}, "shared_rank": 6}
    path.write_text(json.dumps(results))
    assert read_results(path).features is False and read_results(path).adapters.kind == (False, True)
    results["config"]["method"]["features"] = True  # the config's word comes first
    path.write_text(json.dumps(results))
    assert read_results(path).features is True
    failed = tmp_path / "failed"
    failed.mkdir()
    write_failure(failed, RuntimeError("boom"), config_of("flix", "study_a", 0, 0.7, None) | {"method": {"name": "flix", "features": True}})
    assert read_failure(failed / "failed.json").features is True


def test_a_featureless_run_fills_its_cell_whatever_its_dropout(tmp_path):
    """Feature dropout changes nothing without features: a record that says so is placed by
    method and mixture alone; a FLix record with another dropout is not."""
    for method, dropout in (("compute_matched", 0.3), ("flix", 0.3)):
        run_dir = write_run(tmp_path, (method, "study_a", 0, dropout, None), STUDY_A)
        results = json.loads((run_dir / "results.json").read_text())
        results["config"]["method"]["features"] = method == "flix"
        (run_dir / "results.json").write_text(json.dumps(results))
    from flix.report.collect import Selection

    index = collect(tmp_path, "smoke")
    assert [r.method for r in index.select(Selection("compute_matched", "study_a")).finished] == ["compute_matched"]
    assert index.select(Selection("flix", "study_a")).finished == []
    assert [r.dropout for r in index.select(Selection("flix", "study_a", dropout=0.3)).finished] == [0.3]


def _copy_run(run: Path, root: Path) -> Path:
    target = root / run.parent.name / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "best_adapter", ".lock"))
    return target


def test_compare_says_same_runs_apart_from_times_and_names_each_difference(tmp_path, smoke_run, capsys):
    """`flix compare A B`: a run and its copy agree; times, commit and versions are not
    results; a changed score, a changed prediction file and a run on one side are each one
    line; --rtol allows rounding."""
    from flix.record.compare import main

    _copy_run(smoke_run, tmp_path / "a")
    b = _copy_run(smoke_run, tmp_path / "b")
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "1 run(s) in both; the same" in capsys.readouterr().err
    results = json.loads((b / "results.json").read_text())
    results.update(time_seconds=results["time_seconds"] + 5, commit="0" * 40, versions={"torch": "other"})
    (b / "results.json").write_text(json.dumps(results))
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    task, nll = next(iter(results["test_nll"].items()))
    lang = sorted(nll)[0]
    results["test_nll"][task][lang] = nll[lang] * (1 + 1e-9)
    (b / "results.json").write_text(json.dumps(results))
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--rtol", "1e-6"]) == 0
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert f"results.json: test_nll.{task}.{lang}: " in capsys.readouterr().out
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--ignore", f"test_nll.{task}.{lang}"]) == 0  # a key changed on purpose
    prediction = next(p for p in sorted((b / "predictions").rglob("*")) if p.is_file())
    prediction.write_text(prediction.read_text() + "\n")
    _copy_run(smoke_run, tmp_path / "b" / "more")
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--rtol", "1e-6"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"multitask_sw/flix/{prediction.relative_to(b)}: differs" in out
    assert f"more/multitask_sw/flix: only under {tmp_path / 'b'}" in out and len(out) == 2


@pytest.mark.slow
def test_the_same_run_trained_twice_has_the_same_records(tmp_path, data_root):
    """Determinism, checked by `flix compare`: the same settings trained again (another
    folder, another process) give the same results, predictions and tables."""
    from conftest import REPO, train_cmd

    from flix.record.compare import compare

    for side in ("a", "b"):
        subprocess.run(train_cmd(tmp_path / side / "multitask_sw" / "flix", data_root), check=True, capture_output=True, cwd=REPO)
    assert compare(tmp_path / "a", tmp_path / "b") == []
