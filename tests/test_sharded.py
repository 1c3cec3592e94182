"""train.parallel=fsdp: the base and the banks sharded over 2 CPU processes (gloo, FSDP2)
compute what one process computes on the same global batch, save the full banks once,
and resume on every process from a sharded run's checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
STEPS = 3  # the checkpoint is taken after step 2
OVERRIDES = [
    "logger=none",
    "mixture=multitask_sw",
    "method=flix",
    "dropout=0.7",  # each example's dropout mask comes from its global position: alike on 1 and 2 processes
    "scale.steps=3",
    "scale.warmup_steps=1",
    "scale.batch_size=8",
    "scale.micro_batch_size=2",
    "scale.eval_examples=2",
    "scale.test_examples=2",
    "train.threads=1",
    "train.lr=0.01",  # big enough that every step moves the banks visibly
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(data_root: str, out: Path, parallel: str, rank_world: tuple[int, int]):
    from flix.pipeline.run_config import compose, load_mixture_for
    from flix.pipeline.trainer import Trainer

    cfg = compose([f"data.root={data_root}", *OVERRIDES, f"train.parallel={parallel}"])
    trainer = Trainer.from_config(cfg, load_mixture_for(cfg), out, rank_world)
    # Adam's eps 1e-8 turns a gradient near zero into an update of lr * g / (|g| + eps): float
    # noise in g (other summation orders on 1 and 2 processes) then moves the bank by up to
    # lr. Seen on the mini data: one element's step-2 gradient -2.2e-8 (its row's mean 2.5e-4)
    # gave banks 2.2e-5 apart. With eps 1e-4 an update moves at most lr / eps = 100 times the
    # gradient's noise, and every step still moves the banks visibly.
    trainer.optimizer.param_groups[0]["eps"] = 1e-4
    return trainer


def _run(trainer, out: Path, resume: Path | None) -> dict:
    """Steps 1-2, a checkpoint, step 3 (or: resume from `resume`, step 3); the banks after each."""
    from flix.pipeline import sharding
    from flix.pipeline import trainer as trainer_module

    result = {"loss": [], "banks": [], "grad_norm": [], "featureless": [], "masks": {}}
    originals = {m: m.clip_grad_norm_ for m in (trainer_module, sharding)}
    for module, original in originals.items():  # record the global gradient norm before clipping (sums, not means)
        module.clip_grad_norm_ = lambda params, max_norm, original=original: result["grad_norm"].append(float(original(params, max_norm))) or 0
    rows_for = trainer.model.rows_for

    def recording_rows_for(ids, dropout_keys=None):  # each training example's dropout mask, by its key
        rows = rows_for(ids, dropout_keys)
        for key, row in zip(dropout_keys or [], rows):
            result["masks"][key] = row.clone()
        return rows

    trainer.model.rows_for = recording_rows_for
    try:
        return _steps(trainer, out, resume, result)
    finally:
        for module, original in originals.items():
            module.clip_grad_norm_ = original
        del trainer.model.rows_for


def _steps(trainer, out: Path, resume: Path | None, result: dict) -> dict:
    from flix.pipeline.checkpoint import load_checkpoint, save_checkpoint

    banks = lambda: {k: v.clone() for k, v in trainer.model.adapter_state_dict().items()}  # noqa: E731  (unsharded: views of the banks)
    if resume is None:
        for step in range(2):
            loss, featureless = trainer.train_step(step)
            result["loss"].append(loss)
            result["featureless"].append(featureless)
        result["banks"].append(banks())
        save_checkpoint(out / "ckpt", trainer.model, trainer.optimizer, trainer.scheduler, {"step": 2}, trainer.banks)
    else:
        assert load_checkpoint(resume, trainer.model, trainer.optimizer, trainer.scheduler, trainer.banks)["step"] == 2
        result["banks"].append(banks())
    loss, featureless = trainer.train_step(2)
    result["loss"].append(loss)
    result["featureless"].append(featureless)
    result["banks"].append(banks())
    trainer.model.save_pretrained(out / "adapter")
    return result


def _worker(rank: int, world: int, port: int, data_root: str, out: str, resume: str | None) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = _trainer(data_root, Path(out), "fsdp", (rank, world))
        assert trainer.sharded and all(type(p).__name__ == "DTensor" for p, _ in trainer.banks)
        held = sum(local.numel() for _, local in trainer.banks)
        result = _run(trainer, Path(out), Path(resume) if resume else None)
        result["held"], result["total"] = held, sum(p.numel() for p, _ in trainer.banks)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(data_root, out: Path, resume: Path | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(2, _free_port(), str(data_root), str(out), str(resume) if resume else None), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _assert_banks(got: dict, want: dict, atol: float) -> None:
    assert set(got) == set(want) and got
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=atol, msg=key)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def one(base, data_root):
    """One process, unsharded (the default path, world 1)."""
    torch.set_num_threads(1)
    return _run(_trainer(str(data_root), base / "one", "ddp", (0, 1)), base / "one", None)


@pytest.fixture(scope="module")
def two(base, data_root):
    """2 processes, train.parallel=fsdp."""
    return _spawn(data_root, base / "two")


@pytest.mark.slow
def test_fsdp_equals_one_process(one, two):
    for rank in two:  # every process reports the global loss and gathers the full banks
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert rank["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)  # gradients summed over processes, not averaged
        for got, want in zip(rank["banks"], one["banks"]):
            _assert_banks(got, want, atol=1e-5)
    # feature dropout (0.7) drew every example's mask from its global position: each process drew
    # its half of the batch's masks, together exactly the one process's, and counted the
    # featureless examples of the whole batch
    masks = {**two[0]["masks"], **two[1]["masks"]}
    assert len(two[0]["masks"]) == len(two[1]["masks"]) == len(one["masks"]) // 2 and not set(two[0]["masks"]) & set(two[1]["masks"])
    assert masks.keys() == one["masks"].keys() and all(torch.equal(masks[k], m) for k, m in one["masks"].items())
    assert len({tuple(m.tolist()) for m in one["masks"].values()}) > 1  # dropout is on: the masks differ
    assert all(r["featureless"] == one["featureless"] for r in two) and 0 < sum(one["featureless"])
    moved = [k for k, v in one["banks"][1].items() if not torch.equal(v, one["banks"][0][k])]
    assert moved  # step 3 changed the banks: the comparison is not of untouched weights
    # each process holds about half of every bank (rows split like torch.chunk)
    assert all(0.4 * r["total"] <= r["held"] <= 0.6 * r["total"] for r in two)
    assert two[0]["held"] + two[1]["held"] == two[0]["total"]


@pytest.mark.slow
def test_fsdp_saves_the_full_adapter_once(base, one, two):
    _assert_banks(load_file(str(base / "two" / "adapter" / "flix_adapter.safetensors")), one["banks"][1], atol=1e-5)
    config = lambda d: {k: v for k, v in json.loads((d / "adapter" / "flix_config.json").read_text()).items()}  # noqa: E731
    assert config(base / "two") == config(base / "one")
    saved = torch.load(base / "two" / "ckpt" / "state.pt", weights_only=True)
    _assert_banks(saved["adapter"], one["banks"][0], atol=1e-5)  # full banks, not one process's rows
    # the optimizer state is the one-process layout: a moment row for every bank row trained so far
    reference = torch.load(base / "one" / "ckpt" / "state.pt", weights_only=True)["optimizer"]["state"]
    for index, state in saved["optimizer"]["state"].items():
        assert state["slot"].shape == reference[index]["slot"].shape
        assert torch.equal(state["slot"] >= 0, reference[index]["slot"] >= 0)
        assert state["step"] == reference[index]["step"] == 2


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_two_processes(base, two, data_root):
    resumed = _spawn(data_root, base / "resumed", resume=base / "two" / "ckpt")
    for rank in resumed:
        _assert_banks(rank["banks"][0], two[0]["banks"][0], atol=0)  # restored exactly, re-sharded on every process
        assert rank["loss"] == pytest.approx(two[0]["loss"][2:], rel=1e-5)
        _assert_banks(rank["banks"][1], two[0]["banks"][1], atol=1e-6)  # and the next step (optimizer moments) matches too


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process(base, one, two, data_root):
    """The checkpoint does not depend on the number of processes."""
    trainer = _trainer(str(data_root), base / "single", "ddp", (0, 1))
    result = _run(trainer, base / "single", resume=base / "two" / "ckpt")
    _assert_banks(result["banks"][1], one["banks"][1], atol=1e-5)


def _pipeline_args(data_root) -> list[str]:
    from conftest import FAST

    return [*FAST, "model=tiny", "scale=smoke", "mixture=multitask_sw", "dropout=0.7", f"data.root={data_root}"]


@pytest.fixture(scope="module")
def one_process_run(base, data_root):
    """`python -m flix.train` of the pipeline test's settings in one process."""
    run_dir = base / "pipeline_one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "flix.train", *_pipeline_args(data_root), f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_fsdp_pipeline_run_completes(launcher, tmp_path, data_root, one_process_run):
    """`torchrun --nproc_per_node 2 -m flix.train ... train.parallel=fsdp` (and accelerate launch):
    the recipe runs end to end (validation, best adapter, test on every process; results written once)
    and, with feature dropout on (0.7), its results.json is the one-process run's: losses, featureless
    fractions, validation and test NLL to 1e-5 (issue 38)."""
    from test_train import LAUNCHERS  # the README's two launchers, as the ddp test runs them

    args = [*_pipeline_args(data_root), "train.parallel=fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *LAUNCHERS[launcher], *args, f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("trainable parameters") == 2  # both processes built the model
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["train"]["parallel"] == "fsdp" and len(results["train_loss"]) == 4
    assert all(0 < loss < 20 for loss in results["train_loss"])
    one = one_process_run
    assert results["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5, abs=1e-5)
    assert results["featureless_fraction"] == one["featureless_fraction"] and 0 < sum(one["featureless_fraction"])
    assert results["best_step"] == one["best_step"] and results["test"] == one["test"]
    assert results["best_validation_nll"] == pytest.approx(one["best_validation_nll"], rel=1e-5)
    for split in ("test_nll", "validation_nll"):
        assert results[split].keys() == one[split].keys()
        for task, langs in one[split].items():
            assert results[split][task] == pytest.approx(langs, rel=1e-5, abs=1e-5), (split, task)
    assert [h["validation_nll"] for h in results["history"]] == pytest.approx([h["validation_nll"] for h in one["history"]], rel=1e-5)
    banks = load_file(str(tmp_path / "best_adapter" / "flix_adapter.safetensors"))
    assert banks and all(v.shape[0] > 2 for v in banks.values())  # full banks, not a shard
    state = torch.load(tmp_path / "checkpoints" / "latest" / "state.pt", weights_only=True)
    assert state["step"] == 4 and set(state["adapter"]) == set(banks)
    if results["best_step"] == 4:  # the kept adapter is the last step's: the same full banks
        assert all(torch.equal(v, state["adapter"][k]) for k, v in banks.items())


def test_fsdp_refuses_a_quantized_base():
    """bitsandbytes' packed weights are not FSDP2 parameters: refused before any sharding."""
    from flix import FLixConfig, get_flix_model
    from flix.base_models import load_model
    from flix.pipeline import sharding

    base, _ = load_model({"name": "tiny", "kind": "causal", "dtype": "float32", "seed": 0})
    model = get_flix_model(base, FLixConfig(features={"task": ["a"]}, ranks={"task": 2}))
    next(iter(model.flix_layers().values())).quantized = True  # as FLixLayer marks a bitsandbytes base layer
    with pytest.raises(ValueError, match="quantized"):
        sharding.shard(model)
