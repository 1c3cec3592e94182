"""`flix report` on a hand-made runs dir: layout, numbers, dashes, notes, files, exit codes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flix.data.mixture_files import load_mixture_by_name
from flix.record import write_failure, write_results
from flix.report.cli import main
from flix.report.figure import plot
from flix.report.render import render
from flix.report.tables import PAPER_FILES
from flix.report.wandb_log import log_to_wandb

PAPER = Path(__file__).resolve().parents[1] / "flix" / "report" / "paper"  # shipped with the package
SMOKE_NOTE = "smoke numbers are a pipeline check (tiny random model, a few steps), not results"
# (method, mixture, seed, dropout, lang rank) -> base score of each eval set (by name); languages
# spread symmetrically around it, so a set's average is exactly the base.
STUDY_A = {
    "ner": 50.0,
    "semantic_parsing": 40.0,
    "qa_in_lang": 60.0,
    "qa_cross_lang": 70.0,
    "qa_cross_lang_unseen_comb": 30.0,
    "qa_cross_lang_unseen_lang": 20.0,
}
RUNS = {
    ("flix", "study_a", 0, 0.7, None): STUDY_A,
    ("flix", "study_a", 1, 0.7, None): {k: v + 2 for k, v in STUDY_A.items()},
    ("compute_matched", "study_a", 0, 0.7, None): {k: v - 10 for k, v in STUDY_A.items()},
    ("flix_shared", "study_a", 0, 0.7, None): {k: v - 5 for k, v in STUDY_A.items()},
    ("flix", "zeroshot_sp", 0, 0.7, None): {"semantic_parsing_unseen_comb": 12.0},
    ("flix", "multilingual_ner", 0, 0.7, None): {"ner": 56.0},
    ("flix", "multilingual_ner", 0, 0.7, 1): {"ner": 54.0},
    ("compute_matched", "multilingual_ner", 0, 0.7, None): {"ner": 45.0},
    ("single", "multilingual_ner", 0, 0.7, None): {"ner": 44.0},
    ("flix", "multilingual_qa_in_lang", 0, 0.7, None): {"qa_in_lang": 61.0},
    ("flix", "multilingual_qa_in_lang", 0, 0.0, None): {"qa_in_lang": 58.0},
    ("flix", "multitask_sw", 0, 0.7, None): {"ner": 30.0, "qa_in_lang": 50.0},
}
VALIDATION_OFFSET = -1.0


def write_run(root: Path, key: tuple, bases: dict, scale: str = "smoke") -> Path:
    """A results.json as flix.record writes it, on the real mini mixture's sets."""
    method, mixture, seed, dropout, rank = key
    run_dir = root / mixture / "_".join(map(str, key))  # any name: the report reads results.json
    sets = [s for s in load_mixture_by_name(mixture, "mini").eval_sets if s.name in bases]
    scores = {"validation": {}, "test": {}}
    for s in sets:
        spread = np.arange(len(s.langs)) - (len(s.langs) - 1) / 2
        for split, offset in (("validation", VALIDATION_OFFSET), ("test", 0.0)):
            scores[split].setdefault(s.task, {}).update({lang: bases[s.name] + offset + d for lang, d in zip(s.langs, spread)})
    head = {
        "method": method,
        "mixture": mixture,
        "study": "x",
        "scale": scale,
        "seed": seed,
        "model": "tiny",
        "data_root": "/data/xtreme_up_mini",
        "variant": "mini",
    }
    body = {**scores, "best_step": 8, "history": [], "trainable_parameters": 10}
    tail = {"commit": "abc123def456789", "config": config_of(method, mixture, seed, dropout, rank, scale)}
    run_dir.mkdir(parents=True)
    write_results(run_dir, replace(load_mixture_by_name(mixture, "mini"), eval_sets=sets), body, head, tail)
    return run_dir


def config_of(method, mixture, seed, dropout, rank, scale="smoke") -> dict:
    """The identity part of a resolved run config."""
    return {
        "method": {"name": method},
        "mixture": {"name": mixture},
        "scale": {"name": scale},
        "seed": seed,
        "dropout": dropout,
        "rank": {"name": str(rank or "paper"), "lang": rank},
        "train": {"dropout_mode": "independent"},
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "smoke"
    for key, bases in RUNS.items():
        write_run(root, key, bases)
    failed = root / "study_a" / "a_failed_run"
    failed.mkdir(parents=True)
    write_failure(failed, RuntimeError("CUDA out of memory"), config_of("param_matched", "study_a", 0, 0.7, None))
    out = root.parent / "out"
    summary = render(root, out, "smoke", PAPER)
    return out, summary


def cells(out: Path, name: str) -> pd.DataFrame:
    frame = pd.read_csv(out / f"{name}.csv", dtype=str, keep_default_na=False)
    return frame.set_index(frame.columns[0])


def test_every_table_has_the_paper_layout(report):
    out, _ = report
    for name, csv in PAPER_FILES.items():
        paper = pd.read_csv(PAPER / csv, dtype=str)
        label, columns = paper.columns[0], list(paper.columns[1:])
        md, tex = (out / f"{name}.md").read_text(), (out / f"{name}.tex").read_text()
        frame = cells(out, name)
        assert list(frame.index) == list(paper[label]) and frame.index.name == label
        for column in columns:
            assert {column, f"{column} paper", f"{column} diff"} <= set(frame.columns)
            assert f" {column} |" in md
            assert column.replace("%", r"\%") in tex
        for row in paper[label]:
            assert f"| {row} |" in md
            assert [float(frame.loc[row, f"{c} paper"]) for c in columns] == paper.set_index(label).loc[row].astype(float).tolist()
        assert SMOKE_NOTE in md and SMOKE_NOTE in tex
        assert "Commit(s): abc123def456" in md and "Model(s): tiny" in md and "/data/xtreme\\_up\\_mini" in tex


def test_cells_average_seeds_and_sets(report):
    out, _ = report
    t1 = cells(out, "table1")
    flix = {k: v + 1 for k, v in STUDY_A.items()}  # seeds 0 and 1 averaged
    expected = [
        flix["ner"],
        flix["semantic_parsing"],
        flix["qa_in_lang"],
        flix["qa_cross_lang"],
        flix["qa_cross_lang_unseen_comb"],
        12.0,
        flix["qa_cross_lang_unseen_lang"],
    ]
    columns = [c for c in t1.columns if not c.endswith((" paper", " diff")) and c not in ("seeds", "notes", "Avg.")]
    assert [float(t1.loc["FLix", c]) for c in columns] == pytest.approx(expected, abs=0.01)
    assert float(t1.loc["FLix", "Avg."]) == pytest.approx(np.mean(expected), abs=0.01)
    assert float(t1.loc["FLix", "Avg. diff"]) == pytest.approx(np.mean(expected) - 72.4, abs=0.01)
    assert t1.loc["FLix", "seeds"] == "2 (0, 1)"  # how many seeds, and which
    md = (out / "table1.md").read_text()
    assert f"{flix['ner']:.1f} (paper 84.0, {flix['ner'] - 84.0:+.1f})" in md

    t2 = cells(out, "table2")
    assert float(t2.loc["FLix", "Multitask Swahili"]) == pytest.approx(40.0)  # mean of ner 30, qa_in_lang 50
    assert float(t2.loc["FLix", "Multilingual NER"]) == pytest.approx(56.0)  # the rank-1 run stays out
    t3 = cells(out, "table3")
    assert float(t3.loc["0.7", "Test"]) == pytest.approx(61.0)
    assert float(t3.loc["0.7", "Validation"]) == pytest.approx(61.0 + VALIDATION_OFFSET)
    assert float(t3.loc["0.0", "Test"]) == pytest.approx(58.0)
    t4 = cells(out, "table4")
    assert (float(t4.loc["2", "NER"]), float(t4.loc["1", "NER"])) == pytest.approx((56.0, 54.0))
    t5 = cells(out, "table5")
    assert float(t5.loc["+ shared parameters", "NER"]) == pytest.approx(45.0)


def test_missing_and_failed_runs_are_dashes_with_notes(report):
    out, summary = report
    t1 = cells(out, "table1")
    assert set(t1.loc["Param-matched", ["NER", "Avg.", "NER diff"]]) == {"–"}
    assert "CUDA out of memory" in t1.loc["Param-matched", "notes"]
    assert t1.loc["Compute-matched", "Zero-shot Unseen Comb: Semantic parsing"] == "–"
    assert t1.loc["Compute-matched", "Avg."] == "–"
    md = (out / "table1.md").read_text()
    assert "missing run: compute_matched on zeroshot_sp" in md
    assert "param_matched on study_a (the paper's ranks), seed 0: run failed (RuntimeError: CUDA out of memory)" in md
    assert "– (paper 28.4) [" in md
    assert "missing run: flix on multilingual_qa_in_lang (dropout 0.5, the paper's ranks)" in (out / "table3.md").read_text()
    assert "flix on multilingual_qa_cross_lang (dropout 0.7, language rank 1)" in (out / "table4.md").read_text()
    assert summary["tables"]["table1"] == {"filled": 14, "missing": 10}
    assert summary["failed"] == 1


def test_a_failed_run_beside_a_finished_one_of_its_seed_is_not_noted(tmp_path):
    root = tmp_path / "smoke"
    write_run(root, ("flix", "study_a", 0, 0.7, None), STUDY_A)
    config = config_of("flix", "study_a", 0, 0.7, None) | {"data": {"root": "/tmp/nowhere"}}  # an earlier attempt, refused
    write_failure(root / "study_a" / "flix-at-another-root", ValueError("data root /tmp/nowhere is not a directory"), config)
    write_failure(root / "study_a" / "flix-seed1", RuntimeError("killed"), config_of("flix", "study_a", 1, 0.7, None))
    render(root, tmp_path / "out", "smoke", PAPER)
    md = (tmp_path / "out" / "table1.md").read_text()
    assert float(cells(tmp_path / "out", "table1").loc["FLix", "NER"]) == pytest.approx(STUDY_A["ner"])
    assert "seed 0: run failed" not in md and "/tmp/nowhere" not in md  # before: footnoted beside the good seed-0 run
    assert "flix on study_a (dropout 0.7, the paper's ranks), seed 1: run failed (RuntimeError: killed)" in md  # a seed with no result still is


def test_appendix_html_and_figure(report, tmp_path):
    out, summary = report
    appendix = pd.read_csv(out / "appendix_multilingual_ner.csv", dtype=str, keep_default_na=False)
    assert {"Single test", "Compute-matched validation", "FLix test"} <= set(appendix.columns)
    average = appendix[appendix["language"] == "Average"].iloc[0]
    assert float(average["Single test"]) == pytest.approx(44.0) and float(average["FLix validation"]) == pytest.approx(55.0)
    assert (out / "appendix_study_a.md").exists() and "qa_cross_lang_unseen_lang" in (out / "appendix_study_a.md").read_text()
    page = (out / "index.html").read_text()
    for name in PAPER_FILES:
        assert f'id="{name}"' in page
    assert SMOKE_NOTE in page and "data:image/png;base64," in page and "appendix" in page
    runs_section = page.split('id="runs"')[1].split('id="appendix"')[0]
    assert all(runs_section.count(f"<td>{key[1]}/{'_'.join(map(str, key))}</td>") == 1 for key in RUNS)  # each run once, by its record
    assert f"{len(RUNS)} runs; wall time" in page and f"{len(RUNS)} runs; wall time" in (out / "runs.md").read_text()
    assert (out / "figure2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "figure2.svg").read_text()[:500]
    frame = pd.read_csv(out / "figure2.csv", na_values=["–"], keep_default_na=False)  # the same figure drawn again: the same bytes
    again = [path.read_bytes() for path in plot(frame, tmp_path / "again", "smoke")]
    assert again == [(out / "figure2.png").read_bytes(), (out / "figure2.svg").read_bytes()]
    figure = pd.read_csv(out / "figure2.csv", dtype=str, keep_default_na=False).set_index(["task", "method"])
    assert float(figure.loc[("NER", "FLix"), "change"]) == pytest.approx(STUDY_A["ner"] + 1 - 56.0)
    assert figure.loc[("NER", "Param-matched"), "change"] == "–"
    assert set(summary["files"]) == {str(p) for p in out.iterdir() if p.is_file()}


def test_cli_exit_codes(report, tmp_path, capsys):
    out, _ = report
    runs = out.parent / "smoke"
    assert main(["--runs", str(runs), "--out", str(tmp_path / "o"), "--paper", str(PAPER)]) == 0
    printed = capsys.readouterr().out
    assert "wrote " in printed and "table1 14 filled/10 missing" in printed
    assert main(["--runs", str(tmp_path / "nope"), "--scale", "smoke", "--paper", str(PAPER)]) == 2
    only_failed = tmp_path / "failed_only" / "study_a" / "a_failed_run"
    only_failed.mkdir(parents=True)
    (only_failed / "failed.json").write_text(json.dumps({"error": "ValueError: boom\nmore", "traceback": "..."}))
    assert main(["--runs", str(tmp_path / "failed_only"), "--scale", "smoke", "--out", str(tmp_path / "o2"), "--paper", str(PAPER)]) == 2
    assert "ValueError: boom" in capsys.readouterr().err


def test_pages_state_versions_and_warn_when_a_table_mixes_them(tmp_path):
    root = tmp_path / "smoke"
    for seed, torch_version in ((0, "2.13.0"), (1, "2.12.1")):
        run_dir = write_run(root, ("flix", "multilingual_ner", seed, 0.7, None), {"ner": 50.0})
        results = json.loads((run_dir / "results.json").read_text())
        results["versions"] = {"python": "3.11.7", "torch": torch_version, "device": "cpu"}
        (run_dir / "results.json").write_text(json.dumps(results))
    render(root, tmp_path / "out", "smoke", PAPER)
    page = (tmp_path / "out" / "table2.md").read_text()
    assert "Versions: python 3.11.7, torch 2.12.1 / 2.13.0, device cpu" in page
    assert "Warning: these runs come from different versions (torch 2.12.1 / 2.13.0)" in page


def test_a_record_names_its_cpu_and_a_table_from_two_hosts_says_so(tmp_path):
    """Two hosts' float32 runs differ in speed and rounding: the device names the CPU's model
    (from /proc/cpuinfo where there is one), the report still reads its cores, and a table
    whose runs came from two CPUs warns."""
    import os

    import torch

    from flix.pipeline.versions import cpu_name, device_name
    from flix.report.runs import cores

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t: fpu\n")
    arch = cpu_name(tmp_path / "no_cpuinfo")  # where the system does not say: the architecture alone
    assert cpu_name(cpuinfo) == f"AMD EPYC 7B13 64-Core Processor, {arch}"
    if not torch.cuda.is_available():
        assert device_name().startswith("cpu (") and cores(device_name()) == os.cpu_count()
    root = tmp_path / "smoke"
    for seed, device in ((0, "cpu (AMD EPYC 7B13 64-Core Processor, x86_64, 2 cores)"), (1, "cpu (Intel(R) Xeon(R) Processor, x86_64, 2 cores)")):
        run_dir = write_run(root, ("flix", "multilingual_ner", seed, 0.7, None), {"ner": 50.0})
        results = json.loads((run_dir / "results.json").read_text())
        results["versions"] = {"python": "3.11.7", "device": device}
        (run_dir / "results.json").write_text(json.dumps(results))
    render(root, tmp_path / "out", "smoke", PAPER)
    page = (tmp_path / "out" / "table2.md").read_text()
    assert "Warning: these runs come from different versions (device cpu (AMD EPYC" in page
    assert "2 cores" in (tmp_path / "out" / "runs.md").read_text()


def test_snapshot_drops_stale_files_and_keeps_its_readme(report, tmp_path):
    out, _ = report
    runs = out.parent / "smoke"
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "README.md").write_text("how this snapshot was made")
    (snapshot / "table9.md").write_text("from an older commit")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    assert main(["--runs", str(runs), "--out", str(plain), "--paper", str(PAPER)]) == 0
    assert (plain / "notes.txt").exists()  # without --snapshot nothing is removed
    assert main(["--runs", str(runs), "--out", str(snapshot), "--paper", str(PAPER), "--snapshot"]) == 0
    assert (snapshot / "README.md").read_text() == "how this snapshot was made"
    assert not (snapshot / "table9.md").exists() and (snapshot / "table1.md").exists()


@pytest.mark.slow  # a minute under load: make test-all
def test_log_to_wandb_offline(report, tmp_path, monkeypatch):
    out, _ = report
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dirs = log_to_wandb(out, "smoke", project="flix-test", wandb_dir=tmp_path)
    assert all(d.parent == tmp_path / "wandb" and d.name.startswith("offline-run-") for d in run_dirs)
    assert all(list(d.glob("*.wandb")) for d in run_dirs)
    runs = out.parent / "smoke"
    assert main(["--runs", str(runs), "--out", str(tmp_path / "o"), "--paper", str(PAPER), "--wandb"]) == 0
    assert list((runs / "wandb").glob("offline-run-*/*.wandb"))  # beside the runs
    assert not (tmp_path / "o" / "wandb").exists()  # the report folder stays clean


def test_intervals_significance_and_cells_csv(tmp_path):
    """Runs that record per-example statistics get 95% intervals, and FLix's paired
    difference from compute-matched: a clear gain is marked, cells.csv holds the numbers,
    and a keep_one run is kept apart from the independent-dropout FLix cell."""
    from flix import metrics

    root = tmp_path / "runs" / "cpu"
    langs = load_mixture_by_name("multilingual_ner", "mini").eval_sets[0].langs
    gold = ["PER: Ada $$ LOC: Lagos", "ORG: UN", "LOC: Accra", "PER: Kofi"] * 10

    def ner_run(method: str, right: int, seed: int = 0, mode: str = "independent", dropout: float = 0.7) -> None:
        # the first `right` of every 4 predictions are correct, the rest are wrong
        preds = [g if i % 4 < right else "PER: nobody" for i, g in enumerate(gold)]
        run_dir = write_run(root, (method, "multilingual_ner", seed, dropout if mode == "independent" else 0.75, None), {"ner": 0.0}, scale="cpu")
        results = json.loads((run_dir / "results.json").read_text())
        results["test"]["ner"] = {lang: metrics.score("ner", gold, preds) for lang in langs}
        results["eval_sets"]["ner"]["test"] = metrics.score("ner", gold, preds)
        results["test_stats"] = {"ner": {lang: metrics.example_stats("ner", gold, preds) for lang in langs}}
        nll = [0.5 if i % 4 < right else 3.0 for i in range(len(gold))]  # the right ones are likely
        results["test_example_nll"] = {"ner": {lang: nll for lang in langs}}
        results["eval_sets"]["ner"]["test_nll"] = sum(nll) / len(nll)
        results["test_ids"] = {"ner": {lang: [f"{lang}-{i}" for i in range(len(gold))] for lang in langs}}
        results["config"]["dropout"] = dropout
        results["config"]["train"] = {"dropout_mode": mode}
        (run_dir / "results.json").write_text(json.dumps(results))

    ner_run("compute_matched", 1)
    ner_run("flix", 3)
    ner_run("flix", 4, mode="keep_one")  # must not be averaged into the FLix cell
    out = tmp_path / "out"
    render(root, out, "cpu", PAPER)
    frame = pd.read_csv(out / "cells.csv")
    assert {"table", "row", "column", "ours", "ci_low", "ci_high", "seeds", "paper", "diff_vs_compute_matched", "p_vs_compute_matched"} <= set(
        frame.columns
    )
    cell = lambda row: frame[(frame.table == "table2") & (frame.row == row) & (frame.column == "Multilingual NER")].iloc[0]  # noqa: E731
    flix, cm = cell("FLix"), cell("Compute-matched")
    assert flix.ours == pytest.approx(metrics.score("ner", gold, [g if i % 4 < 3 else "PER: nobody" for i, g in enumerate(gold)]))
    assert flix.ci_low < flix.ours < flix.ci_high and cm.ci_low < cm.ours < cm.ci_high and flix.seeds == 1
    assert flix.diff_vs_compute_matched == pytest.approx(flix.ours - cm.ours)
    assert flix.diff_ci_low_vs_compute_matched > 0 and flix.p_vs_compute_matched < 0.01
    assert pd.isna(cm.diff_vs_compute_matched)
    table2 = (out / "table2.md").read_text()
    assert f"{flix.ours:.1f} [{flix.ci_low:.1f}, {flix.ci_high:.1f}]°*" in table2  # °: one seed, examples only
    assert flix.interval_covers == "examples only" and flix.p_holm_vs_compute_matched >= flix.p_vs_compute_matched
    # the same cells in the gold target NLL (lower is better), with intervals and paired differences
    nll = frame[(frame.table == "table2_nll") & (frame.column == "Multilingual NER")].set_index("row")
    assert nll.loc["FLix", "ours"] == pytest.approx((3 * 0.5 + 3.0) / 4) and nll.loc["FLix", "ci_low"] <= nll.loc["FLix", "ours"]
    assert nll.loc["FLix", "diff_vs_compute_matched"] < 0 and pd.isna(nll.loc["FLix", "paper"]) and (out / "table2_nll.md").exists()
    # the keep_one run has its own row in the dropout-modes table (written because it exists)
    modes = frame[frame.table == "dropout_modes"].set_index(["row", "column"])
    assert modes.loc[("FLix, p = 0.7 keep-one", "Test"), "ours"] == pytest.approx(metrics.score("ner", gold, gold))
    assert modes.loc[("FLix, p = 0.7 independent", "Test"), "ours"] == pytest.approx(flix.ours)
    keep_one = modes.loc[("FLix, p = 0.7 keep-one", "Test")]  # an ablation row against its own control
    assert keep_one.diff_vs_control == pytest.approx(keep_one.ours - flix.ours) and keep_one.p_vs_control < 0.05
    assert pd.isna(modes.loc[("FLix, no dropout", "Test"), "ours"]) and (out / "dropout_modes.md").exists()


def test_table3_on_another_mixture_says_whose_figures_stand_beside_it(report, tmp_path):
    """Without in-language QA dropout runs, Table 3 falls back to NER; the paper's figures
    beside it are still its QA ones, and the caption must say so."""
    root = tmp_path / "runs"
    for dropout, base in ((0.7, 56.0), (0.0, 52.0)):
        write_run(root, ("flix", "multilingual_ner", 0, dropout, None), {"ner": base})
    render(root, tmp_path / "out", "smoke", PAPER)
    title = (tmp_path / "out" / "table3.md").read_text().splitlines()[0]
    assert title == (
        "# Table 3: FLix feature dropout on multilingual_ner "
        "(the paper's figures beside ours are on multilingual_qa_in_lang, the paper's Table 3 mixture)"
    )
    assert float(cells(tmp_path / "out", "table3").loc["0.0", "Test"]) == pytest.approx(52.0)
    assert "figures beside ours" not in (report[0] / "table3.md").read_text()  # on the paper's own mixture: no such words


def test_empty_predictions_counts_blank_outputs_and_a_damaged_file_leaves_a_dash(tmp_path):
    from flix.report.runs import empty_predictions

    folder = tmp_path / "predictions" / "test"
    assert empty_predictions(tmp_path) is None  # nothing recorded
    folder.mkdir(parents=True)
    lines = [{"id": "a", "target": "", "prediction": " "}, {"id": "b", "target": "PER: x", "prediction": "PER: x"}]
    (folder / "ner.sw.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "ner.yo.jsonl").write_text(json.dumps({"id": "c", "target": "", "prediction": ""}) + "\n")
    assert empty_predictions(tmp_path) == (2, 3)
    (folder / "ner.yo.jsonl").write_text('{"id": "c", "target": ""')  # cut short
    assert empty_predictions(tmp_path) is None
