"""The benchmarks (benchmarks/: adapters, model, layer) and `flix bench run` run end to end at
toy size and write their reports; `flix bench` runs a checkout's benchmarks in a child process."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from benchmarks import adapters, layer, model
from flix.pipeline import bench_command, estimate, flops
from flix.pipeline.memory import peak_rss_gib


def test_bench_adapters_writes_every_row(tmp_path, capsys):
    out = tmp_path / "bench" / "adapters.json"
    argv = [
        "--out",
        str(out),
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--batch",
        "4",
        "--seq",
        "8",
        "--threads",
        "1",
        "--features",
        "8,64",
        "--hidden",
        "64",
        "--layers",
        "1",
        "--vocab",
        "300",
        "--new-tokens",
        "2",
    ]
    assert adapters.main(argv) == 0
    report = json.loads(out.read_text())

    methods = [(r["method"], r["num_features"]) for r in report["rows"]]
    assert methods == [("none", 0), ("compute_matched", 1), ("flix", 8), ("flix", 64), ("peft_lora", 1)]
    assert {(r["method"], r["mode"]) for r in report["inference"]} == {
        (m, mode) for m in ("flix_mixed_inference", "peft_adapter_names", "none") for mode in ("forward", "generate")
    }
    assert all(r["num_combinations"] == 4 for r in report["inference"] if r["method"] != "none")
    times = [r["ms_per_step"] for r in report["rows"]] + [r["ms_per_batch"] for r in report["inference"]]
    assert all(math.isfinite(t) and t > 0 for t in times)

    assert set(report["targets"]) == {
        "flix_vs_compute_matched",
        "flix_many_vs_few_features",
        "mixed_inference_speedup_forward",
        "mixed_inference_speedup_generate",
    }
    for target in report["targets"].values():
        assert math.isfinite(target["ratio"]) and target["ratio"] > 0 and isinstance(target["pass"], bool)
    config = report["config"]
    assert (config["batch"], config["seq"], config["threads"], config["model"]["hidden_size"]) == (4, 8, 1, 64)
    assert config["versions"]["torch"] == torch.__version__ and config["versions"]["flix"] != "not installed"

    printed = capsys.readouterr().out
    assert "flix_mixed_inference" in printed and printed.count("PASS") + printed.count("MISS") == 4


@pytest.mark.slow  # a minute under load: make test-all
def test_bench_run_extrapolates_the_runs_own_budget(tmp_path, data_root, capsys):
    """`flix bench run` counts the validations, batches and steps that the real run makes."""
    from flix.pipeline.run import run
    from flix.pipeline.run_config import compose

    overrides = [
        f"data.root={data_root}",
        "mixture=multitask_sw",
        "logger=none",
        "scale.steps=5",
        "scale.eval_every=2",
        "scale.test_examples=5",
        "scale.eval_batch_size=2",
        "train.threads=1",
    ]
    out = tmp_path / "run.json"
    assert estimate.main([*overrides, "--steps", "2", "--warmup", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    results = run(compose(overrides), tmp_path / "real")
    budget = report["budget"]
    assert budget["steps"] == len(results["train_loss"]) == 5
    assert budget["validations"] == len(results["history"]) == 3  # steps 2, 4 and the last
    assert budget["validation_batches"] == {"ner": 2, "qa_in_lang": 2}  # 4 examples each, batches of 2
    assert budget["test_generation_batches"] == {"ner": 3, "qa_in_lang": 3}  # 5 examples each
    assert budget["select_by"] == "metric"  # this scale's default: validation generates too

    m, e = report["measured"], report["expected"]
    assert len(m["step_times_s"]) == 2 and m["step_s"] > 0 and set(m["generation_batch_s"]) == {"ner", "qa_in_lang"}
    assert e["train_s"] == pytest.approx(5 * m["step_s"])
    nll, generation = m["nll_pass_s"], m["generation_batch_s"]
    assert nll["validation"] > 0 and nll["test"] > 0
    assert e["validation_pass_s"] == pytest.approx(nll["validation"] + sum(2 * t for t in generation.values()))
    assert e["test_s"] == pytest.approx(nll["test"] + sum(3 * t for t in generation.values()))
    assert e["total_s"] == pytest.approx(e["startup_s"] + e["train_s"] + 3 * e["validation_pass_s"] + e["test_s"])
    assert report["command"].startswith("flix bench run data.root=") and report["bf16"] is False
    padding, speed = m["padding_fraction"], m["tokens_per_s"]
    assert 0.0 <= padding["sorted"] <= padding["unsorted"] < 1.0 and speed["sorted"] > 0 and speed["unsorted"] > 0
    assert len(m["useful_gflop_per_step"]) == 2 and m["useful_gflop_per_s"] > 0 and m["matmul_gflop_per_s"] > 0
    printed = capsys.readouterr().out
    assert "expected time per run" in printed and "length-sorted micro-batches" in printed and "GFLOP/s" in printed

    # by NLL, validation generates nothing; the test scores target NLL on more examples than it generates for
    assert estimate.main([*overrides, "train.select_by=nll", "scale.test_nll_examples=7", "--steps", "1", "--warmup", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    budget, m, e = report["budget"], report["measured"], report["expected"]
    assert budget["test_generation_batches"] == {"ner": 3, "qa_in_lang": 3}
    assert e["validation_pass_s"] == pytest.approx(m["nll_pass_s"]["validation"])
    assert e["test_s"] == pytest.approx(m["nll_pass_s"]["test"] + sum(3 * t for t in m["generation_batch_s"].values()))
    assert "validation (target NLL alone)" in capsys.readouterr().out


def test_useful_flops_count_real_tokens_and_targets_from_the_models_shapes():
    """Useful arithmetic of a known batch: 4 FLOPs per block weight per real token and 4
    per output-layer weight per real target (forward and input gradient), whatever the
    padding; a FLix model of the base counts what the base does."""
    from flix.base_models import load_model
    from flix.loss import IGNORE
    from flix.model import get_flix_model
    from flix.pipeline.methods import method_config

    base, _ = load_model({"name": "tiny"})
    config = base.config
    d, vocab, inner, layers = config.hidden_size, config.vocab_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * inner  # q, k, v, o, gate, up, down
    assert flops.linear_weights(base, skip=base.get_output_embeddings()) == layers * per_layer
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # 8 real positions of 10
    labels = torch.full((2, 5), IGNORE)
    labels[0, 4] = labels[1, 3:] = 7  # 3 real targets
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": mask, "labels": labels}
    expected = 4 * (8 * layers * per_layer + 3 * d * vocab)
    assert flops.useful_flops(base, batch, seq2seq=False) == expected
    flix = get_flix_model(base, method_config("flix", {"task": ["t0"], "lang": ["l0"]}, "joint"))
    assert flops.useful_flops(flix, batch, seq2seq=False) == expected
    assert flops.useful_flops(base, {**batch, "attention_mask": torch.ones(2, 5)}, seq2seq=False) == expected + 4 * 2 * layers * per_layer


def test_bench_names_its_benchmarks_and_options(capsys):
    assert bench_command.main(["nope"]) == 2
    assert "adapters" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        bench_command.main(["run", "method=lora"])
    assert exit_.value.code == 2 and "compute_matched" in capsys.readouterr().err


@pytest.mark.slow  # a minute under load: make test-all
def test_flix_bench_runs_the_checkouts_benchmarks_in_a_child_process(tmp_path, capsys):
    """`flix bench layer ...` is `python -m benchmarks.layer ...` from the checkout, in the
    caller's directory (a relative --out lands there); without benchmarks/ (flix installed
    from a wheel) it says so in one line."""
    argv = ["--d-in", "8", "--d-out", "8", "--tokens", "2", "--features", "8", "--repeats", "1", "--warmup", "0", "--attribute", "0"]
    cmd = [sys.executable, "-m", "flix", "bench", "layer", *argv, "--threads", "1", "--out", "layer.json"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [r["case"] for r in json.loads((tmp_path / "layer.json").read_text())["rows"]] == ["frozen", "compute_matched", "flix D=8"]
    assert bench_command.run_benchmark("layer", argv, repo=tmp_path) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "benchmarks/" in error and "checkout" in error


@pytest.mark.slow  # every case of the model benchmark, twice, and a memory probe in a child process
def test_bench_model_writes_every_row(tmp_path, data_root, capsys):
    """`flix bench model` end to end on the tiny model: every training and generation case
    on real smoke micro-batches (packed; peft on padded rows of the same examples), their
    useful arithmetic against a matmul timed in the same rounds, the micro-batch memory
    probe in a fresh process, and a verdict for every target."""
    out = tmp_path / "model.json"
    argv = [
        "--model",
        "tiny",
        "--out",
        str(out),
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--scale",
        "smoke",
        "--mixture",
        "multitask_sw",
        "--data-root",
        str(data_root),
        "--features",
        "8,16",
        "--gen-batch",
        "4",
        "--gen-seq",
        "6",
        "--new-tokens",
        "2",
        "--memory-scale",
        "smoke",
        "--threads",
        "1",
        "--override",  # packed, as scale=cpu trains (the test below checks these are the trainer's micro-batches)
        "scale.packing=true",
        "--override",
        "scale.tokens_per_micro_batch=600",
    ]
    assert model.main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["training"]] == ["base", "compute_matched", "peft_lora", "flix D=8", "flix D=16"]
    assert [r["case"] for r in report["generation"]] == ["base", "peft_adapter_names", "flix"]
    batches = report["batches"]
    assert batches["packed"] and len(batches["rows"]) == 2 and sum(batches["rows"]) <= sum(batches["examples"])
    assert batches["real_positions"] <= batches["positions"] and batches["real_positions"] < batches["padded_positions"]  # peft's rows pad
    assert batches["real_share"] == pytest.approx(batches["real_positions"] / batches["positions"])
    assert all(r["useful_gflop_per_s"] > 0 and r["of_matmul"] > 0 for r in report["training"]) and report["matmul"]["ms"] > 0
    attributed = {r["case"] for r in report["training"] if "own_ms" in r}
    assert attributed == {"compute_matched", "flix D=8", "flix D=16"}  # the FLix-layer cases, not base or peft
    assert all(r["own_ms"] > 0 and r["attributed_vs_base"][0] > 1 for r in report["training"] if "own_ms" in r)
    memory = report["micro_batch_memory"]
    assert memory["scale"] == "smoke" and memory["micro_batch"] == 8 and memory["peak_gib"] > 0
    assert set(report["targets"]) == {
        "flix_vs_base",
        "flix_vs_base_attributed",
        "flix_vs_compute_matched",
        "flix_vs_compute_matched_attributed",
        "flix_many_vs_few_features",
        "flix_many_vs_few_features_attributed",
        "generate_speedup_vs_peft",
        "generate_vs_base",
        "micro_batch_memory",
        "useful_vs_matmul",
        "computed_vs_real",
        "speedup_vs_peft",
    }
    assert report["targets"]["computed_vs_real"]["value"] == pytest.approx(1 / batches["real_share"])
    assert all(isinstance(t["pass"], bool) and math.isfinite(t["value"]) for t in report["targets"].values())
    assert all(t["interval"][0] <= t["value"] <= t["interval"][1] for t in report["targets"].values())
    printed = capsys.readouterr().out
    verdicts = [line.split()[0] for line in printed.splitlines() if line.split() and line.split()[0] in ("PASS", "MISS", "NOISE")]
    assert len(verdicts) == 12 and "FLix (D=8) / peft LoRA with the model's own loss" in printed
    assert "packed rows, scale.packing=true" in printed and "peft LoRA: the same examples as left-padded rows" in printed
    rechecked = tmp_path / "rechecked.json"
    assert model.main(["--rescore", str(out), "--out", str(rechecked)]) == 0, "a saved report is checked again without running"
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith(("PASS", "MISS", "NOISE"))] == verdicts
    assert json.loads(rechecked.read_text()) == report
    assert model.main(["--rescore", str(tmp_path / "missing.json")]) == 2
    old = {k: v for k, v in report.items() if k != "batches"}  # written before the real micro-batches
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert model.main(["--rescore", str(tmp_path / "old.json")]) == 2 and "run it again" in capsys.readouterr().err


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_bench_times_the_micro_batches_a_run_trains_on(tmp_path, data_root, monkeypatch, packing):
    """benchmarks.model's micro-batches are the ones `Trainer.train_step` computes on (its
    sampler, its length-sorted or packed micro-batches, packed rows' routing), caught in
    the trainer's own calls; peft's padded rows hold the same examples' real tokens and
    targets; and `flix bench run` counts the step that the trainer computed on."""
    from types import SimpleNamespace

    from benchmarks.model_cases import real_micro_batches
    from flix.loss import IGNORE
    from flix.pipeline import trainer as trainer_module
    from flix.pipeline.batching import padding_fraction, real_positions
    from flix.pipeline.run_config import compose, load_mixture_for

    overrides = ["scale.packing=true", "scale.tokens_per_micro_batch=600"] if packing else []
    cfg = compose(["scale=smoke", "mixture=multitask_sw", f"data.root={data_root}", "logger=none", *overrides])
    trainer = trainer_module.Trainer.from_config(cfg, load_mixture_for(cfg), tmp_path)
    assert trainer.packing is packing
    s = cfg.scale
    seen, routed = [], []  # what the trainer's step computes on: its loss's tensors, its routes' examples
    loss_sum, route = trainer_module.loss_sum, trainer.model.route
    monkeypatch.setattr(trainer_module, "loss_sum", lambda model, batch, seq2seq: seen.append(batch) or loss_sum(model, batch, seq2seq))
    monkeypatch.setattr(trainer.model, "route", lambda features, **kw: routed.append((len(features), kw["token_examples"])) or route(features, **kw))
    for step in range(3):
        trainer.train_step(step)
        batches = estimate.step_micro_batches(
            trainer.sampler, step, s.micro_batch_size, trainer.tokenizer, trainer.limits, False, s.tokens_per_micro_batch, packing
        )
        assert trainer.last_padding == pytest.approx(padding_fraction(batches))
        assert trainer.last_tokens == sum(real_positions(b) for b in batches)
    monkeypatch.undo()
    args = SimpleNamespace(scale="smoke", mixture="multitask_sw", model="tiny", data_root=str(data_root), override=overrides)
    ours = real_micro_batches(args, trainer.model, trainer.tokenizer, len(seen), torch.device("cpu"))
    assert len(ours) == len(seen) >= 3 and (len(seen) > 3) is packing  # smoke: one padded micro-batch a step, packed by 600 more
    keys = ("input_ids", "position_ids") if packing else ("input_ids", "attention_mask")
    for mine, theirs, (examples, tokens) in zip(ours, seen, routed):
        assert all(torch.equal(mine.trained[k], theirs[k]) for k in (*keys, "labels"))
        assert ("attention_mask" in mine.trained) is not packing and mine.examples == examples
        if packing:  # routed per token as the trainer routes; peft: the same examples' tokens and targets in padded rows
            assert torch.equal(mine.trained["token_examples"], tokens)
            real, mask = mine.trained["token_examples"] >= 0, mine.padded["attention_mask"] == 1
            assert torch.equal(mine.trained["input_ids"][real].sort().values, mine.padded["input_ids"][mask].sort().values)
            targets = [b["labels"][b["labels"] != IGNORE].sort().values for b in (mine.trained, mine.padded)]
            assert torch.equal(*targets)
        else:
            assert tokens is None and mine.padded is mine.trained
    trained, padded = [b.trained for b in ours], [b.padded for b in ours]
    assert (padding_fraction(trained) < padding_fraction(padded)) is packing


def test_attributed_quotient_spans_both_intervals():
    """D=4096 against D=8 from their attributed ratios: the interval takes the extremes."""
    from benchmarks.model_report import attributed_quotient

    value, low, high = attributed_quotient([1.10, 1.08, 1.12], [1.05, 1.04, 1.06])
    assert value == pytest.approx(1.10 / 1.05) and low == pytest.approx(1.08 / 1.06) and high == pytest.approx(1.12 / 1.04)


def test_time_interleaved_runs_each_case_once_a_round_in_shuffled_orders():
    """Every round calls every case once; the order changes between rounds, so no case
    always runs right after the same one (and inherits its caches or its garbage)."""
    from benchmarks.timing import time_interleaved

    calls: list[str] = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
    times = time_interleaved(cases, warmup=1, repeats=6)
    assert all(len(t) == 6 for t in times.values())
    rounds = [tuple(calls[i : i + 5]) for i in range(0, len(calls), 5)]
    assert len(rounds) == 7 and all(sorted(r) == list("abcde") for r in rounds)
    assert len(set(rounds)) > 1


def test_time_interleaved_times_the_reference_just_before_and_after_each_case(monkeypatch):
    """With a reference case, it runs before each round's first case and after every case
    (never in the shuffled order), and each case's reference time is the median of the
    calls on either side of it: a host that slows down while one case runs shows in that
    case's reference. The clock is the cases' own (each advances it), so the figures are exact."""
    import statistics
    import types

    from benchmarks import timing

    clock = {"now": 0.0, "ref_ms": 1.0}
    log: list[tuple[str, float]] = []
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    def case(name: str, ms: float, ref_ms_after: float | None = None):
        def run():
            if name == "ref":
                ms_now = clock["ref_ms"]
            else:
                ms_now = ms
                clock["ref_ms"] = ref_ms_after
            clock["now"] += ms_now / 1e3
            log.append((name, ms_now))

        return run

    cases = {"ref": case("ref", 0), "busy": case("busy", 10, ref_ms_after=5.0), "quiet": case("quiet", 20, ref_ms_after=1.0)}
    times = timing.time_interleaved(cases, warmup=1, repeats=4, reference="ref", reference_calls=2)
    assert set(times) == {"ref", "busy", "quiet", "ref@busy", "ref@quiet"}
    assert all(len(t) == 4 for t in times.values())
    assert times["busy"] == pytest.approx([10] * 4) and times["quiet"] == pytest.approx([20] * 4)
    rounds = [log[i : i + 8] for i in range(0, len(log), 8)]  # 2 references, then a case and 2 references, twice
    assert len(rounds) == 5 and all([n for n, _ in r[:2] + r[3:5] + r[6:]] == ["ref"] * 6 for r in rounds)
    for r, timed in zip(rounds[1:], range(4)):  # the warm-up round is not kept
        for at in (2, 5):
            name, around = r[at][0], [ms for _, ms in r[at - 2 : at] + r[at + 1 : at + 3]]
            assert times[f"ref@{name}"][timed] == pytest.approx(statistics.median(around))
        assert times["ref"][timed] == pytest.approx(statistics.median(ms for n, ms in r if n == "ref"))
    # the slow calls after busy weigh on its reference (3 or 5 ms), never on quiet's alone (1 or 3)
    assert min(times["ref@busy"]) > 2.99 and max(times["ref@quiet"]) < 3.01 and max(times["ref@busy"]) > min(times["ref@quiet"])


def test_paired_ratio_interval_and_verdicts():
    """Per-round ratios cancel a drift shared by both cases; the verdict is PASS or MISS
    only when the whole interval clears the bound."""
    from benchmarks.timing import paired_ratio, verdict

    drift = [100.0, 180.0, 120.0, 250.0, 90.0]  # a busy machine: medians of each case alone mislead
    value, low, high = paired_ratio([1.2 * t for t in drift], drift)
    assert value == pytest.approx(1.2) and low == pytest.approx(1.2) and high == pytest.approx(1.2)
    assert verdict(low, high, "<=", 1.1) == "MISS" and verdict(low, high, ">=", 1.1) == "PASS"
    value, low, high = paired_ratio([100, 115, 95, 108, 112, 99, 104], [100] * 7)
    assert low < 1.05 < high and verdict(low, high, "<=", 1.05) == "NOISE"


def test_pooled_ratio_weighs_rounds_by_their_size():
    """Rounds of different micro-batches: the pooled ratio is total over total time (what a
    step of those micro-batches takes), where the median of per-round ratios follows the
    many small rounds; its interval is a bootstrap over rounds and holds the value."""
    from benchmarks.timing import paired_ratio, pooled_ratio

    den = [1000.0, 1000.0, 1000.0, 7000.0, 7000.0]  # three 1 s micro-batches, two 7 s ones
    num = [1300.0, 1300.0, 1300.0, 7350.0, 7350.0]  # 1.3x on the small ones, 1.05x on the large
    value, low, high = pooled_ratio(num, den)
    assert value == pytest.approx(sum(num) / sum(den)) == pytest.approx(18600 / 17000)
    assert paired_ratio(num, den)[0] == pytest.approx(1.3)
    assert 1.05 <= low <= value <= high <= 1.3
    assert pooled_ratio([2.0 * d for d in den], den) == pytest.approx((2.0, 2.0, 2.0))


@pytest.mark.slow  # allocates and measures in child processes
def test_peak_memory_of_a_child_process_is_its_own():
    """A probe started by subprocess reports its own peak, not its parent's (ru_maxrss
    inherits the parent's through vfork/exec; VmHWM does not)."""
    ballast = bytearray(1 << 30)
    ballast[:: 1 << 12] = b"\1" * len(ballast[:: 1 << 12])  # touch every page: 1 GiB resident
    child = subprocess.run(
        [sys.executable, "-c", "from flix.pipeline.memory import peak_rss_gib; print(peak_rss_gib())"], capture_output=True, text=True, check=True
    )
    assert peak_rss_gib() >= 1.0 > float(child.stdout)
    del ballast


def test_bench_layer_prints_paired_ratios(tmp_path, capsys):
    out = tmp_path / "layer.json"
    argv = ["--d-in", "32", "--d-out", "48", "--tokens", "5", "--features", "8,16", "--repeats", "3", "--warmup", "1", "--threads", "1"]
    assert layer.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["frozen", "compute_matched", "flix D=8", "flix D=16"]
    assert rows[0]["vs_frozen"] == [1.0, 1.0, 1.0] and all(r["vs_frozen"][1] <= r["vs_frozen"][0] <= r["vs_frozen"][2] for r in rows)
    assert "attributed_vs_frozen" not in rows[0] and all(r["attributed_vs_frozen"][0] > 1 for r in rows[1:])
    assert "flix D=16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        layer.main(["--features", "4"])


def test_bench_model_bf16_runs_the_cuda_configuration_on_cpu():
    """`--bf16 true` runs the cases as they run on a GPU (bf16 autocast): the FLix layers
    compute in bf16, while the banks stay float32 and still learn."""
    from types import SimpleNamespace

    from benchmarks.model_cases import MicroBatch, autocast_for, bf16_enabled, flix_step, full_length_batch, gemma_features, load, routes_for
    from flix.pipeline.methods import method_config

    cpu = torch.device("cpu")
    assert bf16_enabled(SimpleNamespace(bf16="true"), cpu) and not bf16_enabled(SimpleNamespace(bf16="auto"), cpu)
    base, tokenizer = load(SimpleNamespace(model="tiny"))
    config = method_config("flix", gemma_features(8), "joint", alpha=16.0, feature_dropout=0.0)
    rows = full_length_batch(4, 10, 3, tokenizer, cpu)
    batches = [MicroBatch(trained=rows, padded=rows)]
    step = flix_step(base, config, batches, routes_for(gemma_features(8), batches, torch.Generator().manual_seed(0)), autocast_for(cpu, True), cpu)
    layers = {}

    def record(module, inputs, out) -> None:  # a forward hook that returns nothing keeps the output
        if type(module).__name__ == "FLixLayer":
            layers[module] = out.dtype

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        step()
    finally:
        hook.remove()
    assert layers and set(layers.values()) == {torch.bfloat16}
    assert {layer.flix_B.dtype for layer in layers} == {torch.float32}
    assert all(layer.flix_B.abs().sum() > 0 for layer in layers)  # B starts at zero: the step updated it


@pytest.mark.slow
def test_bench_model_bf16_end_to_end_says_so(tmp_path, data_root, capsys):
    """`flix bench model --bf16 true` end to end (minutes on a CPU, which emulates bf16): the
    report records and prints the autocast; a value other than true/false/auto is refused."""
    out = tmp_path / "model.json"
    argv = ["--model", "tiny", "--out", str(out), "--repeats", "1", "--warmup", "0", "--scale", "smoke", "--mixture", "multitask_sw"]
    argv += ["--data-root", str(data_root), "--features", "8", "--gen-batch", "4", "--gen-seq", "6", "--new-tokens", "2", "--memory-scale", "none"]
    assert model.main([*argv, "--threads", "1", "--bf16", "true"]) == 0
    written = json.loads(out.read_text())
    assert written["config"]["autocast"] == "bf16"
    assert "flix_many_vs_few_features" not in written["targets"]  # one D: no D against itself
    assert "autocast bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        model.main([*argv, "--bf16", "yes"])


def test_attribution_counts_the_adapters_own_work_only():
    """own_time splits a profiled step: nothing for the frozen base; for a FLix layer its
    nodes less every frozen matmul of the step (all inside its nodes; a layer step has no
    optimizer). Sums over one profile, so machine load cannot move them (a share of the
    step can: under load the adapters' small ops stretch most); what share a quiet step
    spends there is `make bench`'s to print."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.attribute import ADAPTER_NODES, FROZEN_MATMULS, adapters_own_ms, own_time
    from benchmarks.cases import mixed_routes
    from benchmarks.layer_run import layer_case
    from benchmarks.model_cases import gemma_features
    from flix.pipeline.methods import method_config

    x = torch.randn(4, 128, 512).requires_grad_()
    grad = torch.randn(4, 128, 512)
    assert [own for _, own in own_time(layer_case(512, 512, x, grad), 2)] == [0.0, 0.0]
    space = gemma_features(8)
    config = method_config("flix", space, "joint", alpha=16.0)
    step = layer_case(512, 512, x, grad, config, mixed_routes(space, 4, 1, torch.Generator().manual_seed(0))[0])
    assert all(0 < own < ms for ms, own in own_time(step, 2))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()

    def total_ms(keep) -> float:
        return sum(e.cpu_time_total for e in events if keep(e)) / 1e3

    frozen = total_ms(lambda e: e.name in FROZEN_MATMULS)
    nodes = total_ms(lambda e: e.name in ADAPTER_NODES)
    assert frozen > 0
    assert adapters_own_ms(events) == pytest.approx(nodes - frozen)


def test_bench_loss_times_and_measures_both_ways_of_computing_the_loss(tmp_path, capsys):
    from benchmarks import loss

    out = tmp_path / "loss.json"
    assert (
        loss.main(["--rows", "3,40", "--vocab", "5000", "--width", "32", "--repeats", "3", "--warmup", "0", "--threads", "1", "--out", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert [(r["rows"], r["case"]) for r in report["rows"]] == [(3, "flix.loss"), (3, "full logits"), (40, "flix.loss"), (40, "full logits")]
    assert all(r["gflops"] > 0 and len(r["ms_all"]) == 3 and r["held_mib"] >= 0 for r in report["rows"])
    low, high = report["rows"][0]["vs_full_logits"][1:]
    assert low <= report["rows"][0]["vs_full_logits"][0] <= high
    assert "flix.loss / full logits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        loss.main(["--rows", "a,b"])
