"""One run: train -> validate every N steps -> keep the best adapter -> test -> results.

    python -m flix.train method=flix mixture=study_a scale=smoke logger=none

Everything a table needs lands in the run directory: results.json, tables/*.csv,
predictions/, best_adapter/. Checkpoints under checkpoints/ make a rerun of the same
command in the same directory resume where it stopped, with identical results.
"""
from __future__ import annotations

import json
import math
import pickle
import random
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import hydra
from hydra.types import RunMode
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from flix.adapters import WEIGHTS_NAME, FLixModel, get_flix_model
from flix import distributed
from flix.batching import TextLimits, loss_sum, training_batch
from flix.data.mixtures import EvalSet, Mixture, load_mixture
from flix.data.reader import read_dataset, resolve_root
from flix.data.sampling import MixtureSampler
from flix.evaluate import evaluate
from flix.features import featureless
from flix.metrics import example_stats
from flix.io import atomic_dir, atomic_write_json, atomic_write_text
from flix.methods import method_config
from flix.models import enable_activation_checkpointing, load_model, model_kind
from flix.optim import SparseAdamW, clip_grad_norm_
from flix.tracking import NullTracker, ScopedTracker, make_tracker

CONF = Path(__file__).resolve().parents[1] / "conf"
RESULTS = "results.json"
FAILED = "failed.json"
# Keys that do not change what a run computes: left out of its configuration hash.
# (data.root stays in: a subsample and the full release are different runs.)
UNHASHED = ("hydra", "logger", "force")
UNHASHED_NESTED = (("train", "threads"),)


def config_hash(cfg) -> str:
    """Hash of the resolved configuration that decides a run's results.

    Completed runs are found by it: the run directory name ends with it, so a
    study re-run skips what is done and a changed setting gets a new directory.
    """
    import hashlib

    container = OmegaConf.to_container(cfg, resolve=False)
    for key in UNHASHED:
        container.pop(key, None)
    for section, key in UNHASHED_NESTED:
        container.get(section, {}).pop(key, None)
    resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:10]


# Hydra resolves run directory names with it: ${config_hash:} hashes the whole config.
OmegaConf.register_new_resolver("config_hash", lambda *, _root_: config_hash(_root_), replace=True)


class NonFiniteLoss(RuntimeError):
    pass


# -- data ------------------------------------------------------------------------


def compose(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with the overrides, as `python -m flix.train` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def load_mixture_for(cfg: DictConfig) -> Mixture:
    mixture = load_mixture(cfg.mixture, cfg.data.variant)
    if cfg.scale.max_langs_per_task:
        mixture = mixture.restrict(int(cfg.scale.max_langs_per_task))
    return mixture


def read_split(root: Path, datasets: list[tuple[str, str]], split: str, limit: int | None) -> dict:
    return {(task, lang): read_dataset(root, task, split, lang, limit=limit) for task, lang in datasets}


# -- model -----------------------------------------------------------------------


def build_model(cfg: DictConfig, mixture: Mixture, method: str):
    base, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    config = method_config(
        method,
        mixture.features(),
        mixture.kind,
        alpha=cfg.train.alpha,
        feature_dropout=cfg.dropout,
        dropout_mode=cfg.train.dropout_mode,
        lang_rank=cfg.rank.lang,
        target_modules=OmegaConf.to_container(cfg.model.target_modules) if cfg.model.get("target_modules") else None,
    )
    torch.manual_seed(cfg.seed)  # adapter init
    model = get_flix_model(base, config)
    space = config.space
    print(
        f"[flix] {method}: active rank {space.active_rank}, rank over all features {space.total_rank} "
        f"(shared {config.shared_rank}, groups {config.ranks}), {model.num_trainable_parameters():,} trainable parameters",
        file=sys.stderr,
    )
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model, tokenizer, model_kind(base) == "seq2seq"


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then linear decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))

    return factor


# -- selection and results -----------------------------------------------------------


def set_averages(scores: dict[str, dict[str, float]], eval_sets: list[EvalSet]) -> dict[str, float]:
    """Average over each evaluation set's languages (a table column)."""
    out = {}
    for s in eval_sets:
        values = [scores[s.task][lang] for lang in s.langs if lang in scores.get(s.task, {})]
        if values:
            out[s.name] = float(np.mean(values))
    return out


def selection_metric(scores: dict[str, dict[str, float]], eval_sets: list[EvalSet]) -> float:
    """The paper's model selection: the average over the mixture's supervised sets
    (languages, or tasks); zero-shot sets never pick the checkpoint unless there is nothing else."""
    supervised = [s for s in eval_sets if not s.zero_shot] or eval_sets
    return float(np.mean(list(set_averages(scores, supervised).values())))


def table(scores: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Rows languages, columns tasks."""
    frame = pd.DataFrame(scores)
    frame.index.name = "language"
    return frame.sort_index()


def git_commit(where: Path = Path(__file__).parent) -> str | None:
    """The commit of this code, "+dirty" when tracked files differ from it (None outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=where, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


# Read once, when this code is loaded: a sweep runs many jobs in one process, and HEAD may
# move while it does; results must name the code that made them.
CODE_COMMIT = git_commit()


# -- checkpoints -------------------------------------------------------------------------


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain lists, so checkpoints load with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(path: Path, model: FLixModel, optimizer, scheduler, state: dict) -> None:
    with atomic_dir(path) as tmp:
        torch.save(
            {
                "adapter": model.adapter_state_dict(),
                "seen": model.flix_config.seen,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                **state,
            },
            tmp / "state.pt",
        )


def load_checkpoint(path: Path, model: FLixModel, optimizer, scheduler) -> dict:
    """Resume state from path/state.pt. It loads with weights_only=True: tensors and plain
    containers only, so a crafted file cannot run code."""
    file = path / "state.pt"
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)  # copy_ and the optimizer place tensors
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"{file}: refused to load: it holds more than tensors and plain values (a checkpoint from an older "
            f"flix, or a tampered file); nothing from it was run. Delete {path} to restart the run from step 0. ({err})"
        ) from None
    model.load_adapter_state_dict(ckpt["adapter"], source=str(file))
    model.flix_config.seen.update(ckpt["seen"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    _set_rng_state(ckpt["rng"])
    return ckpt


def is_validation_step(step: int, scale: DictConfig) -> bool:
    """Validation runs every scale.eval_every steps and after the last step."""
    return step % scale.eval_every == 0 or step == scale.steps


def use_bf16(setting, device: torch.device) -> bool:
    """`train.bf16`: auto (on CUDA only), true (on any device, CPU too) or false."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"train.bf16={setting!r}: use auto (bf16 autocast on GPU only), true or false")


# -- the run -----------------------------------------------------------------------------


class Run:
    """Trains one adapter on one mixture into one directory."""

    def __init__(self, cfg: DictConfig, mixture: Mixture, run_dir: Path, method: str):
        self.cfg, self.mixture, self.run_dir, self.method = cfg, mixture, run_dir, method
        self.rank, self.world = distributed.setup()
        self.main = self.rank == 0  # only the main process evaluates and writes
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.bf16 = use_bf16(cfg.train.bf16, self.device)
        self.root = resolve_root(cfg.data.root)
        mixture.check(self.root)
        s = cfg.scale
        self.limits = TextLimits(s.max_prompt_tokens, s.max_target_tokens, s.max_context_chars)
        self.train_data = read_split(self.root, mixture.train_datasets, "train", None)
        self.validation = read_split(self.root, mixture.eval_datasets, "validation", s.eval_examples)
        self.model, self.tokenizer, self.seq2seq = build_model(cfg, mixture, method)
        self.model.to(self.device)
        self.sampler = MixtureSampler(
            self.train_data, s.batch_size, seed=cfg.seed, strategy=cfg.train.sampling, cap=cfg.train.cap, temperature=cfg.train.temperature
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = SparseAdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(s.warmup_steps, s.steps))
        self.ckpt_dir = run_dir / "checkpoints" / "latest"

    def autocast(self):
        """bf16 autocast for training and generation, as `train.bf16` says."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step on the global batch (this process's shard of it); returns
        the loss and the fraction of this process's examples that feature dropout left
        with no adapter at all (they teach nothing this step)."""
        examples = self.sampler.batch(step, self.rank, self.world)
        micro = self.cfg.scale.micro_batch_size
        batches = [training_batch(examples[i : i + micro], self.tokenizer, self.limits, self.seq2seq) for i in range(0, len(examples), micro)]
        total_targets = distributed.sum_scalar(sum(b["num_targets"] for b in batches))
        self.model.train()
        loss_total, bare = 0.0, 0
        for i, batch in zip(range(0, len(examples), micro), batches):
            tensors = {k: v.to(self.device) for k, v in batch.items() if k != "num_targets"}
            with self.model.route([ex.features for ex in examples[i : i + micro]]), self.autocast():
                bare += int(featureless(self.model.router.rows).sum())
                loss = loss_sum(self.model, tensors, self.seq2seq) / total_targets
                loss.backward()
            loss_total += loss.item()
        loss_total = distributed.sum_scalar(loss_total)
        params = self.optimizer.param_groups[0]["params"]
        distributed.sum_gradients(params)
        if not math.isfinite(loss_total):
            raise NonFiniteLoss(
                f"loss is {loss_total} at step {step + 1}; the last good checkpoint is kept at {self.ckpt_dir}. "
                "Lower train.lr, check the data, or use float32 (model.dtype=float32)."
            )
        clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, bare / len(examples)

    def validate(self) -> tuple[dict, dict, float]:
        with self.autocast():
            scores, preds = evaluate(
                self.model, self.tokenizer, self.validation, self.limits, self.cfg.scale.eval_batch_size, self.seq2seq, self.device, desc="validation"
            )
        return scores, preds, selection_metric(scores, self.mixture.eval_sets)

    def fit(self, tracker) -> dict:
        s = self.cfg.scale
        state = {"step": 0, "best_step": None, "best_score": -math.inf, "best_validation": {}, "history": [], "train_loss": [], "featureless_fraction": [], "train_seconds": 0.0}
        if (self.ckpt_dir / "state.pt").exists():
            state.update({k: v for k, v in load_checkpoint(self.ckpt_dir, self.model, self.optimizer, self.scheduler).items() if k in state})
            print(f"[flix] resuming {self.run_dir} from step {state['step']}", file=sys.stderr)
        else:
            torch.manual_seed(self.cfg.seed)
        bar = tqdm(total=s.steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True, disable=not self.main)
        while state["step"] < s.steps:
            started = time.perf_counter()
            loss, bare = self.train_step(state["step"])
            state["train_seconds"] += time.perf_counter() - started
            state["step"] += 1
            step = state["step"]
            state["train_loss"].append(loss)
            state["featureless_fraction"].append(bare)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            tracker.log({"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0], "train/featureless_fraction": bare}, step=step)
            if self.main and is_validation_step(step, s):
                scores, preds, average = self.validate()
                state["history"].append({"step": step, "validation_average": average, "loss": loss})
                tracker.log({"validation/average": average, **{f"validation/{t}/{l}": v for t, ls in scores.items() for l, v in ls.items()}}, step=step)
                if average > state["best_score"]:
                    state.update(best_score=average, best_step=step, best_validation=scores)
                    self.model.save_pretrained(self.run_dir / "best_adapter")
                    self._write_predictions("validation", self.validation, preds)
                bar.write(f"[flix] step {step}: validation average {average:.2f} (best {state['best_score']:.2f} at step {state['best_step']})")
            if self.main and (step % s.checkpoint_every == 0 or step == s.steps):
                save_checkpoint(self.ckpt_dir, self.model, self.optimizer, self.scheduler, state)
        bar.close()
        distributed.barrier()
        return state

    def test(self) -> tuple[dict, dict]:
        """Test scores of the kept adapter and their per-example statistics
        (`flix.metrics.example_stats`, what the report's intervals resample); writes its predictions."""
        self._load_best()
        data = read_split(self.root, self.mixture.eval_datasets, "test", self.cfg.scale.test_examples)
        with self.autocast():
            scores, preds = evaluate(self.model, self.tokenizer, data, self.limits, self.cfg.scale.eval_batch_size, self.seq2seq, self.device, desc="test")
        self._write_predictions("test", data, preds)
        stats: dict[str, dict[str, list]] = {}
        for (task, lang), examples in data.items():
            stats.setdefault(task, {})[lang] = example_stats(task, [ex.target for ex in examples], preds[(task, lang)])
        return scores, stats

    def _load_best(self) -> None:
        from safetensors.torch import load_file

        path = self.run_dir / "best_adapter" / WEIGHTS_NAME
        self.model.load_adapter_state_dict(load_file(str(path)), source=str(path))

    def _write_predictions(self, split: str, data: dict, preds: dict) -> None:
        for (task, lang), examples in data.items():
            lines = [json.dumps({"id": ex.id, "target": ex.target, "prediction": p}, ensure_ascii=False) for ex, p in zip(examples, preds[(task, lang)])]
            atomic_write_text(self.run_dir / "predictions" / split / f"{task}.{lang}.jsonl", "\n".join(lines) + "\n")


def train_one(cfg: DictConfig, mixture: Mixture, run_dir: Path, method: str, tracker) -> dict:
    """Train, select and test one adapter; returns its part of results.json."""
    run = Run(cfg, mixture, run_dir, method)
    state = run.fit(tracker)
    if not run.main:
        return {}
    test, test_stats = run.test()
    return {
        "best_step": state["best_step"],
        "best_validation_average": state["best_score"],
        "validation": state["best_validation"],
        "test": test,
        "test_stats": test_stats,
        "history": state["history"],
        "train_loss": state["train_loss"],
        "featureless_fraction": state["featureless_fraction"],
        "trainable_parameters": run.model.num_trainable_parameters(),
        "flix": run.model.flix_config.to_dict() | {"active_rank": run.model.flix_config.space.active_rank},
        "train_seconds": state["train_seconds"],
    }


def single_mixtures(mixture: Mixture) -> list[Mixture]:
    """One mixture per evaluated training dataset: the single-dataset baselines."""
    evaluated = {(s.task, lang) for s in mixture.eval_sets if not s.zero_shot for lang in s.langs}
    return [
        replace(mixture, name=f"{mixture.name}/{task}.{lang}", kind="multilingual", train={task: [lang]}, eval_sets=[EvalSet(task, task, [lang])])
        for task, lang in mixture.train_datasets
        if (task, lang) in evaluated
    ]


def merge(parts: list[dict]) -> dict:
    """Merge per-dataset results of the single baseline into one results dict."""
    merged = {"validation": {}, "test": {}, "test_stats": {}, "best_step": {}, "history": {}, "train_loss": {}, "featureless_fraction": {}, "trainable_parameters": 0, "train_seconds": 0.0}
    for part in parts:
        for split in ("validation", "test", "test_stats"):
            for task, langs in part[split].items():
                merged[split].setdefault(task, {}).update(langs)
        (task, langs), = part["test"].items()
        key = f"{task}.{next(iter(langs))}"
        merged["best_step"][key] = part["best_step"]
        merged["history"][key] = part["history"]
        merged["train_loss"][key] = part["train_loss"]
        merged["featureless_fraction"][key] = part["featureless_fraction"]
        merged["trainable_parameters"] += part["trainable_parameters"]
        merged["train_seconds"] += part["train_seconds"]
    merged["flix"] = parts[0]["flix"] if parts else {}
    return merged


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole run; returns results (also written to run_dir/results.json)."""
    if cfg.get("force") and run_dir.exists():
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / RESULTS).unlink(missing_ok=True)
    if (run_dir / RESULTS).exists():
        print(f"[flix] {run_dir / RESULTS} exists: run already complete (force=true runs it again)", file=sys.stderr)
        return json.loads((run_dir / RESULTS).read_text())
    (run_dir / FAILED).unlink(missing_ok=True)
    rank, _ = distributed.setup()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    mixture = load_mixture_for(cfg)
    method = cfg.method.name
    name = f"{method}-{mixture.name}-seed{cfg.seed}"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    jobs = [(m, run_dir / "datasets" / m.name.split("/")[-1]) for m in single_mixtures(mixture)] if method == "single" else [(mixture, run_dir)]
    if rank != 0:  # other data-parallel processes only train
        for part, part_dir in jobs:
            train_one(cfg, part, part_dir, method, NullTracker())
        return {}
    tracker = make_tracker(cfg.logger, run_dir, name=name, group=f"{cfg.scale.name}/{mixture.study}", config=resolved, resume_id=_wandb_id(run_dir))
    started = time.time()
    try:
        # The single baseline trains one adapter per dataset into one W&B run: each logs
        # under its dataset's name, its steps following the previous one's.
        parts = [
            train_one(cfg, part, part_dir, method, tracker if len(jobs) == 1 else ScopedTracker(tracker, part_dir.name, i * cfg.scale.steps))
            for i, (part, part_dir) in enumerate(jobs)
        ]
        body = merge(parts) if method == "single" else parts[0]
        results = {
            "method": method,
            "mixture": mixture.name,
            "study": mixture.study,
            "scale": cfg.scale.name,
            "seed": cfg.seed,
            "model": cfg.model.name,
            "data_root": str(resolve_root(cfg.data.root)),
            "variant": cfg.data.variant,
            "eval_sets": _eval_sets(mixture, body),
            **body,
            "time_seconds": time.time() - started,
            "commit": CODE_COMMIT,
            "config_hash": config_hash(cfg),
            "config": resolved,
        }
        for split in ("validation", "test"):
            frame = table(results[split])
            atomic_write_text(run_dir / "tables" / f"{split}.csv", frame.to_csv(float_format="%.2f"))
            tracker.log_table(f"tables/{split}", frame)
        atomic_write_json(run_dir / RESULTS, results)
        tracker.log_artifact(run_dir / RESULTS, name=f"results-{name}".replace("/", "-"), kind="results")
        _summary(results)
        return results
    finally:
        tracker.finish()


def _eval_sets(mixture: Mixture, body: dict) -> dict:
    sets = {}
    for s in mixture.eval_sets:
        entry = {"task": s.task, "langs": list(s.langs), "zero_shot": s.zero_shot}
        for split in ("validation", "test"):
            entry[split] = set_averages(body[split], [s]).get(s.name)
        sets[s.name] = entry
    return sets


def _wandb_id(run_dir: Path) -> str | None:
    """Reuse the W&B run id when resuming, so a resumed run is one W&B run."""
    path = run_dir / "wandb_id"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id)
    return run_id


def _summary(results: dict) -> None:
    sets = ", ".join(f"{k} {v['test']:.1f}" for k, v in results["eval_sets"].items() if v["test"] is not None)
    print(f"[flix] {results['method']} on {results['mixture']} ({results['scale']}): test {sets}; best step {results['best_step']}; {results['time_seconds']:.0f}s")


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = hydra.core.hydra_config.HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        results = run(cfg, run_dir)
    except torch.OutOfMemoryError as err:
        raise RuntimeError(
            f"out of memory: lower scale.micro_batch_size (now {cfg.scale.micro_batch_size}; the effective batch "
            f"stays scale.batch_size), scale.max_prompt_tokens or scale.eval_batch_size, or set train.gradient_checkpointing=true"
        ) from err
    except Exception as err:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        # In a sweep one failed run must not take the others down: record it and go on.
        atomic_write_json(run_dir / FAILED, {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
        print(f"[flix] FAILED {run_dir}: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    score = results.get("best_validation_average")
    return score if isinstance(score, float) else None


if __name__ == "__main__":
    main()
