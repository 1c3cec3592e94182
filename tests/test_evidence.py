"""What runs record so that a report can carry a claim: fixed random evaluation samples
with ids, the gold targets' NLL beside the paper's metric, selection that never sees
held-out labels and breaks ties by NLL, records without machine paths, and micro-batches
that pad less."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flix.base_models import load_model
from flix.data.mixture_files import load_mixture_by_name
from flix.data.reader import read_dataset
from flix.data.sampling import eval_sample
from flix.pipeline.batching import IGNORE, TextLimits, micro_batches, padding_fraction, target_nll, training_batch
from flix.pipeline.run import run
from flix.record import selection_key

LIMITS = TextLimits(max_prompt_tokens=96, max_target_tokens=12, max_context_chars=120)


def test_eval_sample_is_fixed_random_and_in_file_order(data_root):
    examples = read_dataset(data_root, "ner", "train", "sw")  # 16 lines in the repository's sample
    sample = eval_sample(examples, 8, "ner", "train", "sw")
    assert len(sample) == 8 and len({ex.id for ex in sample}) == 8
    assert sample == eval_sample(list(examples), 8, "ner", "train", "sw")  # the same for every run
    positions = [examples.index(ex) for ex in sample]
    assert positions == sorted(positions)  # file order kept
    assert positions != list(range(8))  # not the first lines of the file
    assert max(positions) > len(examples) // 2  # spread over the file
    assert eval_sample(examples, 8, "ner", "test", "ha") != sample  # another file draws anew
    assert eval_sample(examples, None, "ner", "test", "sw") == examples
    assert eval_sample(examples, len(examples) + 5, "ner", "test", "sw") == examples


def test_target_nll_is_each_examples_mean_token_cross_entropy_whatever_the_batch(data_root):
    model, tokenizer = load_model({"name": "tiny"})
    model.eval()
    examples = read_dataset(data_root, "ner", "validation", "sw", limit=3) + read_dataset(data_root, "qa_in_lang", "validation", "sw", limit=2)
    batch = training_batch(examples, tokenizer, LIMITS, seq2seq=False, train=False)
    inputs = {k: v for k, v in batch.items() if k != "num_targets"}
    batched = target_nll(model, inputs, seq2seq=False)
    for ex, value in zip(examples, batched):
        alone = training_batch([ex], tokenizer, LIMITS, seq2seq=False, train=False)
        ids, labels = alone["input_ids"], alone["labels"][0]
        labels = labels[labels != IGNORE]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        n = len(labels)
        expected = F.cross_entropy(logits[-n - 1 : -1], labels).item()  # position t predicts token t + 1
        assert value == pytest.approx(expected, abs=1e-4)
    assert all(v > 0 for v in batched)


def test_micro_batches_are_length_sorted_same_examples_and_pad_less(data_root):
    _, tokenizer = load_model({"name": "tiny"})
    examples = read_dataset(data_root, "ner", "train", "sw", limit=16)  # the repository's sample has 16
    limits = TextLimits(max_prompt_tokens=160, max_target_tokens=32)
    chunks = micro_batches(examples, 4, tokenizer, limits, seq2seq=False)
    assert [len(c) for c in chunks] == [4, 4, 4, 4]
    assert sorted(ex.id for c in chunks for ex in c) == sorted(ex.id for ex in examples)  # the same training
    sorted_batches = [training_batch(c, tokenizer, limits, seq2seq=False) for c in chunks]
    plain = [training_batch(examples[i : i + 4], tokenizer, limits, seq2seq=False) for i in range(0, 16, 4)]
    widths = [b["input_ids"].shape[1] for b in sorted_batches]
    assert widths == sorted(widths, reverse=True)
    assert padding_fraction(sorted_batches) < padding_fraction(plain)
    assert sum(b["num_targets"] for b in sorted_batches) == sum(b["num_targets"] for b in plain)


def test_selection_breaks_ties_by_nll_and_can_select_on_nll_or_the_last_step():
    assert selection_key(0.0, 2.0, 8, "metric") > selection_key(0.0, 3.0, 16, "metric")  # all-zero validations
    assert selection_key(5.0, 9.0, 8, "metric") > selection_key(4.0, 1.0, 16, "metric")  # the paper's metric first
    assert selection_key(4.0, 1.0, 8, "nll") > selection_key(5.0, 9.0, 16, "nll")
    assert selection_key(None, 9.0, 16, "final") > selection_key(None, 1.0, 8, "final")  # no selection: the last step
    with pytest.raises(ValueError, match="train.select_by"):
        selection_key(1.0, 1.0, 8, "loss")


def test_zero_shot_mixture_selects_on_supervised_sets_of_its_task():
    mixture = load_mixture_by_name("zeroshot_sp", "mini").restrict(4)
    held_out = {lang for s in mixture.eval_sets for lang in s.langs}
    (selection,) = mixture.selection_sets
    assert selection.task == "semantic_parsing" and not selection.zero_shot
    assert selection.langs == mixture.train["semantic_parsing"] and not held_out & set(selection.langs)
    assert ("semantic_parsing", "th", "validation") not in [(t, lang, s) for t, s, lang in mixture.required_files() if s == "test"]
    supervised = load_mixture_by_name("multilingual_ner", "mini")
    assert supervised.selection_sets == supervised.eval_sets


def test_zero_shot_run_records_its_selection_sets_and_never_scores_them(compose, tmp_path):
    results = run(compose("mixture=zeroshot_sp"), tmp_path)
    (selected,) = results["selection"]["sets"]
    assert results["selection"]["by"] == "metric"
    assert selected["task"] == "semantic_parsing" and "th" not in selected["langs"]
    assert set(results["test"]["semantic_parsing"]) == {"th"}  # only the held-out language is scored
    history = results["history"]
    averages = [h["validation_average"] for h in history]
    if len(set(averages)) == 1:  # a tie (the tiny model scores 0): the lower NLL wins
        assert results["best_step"] == min(history, key=lambda h: h["validation_nll"])["step"]


def test_run_records_nll_ids_and_no_machine_paths(compose, tmp_path, data_root):
    results = run(compose("mixture=multitask_sw"), tmp_path)
    for task, langs in results["test"].items():
        for lang in langs:
            ids, nll = results["test_ids"][task][lang], results["test_example_nll"][task][lang]
            assert len(ids) == len(nll) == len(results["test_stats"][task][lang]) == 3
            assert results["test_nll"][task][lang] == pytest.approx(sum(nll) / len(nll))
            sample = eval_sample(read_dataset(data_root, task, "test", lang), 3, task, "test", lang)
            assert ids == [ex.id for ex in sample]  # the fixed sample, by id
            lines = (tmp_path / "predictions" / "test" / f"{task}.{lang}.jsonl").read_text().splitlines()
            assert [json.loads(line)["nll"] for line in lines] == nll
    for entry in results["eval_sets"].values():
        assert entry["test_nll"] > 0 and entry["validation_nll"] > 0
    assert all("validation_nll" in h for h in results["history"])
    text = (tmp_path / "results.json").read_text()
    assert str(Path(data_root).resolve()) not in text and results["data_root"] == Path(data_root).resolve().name


@pytest.mark.slow  # a smoke study of 4 runs, its records and two renders
def test_a_studys_records_alone_rerender_its_cells_exactly(tmp_path, monkeypatch, data_root):
    """Records (results, predictions, logs; no weights) copied away from the run
    directories render the same cells.csv, NLL cells with intervals included."""
    import pandas as pd

    from flix.pipeline import study
    from flix.record import copy_records, main
    from flix.report import preregistered
    from flix.report.render import render

    monkeypatch.setenv("FLIX_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("FLIX_DATA_ROOT", str(data_root))
    folder = tmp_path / "experiments"
    folder.mkdir()
    monkeypatch.setattr(study, "EXPERIMENTS", folder)
    monkeypatch.setattr(preregistered, "EXPERIMENTS", folder)
    family = [{"name": "flix_vs_lora", "a": {"method": "flix", "dropout": 0.7}, "b": {"method": "compute_matched"}}]
    design = {"registered": "2026-12-06", "scale": "smoke", "primary": "test target NLL", "alpha": 0.05, "smallest_effect": 0.1, "family": family}
    sweeps = [{"method": ["compute_matched", "flix"], "mixture": ["multilingual_ner"]}]
    (folder / "pair.yaml").write_text(json.dumps({"design": design, "order": "seed", "sweeps": sweeps}))
    fast = ["scale.steps=2", "scale.eval_every=2", "scale.eval_examples=2", "scale.test_examples=3", "train.threads=1"]
    assert study.main(["pair", "--seeds", "0,1", "--logger", "none", "--no-report", *fast]) == 0
    runs = tmp_path / "runs" / "smoke"
    paper = Path(__file__).resolve().parents[1] / "flix" / "report" / "paper"
    render(runs, tmp_path / "from_runs", "smoke", paper)
    assert main([str(runs), str(tmp_path / "records")]) == 0
    records = tmp_path / "records"
    assert not list(records.rglob("*.safetensors")) and not list(records.rglob("checkpoints"))
    assert len(list(records.rglob("results.json"))) == 4 and list(records.rglob("train.log")) and list(records.rglob("overrides.yaml"))
    render(records, tmp_path / "from_records", "smoke", paper)
    for name in ("cells.csv", "preregistered.csv", "curves.csv", "curves.svg"):
        assert (tmp_path / "from_records" / name).read_text() == (tmp_path / "from_runs" / name).read_text(), name
    # the pre-registered question: paired by seed on the test NLL sample, Holm over the family alone
    (question,) = pd.read_csv(tmp_path / "from_records" / "preregistered.csv").itertuples()
    by_run = {
        (r["method"], r["seed"]): r["eval_sets"]["ner"]["test_nll"] for r in map(json.loads, map(Path.read_text, records.rglob("results.json")))
    }
    expected = [by_run[("flix", s)] - by_run[("compute_matched", s)] for s in (0, 1)]
    assert question.diff == pytest.approx(sum(expected) / 2, abs=1e-4) and question.seeds == "0 1"
    assert question.p_holm == pytest.approx(question.p, abs=1e-4)  # a family of one: Holm changes nothing
    established = question.p_holm < 0.05
    small = -0.1 < question.ci_low and question.ci_high < 0.1
    expected_verdict = ", ".join(["established"] * established + ["ruled out as larger than 0.1"] * small) or "not settled"
    assert question.verdict == expected_verdict
    # the power the design had: a two-sided t at alpha / 1 (a family of one) against 0.1 nats, with the achieved error
    from flix.report.uncertainty import t_power, t_quantile

    assert question.half_width == pytest.approx((question.ci_high - question.ci_low) / 2, abs=2e-4)
    se = (question.ci_high - question.ci_low) / 2 / t_quantile(0.975, 1)
    assert question.power == pytest.approx(t_power(0.1, se, 1, 0.05), abs=2e-3) and 0.05 <= question.power <= 1
    # no verdict part-way through the design's seeds, nor from one seed
    from flix.record.read import read_results

    finished = [read_results(path) for path in records.rglob("results.json")]
    (part_way,) = preregistered.analyse({**design, "seeds": [0, 1, 2]}, finished)
    assert part_way.verdict == "interim: 2 of 3 seeds, no verdict before seed 2 is in" and part_way.result.seeds == (0, 1)
    (two_missing,) = preregistered.analyse({**design, "seeds": [0, 1, 2, 3]}, finished)
    assert two_missing.verdict == "interim: 2 of 4 seeds, no verdict before seeds 2, 3 are in"
    (one_seed,) = preregistered.analyse(design, [r for r in finished if r.seed == 0])
    assert one_seed.verdict == "not settled: one seed has no seed variance"
    curves = pd.read_csv(tmp_path / "from_records" / "curves.csv")
    assert len(curves) == 4 and set(curves.step) == {2} and curves.validation_nll.gt(0).all()  # 4 runs, one validation each
    cells = pd.read_csv(tmp_path / "from_records" / "cells.csv")
    nll = cells[(cells.table == "table2_nll") & (cells.column == "Multilingual NER") & (cells.row == "FLix")].iloc[0]
    assert nll.seeds == 2 and nll.ci_low < nll.ours < nll.ci_high and nll.interval_covers == "seeds and examples"
    assert not pd.isna(nll.diff_vs_compute_matched) and copy_records(runs, tmp_path / "again")  # a second copy works too

    # the runs table: each run's cost from its record, the same from the records as from the runs
    table = tmp_path / "from_records" / "runs.csv"
    assert table.read_text() == (tmp_path / "from_runs" / "runs.csv").read_text()
    rows, results = pd.read_csv(table), [json.loads(p.read_text()) for p in sorted(records.rglob("results.json"))]
    assert sorted(rows.run) == ["Compute-matched"] * 2 + ["FLix, p = 0.7"] * 2 and sorted(rows.seed) == [0, 0, 1, 1]
    assert rows.seconds.sum() == pytest.approx(sum(r["time_seconds"] for r in results), abs=1e-3)
    assert (rows[rows.run == "Compute-matched"].featureless == 0).all() and rows.resumed.isna().all()
    examples = sum(len(ids) for r in results for langs in r["test_ids"].values() for ids in langs.values())
    assert sum(int(text.split("/")[1]) for text in rows.empty_test) == examples
    # each run's test score and NLL are its record's, and a table cell is their mean over seeds
    for _, row in rows.iterrows():
        result = json.loads((records / row.folder / "results.json").read_text())
        (entry,) = result["eval_sets"].values()
        shown = "; ".join(f"{h['step']}: {h['validation_average']:.1f} / {h['validation_nll']:.2f}" for h in result["history"])
        assert row.validations == shown and str(result["best_step"]) + ":" in shown
        assert row.test == pytest.approx(entry["test"], abs=1e-4) and row.test_nll == pytest.approx(entry["test_nll"], abs=1e-4)
    flix_cell = cells[(cells.table == "table2") & (cells.column == "Multilingual NER") & (cells.row == "FLix")].iloc[0]
    assert flix_cell.ours == pytest.approx(rows[rows.run == "FLix, p = 0.7"].test.mean(), abs=1e-3)
    hours = rows.seconds.sum() / 3600 * os.cpu_count()
    assert f"{hours:.2f} core-hours (wall time x {os.cpu_count()} cores)" in (tmp_path / "from_records" / "runs.md").read_text()


@pytest.mark.parametrize(
    "scale, names",
    [
        ("cpu", ("cells.csv", "runs.csv")),
        ("cpu_long", ("cells.csv", "runs.csv", "preregistered.csv", "curves.csv")),  # the pre-registered study, part-way or whole
    ],
)
def test_a_committed_report_is_what_its_committed_records_render(tmp_path, scale, names):
    """reports/<scale>'s cells, runs, verdicts and curves are re-rendered, byte for byte, from
    reports/<scale>/runs (a record committed without its snapshot, or a snapshot edited by
    hand, fails here)."""
    from flix.report.render import render

    committed = Path(__file__).resolve().parents[1] / "reports" / scale
    render(committed / "runs", tmp_path, scale, Path(__file__).resolve().parents[1] / "flix" / "report" / "paper")
    for name in names:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name


def test_length_bucketed_generation_returns_each_examples_own_output_in_order(data_root):
    """predict() batches prompts by length; each output is the one the example gets alone
    (on the causal model, whose greedy outputs left padding leaves unchanged here; the tiny
    T5's outputs on the repository's sample differ between some batches and alone)."""
    name = "tiny"
    from flix import FLixConfig, get_flix_model
    from flix.pipeline.evaluate import predict

    base, tokenizer = load_model({"name": name})
    model = get_flix_model(base, FLixConfig(features={"task": ["ner", "qa_in_lang"], "lang": ["sw"]}, ranks={"task": 2, "lang": 2}))
    model.eval()
    examples = read_dataset(data_root, "ner", "validation", "sw", limit=5) + read_dataset(data_root, "qa_in_lang", "validation", "sw", limit=3)
    seq2seq = name == "tiny_seq2seq"
    together = predict(model, tokenizer, examples, LIMITS, 4, seq2seq, "cpu")
    alone = [predict(model, tokenizer, [ex], LIMITS, 1, seq2seq, "cpu")[0] for ex in examples]
    assert together == alone and len(set(alone)) > 1
