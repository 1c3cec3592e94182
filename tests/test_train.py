"""End-to-end runs on the real mini data with the tiny model (and Gemma when cached)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import train_cmd

from flix import metrics
from flix.pipeline.run import run
from flix.pipeline.run_config import load_mixture_for
from flix.report.runs import resumed_steps

REPO = Path(__file__).resolve().parents[1]


def check_results(results: dict, run_dir: Path) -> None:
    for key in (
        "method",
        "mixture",
        "scale",
        "seed",
        "model",
        "best_step",
        "validation",
        "test",
        "history",
        "eval_sets",
        "trainable_parameters",
        "time_seconds",
    ):
        assert key in results, key
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    for split in ("validation", "test"):
        for task, langs in results[split].items():
            assert langs and all(0.0 <= v <= 100.0 for v in langs.values()), (split, task)
        frame = pd.read_csv(run_dir / "tables" / f"{split}.csv", index_col="language")
        assert set(frame.columns) == set(results[split])
    if isinstance(results["history"], list):  # the single baseline keeps one history per dataset
        assert [h["step"] for h in results["history"]] == [2, 4]
        fractions = results["featureless_fraction"]
        assert len(fractions) == len(results["train_loss"]) and all(0.0 <= f <= 1.0 for f in fractions)
    assert results["trainable_parameters"] > 0
    versions = results["versions"]  # what produced the numbers
    assert versions["torch"] == torch.__version__ and versions["python"] and versions["device"].startswith(("cpu", "NVIDIA"))
    assert {"transformers", "peft", "hydra-core", "wandb", "flix"} <= set(versions)
    # per-example test statistics reproduce every test score (the report's intervals resample them)
    for task, langs in results["test"].items():
        for lang, value in langs.items():
            rows = results["test_stats"][task][lang]
            assert metrics.score_from_stats(task, [sum(c) for c in zip(*rows)]) == pytest.approx(value, abs=1e-9)


@pytest.mark.parametrize("method", ["flix", "compute_matched", "param_matched", "flix_shared"])
def test_smoke_run_every_method(method, compose, tmp_path):
    results = run(compose(f"method={method}", "mixture=multitask_sw"), tmp_path)
    check_results(results, tmp_path)
    assert set(results["test"]) == {"ner", "qa_in_lang"} and set(results["test"]["ner"]) == {"sw"}
    saved = json.loads((tmp_path / "best_adapter" / "flix_config.json").read_text())
    if method in ("flix", "flix_shared"):  # what `flix export` writes a peft adapter for
        assert saved["trained_combinations"] == [{"task": "ner", "lang": "sw"}, {"task": "qa_in_lang", "lang": "sw"}]
    assert sorted(p.name for p in (tmp_path / "predictions" / "test").iterdir()) == ["ner.sw.jsonl", "qa_in_lang.sw.jsonl"]
    flix = results["flix"]
    assert flix["active_rank"] == (flix["shared_rank"] if method == "param_matched" else 6)
    # dropout 0.7 over task + language leaves about half the examples with no feature; LoRA never
    expected = 0.49 if method == "flix" else 0.0
    assert sum(results["featureless_fraction"]) / len(results["featureless_fraction"]) == pytest.approx(expected, abs=0.25)


def test_keep_one_dropout_leaves_no_example_featureless(compose, tmp_path):
    results = run(compose("method=flix", "mixture=multitask_sw", "train.dropout_mode=keep_one"), tmp_path)
    assert results["flix"]["dropout_mode"] == "keep_one" and results["config"]["train"]["dropout_mode"] == "keep_one"
    assert set(results["featureless_fraction"]) == {0.0}


def test_smoke_run_seq2seq_model(compose, tmp_path):
    results = run(compose("model=tiny_seq2seq", "mixture=multitask_sw"), tmp_path)
    check_results(results, tmp_path)
    assert results["model"] == "tiny_seq2seq" and all(loss > 0 for loss in results["train_loss"])


def test_param_matched_solves_its_rank(compose, tmp_path, capfd):
    flix = run(compose("method=flix", "mixture=multitask_sw"), tmp_path / "flix")
    matched = run(compose("method=param_matched", "mixture=multitask_sw"), tmp_path / "pm")
    assert matched["flix"]["shared_rank"] == 2 * 2 + 1 * 4  # two tasks of rank 2, one language of rank 4
    assert matched["trainable_parameters"] == flix["trainable_parameters"]
    assert "param_matched: active rank 8" in capfd.readouterr().err  # the solved rank is logged


def test_single_trains_one_adapter_per_dataset(compose, tmp_path):
    results = run(compose("method=single", "mixture=multitask_sw"), tmp_path)
    assert set(results["best_step"]) == {"ner.sw", "qa_in_lang.sw"}
    assert (tmp_path / "datasets" / "ner.sw" / "best_adapter").is_dir()
    assert set(results["test"]) == {"ner", "qa_in_lang"}


def test_zero_shot_sets_route_with_the_task_alone(compose, tmp_path):
    results = run(compose("mixture=study_a", "scale.max_langs_per_task=1", "scale.eval_examples=2", "scale.test_examples=2"), tmp_path)
    unseen = results["eval_sets"]["qa_cross_lang_unseen_lang"]
    assert unseen["zero_shot"] == "unseen_language"
    trained_langs = results["flix"]["features"]["lang"]
    assert not set(unseen["langs"]) & set(trained_langs)
    assert all(lang in results["test"]["qa_cross_lang"] for lang in unseen["langs"])
    combo = results["eval_sets"]["qa_cross_lang_unseen_comb"]
    assert combo["zero_shot"] == "unseen_combination" and set(combo["langs"]) <= set(trained_langs)


def test_rerun_of_a_finished_run_does_nothing(compose, tmp_path):
    first = run(compose("mixture=multitask_sw"), tmp_path)
    mtime = (tmp_path / "results.json").stat().st_mtime
    assert run(compose("mixture=multitask_sw"), tmp_path) == first
    assert (tmp_path / "results.json").stat().st_mtime == mtime


def test_a_run_resolves_the_data_root_and_checks_its_files_once(compose, tmp_path, monkeypatch):
    """The root is decided once, by check_run, and handed down: the trainer neither reads
    `data.root` nor checks the mixture's files again, and the process group is set up once."""
    from flix.data import mixtures, reader
    from flix.pipeline import distributed
    from flix.pipeline import run as run_module

    calls = {"resolve": 0, "check": 0, "setup": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(reader, "resolve_root", counted("resolve", reader.resolve_root))
    monkeypatch.setattr(mixtures.Mixture, "check", counted("check", mixtures.Mixture.check))
    monkeypatch.setattr(run_module.distributed, "setup", counted("setup", distributed.setup))
    results = run(compose("method=single", "mixture=multitask_sw"), tmp_path)  # two adapters, two trainers
    assert set(results["best_step"]) == {"ner.sw", "qa_in_lang.sw"}
    assert calls["check"] == 1 and calls["setup"] == 1
    # check_run's own, Mixture.check's and the listing of what exists there; none per trainer or file
    assert calls["resolve"] == 3, calls


def _train_cmd(run_dir: Path, data_root: Path, steps: int) -> list[str]:
    return train_cmd(run_dir, data_root, f"scale.steps={steps}", "scale.eval_every=4", "scale.checkpoint_every=4")


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, data_root):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    steps = 40
    subprocess.run(_train_cmd(tmp_path / "full", data_root, steps), check=True, env=env, capture_output=True, cwd=REPO)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, data_root, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "latest" / "state.pt").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    stopped_at = torch.load(killed / "checkpoints" / "latest" / "state.pt", weights_only=True)["step"]
    assert 0 < stopped_at < steps
    subprocess.run(_train_cmd(killed, data_root, steps), check=True, env=env, capture_output=True, cwd=REPO)
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    resumed = json.loads((killed / "results.json").read_text())
    for key in ("best_step", "validation", "test", "history", "best_validation_average"):
        assert resumed[key] == full[key], key
    assert resumed_steps(killed) == [stopped_at] and resumed_steps(tmp_path / "full") == []  # what the runs table says


@pytest.mark.parametrize(
    "override, hint",
    [
        ("method=lora", "method=compute_matched"),
        ("mixture=study_b", "make study-b"),
        ("mixture=zeroshot", "mixture=zeroshot_sp"),
        ("mixture=single", "method=single"),
        ("rank=1", "rank=lang1"),
        ("method=flix,sngle", "did you mean method=single?"),
    ],
)
def test_bad_option_says_where_it_lives_and_lists_the_choices(override, hint):
    """Before Hydra (whose message for rank=1 is a traceback): one message, exit code 2."""
    out = subprocess.run([sys.executable, "-m", "flix.train", "-m", override], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert hint in out.stderr and "choices:" in out.stderr


def test_a_plain_sweep_summarises_fails_when_a_run_failed_and_logs_each_run(tmp_path, data_root):
    env = {**os.environ, "FLIX_RUNS": str(tmp_path), "FLIX_DATA_ROOT": str(data_root)}
    cmd = [
        sys.executable,
        "-m",
        "flix.train",
        "-m",
        "logger=none",
        "mixture=multitask_sw",
        "train.lr=1e40,3e-3",  # the first overflows: a run that fails (a bad setting stops a sweep before it starts)
        "train.max_grad_norm=1e40",
        "scale.steps=2",
        "scale.eval_every=2",
        "scale.eval_examples=2",
        "scale.test_examples=2",
        "train.threads=1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 1
    assert "[flix sweep] 1 run(s) finished now, 1 failed" in out.stderr and "[flix sweep] FAILED" in out.stderr
    (good,) = [p.parent for p in tmp_path.rglob("results.json")]
    log = (good / "train.log").read_text()
    assert "trainable parameters" in log and "validation average" in log and "best step" in log


def test_nan_loss_stops_with_a_clear_message(compose, tmp_path):
    with pytest.raises(RuntimeError, match="last good checkpoint"):
        run(compose("mixture=multitask_sw", "train.lr=1e30", "train.max_grad_norm=1e30", "scale.steps=30"), tmp_path)


@pytest.mark.slow
def test_real_gemma_trains_two_steps_and_generates(gemma, compose, tmp_path):
    """Gemma 3 270M offline: two FLix steps on real data, then generation."""
    from flix.pipeline.trainer import Trainer

    cfg = compose(
        "scale=mini",
        "mixture=multitask_sw",
        "scale.batch_size=2",
        "scale.micro_batch_size=2",
        "scale.max_prompt_tokens=96",
        "scale.max_target_tokens=12",
        "scale.max_context_chars=200",
        "scale.eval_examples=2",
        "scale.steps=2",
    )
    trainer = Trainer.from_config(cfg, load_mixture_for(cfg), tmp_path)
    before = {k: v.clone() for k, v in trainer.model.adapter_state_dict().items()}
    losses = [trainer.train_step(step)[0] for step in range(2)]
    assert all(0 < loss < 20 for loss in losses)
    after = trainer.model.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    result, average, nll = trainer.validate()
    assert set(result.scores) == {"ner", "qa_in_lang"} and 0 <= average <= 100 and 0 < nll < 20
    assert all(isinstance(p, str) for ps in result.predictions.values() for p in ps)


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flix.train"],
    "flix launch": ["-m", "flix", "launch", "--standalone", "--nproc_per_node=2", "-m", "flix.train"],  # torchrun, quiet on failure
    # --multi_gpu is accelerate's torchrun path; without GPUs it runs gloo on the CPU.
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "-m",
        "flix.train",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_data_parallel_equals_one_process(launcher, tmp_path, data_root):
    """2 CPU processes (gloo) give the losses of one process on the same global batch, with
    feature dropout on: each example's mask depends on its global position, not its process."""
    args = [
        "logger=none",
        "mixture=multitask_sw",
        "method=flix",
        "dropout=0.7",
        f"data.root={data_root}",
        "scale.steps=4",
        "scale.eval_every=4",
        "scale.eval_examples=2",
        "scale.test_examples=2",
        "scale.batch_size=8",
        "scale.micro_batch_size=2",
        "train.threads=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "flix.train", *args, f"hydra.run.dir={tmp_path / 'one'}"], check=True, cwd=REPO, env=env, capture_output=True
    )
    launched = subprocess.run(
        [sys.executable, *LAUNCHERS[launcher], *args, f"hydra.run.dir={tmp_path / 'two'}"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stderr.count("trainable parameters") == 2  # both processes built the model
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert len(one["train_loss"]) == 4
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert two["featureless_fraction"] == one["featureless_fraction"] and 0 < sum(one["featureless_fraction"])  # counted over both
    assert two["test"] == one["test"]
    for task, langs in one["test_nll"].items():
        assert two["test_nll"][task] == pytest.approx(langs, rel=1e-5)


UNEVEN = [  # packed rows of at most 520 positions: at steps 5 and 7 one process has 3 micro-batches, the other 4
    "logger=none",
    "scale=cpu",
    "model=tiny",
    "mixture=multilingual_ner",
    "method=flix",
    "scale.steps=8",
    "scale.eval_every=8",
    "scale.checkpoint_every=8",
    "scale.eval_examples=2",
    "scale.test_examples=2",
    "scale.test_nll_examples=2",
    "scale.tokens_per_micro_batch=520",
    "train.threads=1",
]


@pytest.mark.slow
@pytest.mark.needs_mini
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_packed_micro_batches_uneven_over_processes_equal_one_process(parallel, compose, tmp_path, data_root):
    """Packing by a token budget under 2 processes, where the processes' shards pack into
    different numbers of micro-batches: the run completes and equals one process (before,
    FSDP hung at the first such step: its collectives pair up the processes' forwards)."""
    from flix.pipeline.batching import step_batches
    from flix.pipeline.run_config import load_mixture_for
    from flix.pipeline.trainer import Trainer

    cfg = compose(*UNEVEN, fast=False)
    trainers = [Trainer.from_config(cfg, load_mixture_for(cfg), tmp_path / f"r{r}", rank_world=(r, 2)) for r in (0, 1)]
    counts = [
        [len(step_batches(t.sampler.batch(step, r, 2), t.tokenizer, t.limits, False, 8, 520, packed=t.packing)) for step in range(8)]
        for r, t in enumerate(trainers)
    ]
    assert trainers[0].packing and counts[0] != counts[1], counts  # the case this test is for
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*UNEVEN, f"data.root={data_root}"]
    subprocess.run(
        [sys.executable, "-m", "flix.train", *args, f"hydra.run.dir={tmp_path / 'one'}"], check=True, cwd=REPO, env=env, capture_output=True
    )
    launched = subprocess.run(
        [sys.executable, *LAUNCHERS["flix launch"], *args, f"train.parallel={parallel}", f"hydra.run.dir={tmp_path / 'two'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    for task, langs in one["test_nll"].items():
        assert two["test_nll"][task] == pytest.approx(langs, rel=1e-5)


def test_dropout_keys_give_each_example_its_own_mask_however_the_batch_is_split():
    from flix import FLixConfig, get_flix_model
    from flix.base_models import load_model

    config = FLixConfig(features={"task": ["ner", "qa"], "lang": ["sw", "yo"]}, ranks={"task": 2, "lang": 2}, feature_dropout=0.7)
    model = get_flix_model(load_model({"name": "tiny"})[0], config).train()
    ids = config.space.feature_ids([{"task": "ner", "lang": "sw"}, {"task": "qa", "lang": "yo"}] * 8)
    keys = list(range(100, 116))
    whole = model.rows_for(ids, keys)
    torch.manual_seed(123)  # the global RNG plays no part
    split = torch.cat([model.rows_for(ids[:5], keys[:5]), model.rows_for(ids[5:], keys[5:])])
    assert torch.equal(whole, split)
    assert len({tuple(r) for r in whole.tolist()}) > 2  # the masks differ between examples


def test_bf16_autocast_trains_and_generates(compose, tmp_path):
    """train.bf16=true (what `auto` does on a GPU, here on the CPU): the model computes in
    bf16, the adapters stay float32 and learn as the float32 run does, generation runs."""
    from flix.pipeline.trainer import Trainer

    losses, dtypes = {}, {}
    for bf16 in (False, True):
        cfg = compose("mixture=multitask_sw", "dropout=0.0", f"train.bf16={str(bf16).lower()}")
        trainer = Trainer.from_config(cfg, load_mixture_for(cfg), tmp_path / str(bf16))
        seen = dtypes[bf16] = set()
        layer = next(iter(trainer.model.flix_layers().values()))
        layer.register_forward_hook(lambda module, args, out, seen=seen: seen.add(out.dtype))
        torch.manual_seed(0)
        losses[bf16] = [trainer.train_step(step)[0] for step in range(3)]
        result, average, nll = trainer.validate()
        assert set(result.scores) == {"ner", "qa_in_lang"} and 0 <= average <= 100 and nll > 0
        assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    assert dtypes == {False: {torch.float32}, True: {torch.bfloat16}}  # training and generation alike
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
    assert losses[True] != losses[False]  # bf16 really ran


def test_bf16_setting_is_checked(compose, tmp_path):
    with pytest.raises(ValueError, match="train.bf16='yes'"):
        run(compose("mixture=multitask_sw", "train.bf16=yes"), tmp_path)


def test_activation_checkpointing_run(compose, tmp_path):
    results = run(compose("mixture=multitask_sw", "train.gradient_checkpointing=true"), tmp_path)
    check_results(results, tmp_path)


def test_scoped_tracker_keeps_steps_increasing():
    from flix.pipeline.tracking import NullTracker, ScopedTracker

    class Recorder(NullTracker):
        def __init__(self):
            self.logged = []

        def log(self, metrics, step):
            self.logged.append((step, metrics))

    recorder = Recorder()
    for i, name in enumerate(["ner.sw", "qa_in_lang.sw"]):
        ScopedTracker(recorder, name, offset=i * 4).log({"train/loss": 1.0}, step=1)
    assert recorder.logged == [(1, {"ner.sw/train/loss": 1.0}), (5, {"qa_in_lang.sw/train/loss": 1.0})]


def test_results_name_the_code_that_ran(compose, tmp_path):
    """commit is read when flix.pipeline.run is loaded (HEAD can move during a sweep); git_commit
    marks uncommitted changes to tracked files, not untracked files."""
    import flix.record
    from flix.record import git_commit

    results = run(compose("mixture=multitask_sw", "method=compute_matched"), tmp_path / "run")
    assert results["commit"] == flix.record.CODE_COMMIT

    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (repo / "notes.txt").write_text("untracked\n")
    assert git_commit(repo) == head
    (repo / "a.py").write_text("x = 2\n")
    assert git_commit(repo) == head + "+dirty"
    assert git_commit(tmp_path / "run") is None  # not a git checkout


@pytest.mark.parametrize("rank, lang", [("paper", None), ("lang1", 1), ("lang2", 2)])
def test_rank_option_reads_as_typed_in_run_names(compose, rank, lang):
    """rank=lang1 names its runs ...-ranklang1-... (not rank1, which reads as a total rank);
    the report's Table 4 reads the number from rank.lang, as the paper's column does."""
    cfg = compose(f"rank={rank}")
    assert f"-rank{rank}-seed" in cfg.run_name and cfg.rank.lang == lang
