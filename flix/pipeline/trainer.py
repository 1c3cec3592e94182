"""The trainer: one adapter on one mixture, trained with validation every N steps,
the best checkpoint kept (by the mixture's supervised average) and scored on test.

`Trainer.fit` resumes from run_dir/checkpoints/latest when it exists; `flix.pipeline.run`
wraps it into a run (results.json, W&B, the `single` fan-out).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from flix import kernels
from flix.attention import use_segment_attention
from flix.config import FLixConfig
from flix.data.mixtures import Mixture
from flix.data.reader import resolve_root
from flix.data.sampling import MixtureSampler, eval_sample, read_split
from flix.features import dropout_key, featureless
from flix.fused import use_fused_ops
from flix.io import atomic_write_text
from flix.metrics import example_stats
from flix.model import WEIGHTS_NAME
from flix.optim import SparseAdamW, clip_grad_norm_, lr_lambda
from flix.pipeline import distributed, sharding
from flix.pipeline.batching import TextLimits, loss_sum, packing_holds, padding_fraction, real_positions, step_batches
from flix.pipeline.checkpoint import STATE, load_checkpoint, save_checkpoint
from flix.pipeline.evaluate import Evaluation, evaluate
from flix.pipeline.methods import adapter_config, build_model
from flix.pipeline.schema import ScaleConfig, TrainConfig
from flix.pipeline.tracking import log, say
from flix.record import example_entries, selection_key, selection_metric


class NonFiniteLoss(RuntimeError):
    pass


def is_validation_step(step: int, scale: ScaleConfig) -> bool:
    """Validation runs every scale.eval_every steps and after the last step."""
    return step % scale.eval_every == 0 or step == scale.steps


def use_bf16(setting, device: torch.device) -> bool:
    """`train.bf16`: auto (on CUDA only), true (on any device, CPU too) or false."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"train.bf16={setting!r}: use auto (bf16 autocast on GPU only), true or false")


class Trainer:
    """Trains one adapter on one mixture into one directory."""

    def __init__(
        self,
        mixture: Mixture,
        run_dir: Path,
        *,
        scale: ScaleConfig,
        train: TrainConfig,
        seed: int,
        model: DictConfig,
        adapter: FLixConfig,
        method: str,
        root: Path,
        rank_world: tuple[int, int],
    ):
        """Each part of the run config it uses (`from_config` hands them out): the budget
        (`scale`), the optimisation (`train`), the seed, the base model's section
        (conf/model), the adapter and its method's name; `root`: the data root, resolved
        and checked against the mixture (flix.pipeline.checks.check_run); `rank_world`:
        (rank, world size) from distributed.setup()."""
        self.mixture, self.run_dir, self.scale, self.train, self.seed, self.root = mixture, run_dir, scale, train, seed, root
        self.process_rank, self.world_size = rank_world
        self.main = self.process_rank == 0  # only the main process writes (and, unsharded, evaluates)
        # fsdp: the model is split over the processes (flix.pipeline.sharding), so all of them run every forward
        self.sharded = train.parallel == "fsdp" and self.world_size > 1
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.bf16 = use_bf16(train.bf16, self.device)
        kernels.use(scale.cpu_kernels)  # opt-in: scale=cpu turns them on
        s = scale
        self.limits = TextLimits(s.max_prompt_tokens, s.max_target_tokens, s.max_context_chars)
        self.train_data = read_split(root, mixture.train_datasets, "train", None)
        self.validation = read_split(root, mixture.validation_datasets, "validation", s.eval_examples)
        self.model, self.tokenizer, self.seq2seq = build_model(model, adapter, method, seed, train.gradient_checkpointing)
        # fsdp: fully_shard moves each unit's shards (never the whole base) to the device
        self.banks = sharding.shard(self.model) if self.sharded else None  # (sharded bank, its local rows)
        if not self.sharded:
            self.model.to(self.device)
        self.sampler = MixtureSampler(self.train_data, s.batch_size, seed=seed, strategy=train.sampling, cap=train.cap, temperature=train.temperature)
        params = [local for _, local in self.banks] if self.sharded else [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = SparseAdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(s.warmup_steps, s.steps))
        self.ckpt_dir = run_dir / "checkpoints" / "latest"
        self.sort_micro_batches = True  # micro-batches of length-sorted examples (flix.pipeline.batching.micro_batches)
        self.packing = s.packing and packing_holds(self.model, self.seq2seq)
        if self.packing:
            use_segment_attention(self.model)  # each packed example's attention on its own (flix.attention)
        if kernels.wanted() and not self.sharded:  # (sharded weights are DTensors, not the kernels' plain tensors)
            use_fused_ops(self.model)  # the frozen RMSNorms and MLP activations in one kernel pass each way (flix.fused)

    @classmethod
    def from_config(
        cls, cfg: DictConfig, mixture: Mixture, run_dir: Path, rank_world: tuple[int, int] | None = None, root: Path | None = None
    ) -> Trainer:
        """A trainer for the run config `cfg`, given each section it uses; `root` (from
        check_run) skips resolving and checking the data root again."""
        if root is None:
            root = resolve_root(cfg.data.root)
            mixture.check(root)
        return cls(
            mixture,
            run_dir,
            scale=cfg.scale,
            train=cfg.train,
            seed=cfg.seed,
            model=cfg.model,
            adapter=adapter_config(cfg, mixture),
            method=cfg.method.name,
            root=root,
            rank_world=rank_world or distributed.setup(),
        )

    def autocast(self):
        """bf16 autocast for training and generation, as `train.bf16` says."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step on the global batch (this process's shard of it); returns
        the loss and the fraction of this process's examples that feature dropout left
        with no adapter at all (they teach nothing this step)."""
        examples = self.sampler.batch(step, self.process_rank, self.world_size)
        first = self.process_rank * len(examples)  # this shard's first position in the global batch
        s = self.scale
        # the sampler's order unsorted (flix bench run times both); packed where self.packing holds
        args = (self.tokenizer, self.limits, self.seq2seq, s.micro_batch_size, s.tokens_per_micro_batch)
        parts = step_batches(examples, *args, packed=self.packing and self.sort_micro_batches, sort=self.sort_micro_batches)
        batches = [batch for _, batch in parts]
        self.last_tokens = sum(real_positions(b) for b in batches)  # flix bench run reports these
        self.last_padding = padding_fraction(batches)
        total_targets = distributed.sum_scalar(sum(b["num_targets"] for b in batches))
        weights = [1.0] * len(parts)
        if self.sharded:  # FSDP pairs every process's forwards: by a token budget one may have fewer, so it repeats its last at weight 0
            extra = int(distributed.sum_scalar(len(parts), op="max")) - len(parts)
            parts, weights = parts + parts[-1:] * extra, weights + [0.0] * extra
        self.model.train()
        loss_total, bare, used = 0.0, 0, []
        for (part, batch), weight in zip(parts, weights):
            tensors = {k: v.to(self.device) for k, v in batch.items() if k not in ("num_targets", "token_examples")}
            # each example's dropout mask from (seed, step, its global position): the same on any number of processes
            keys = [dropout_key(self.seed, step, first + i) for i in part]
            route = self.model.route([examples[i].features for i in part], dropout_keys=keys, token_examples=batch.get("token_examples"))
            with route, self.autocast():
                if weight:  # (a repeated part at weight 0 is no example's)
                    bare += int(featureless(self.model.router.rows).sum())
                    used.append(self.model.router.rows)
                loss = loss_sum(self.model, tensors, self.seq2seq) * weight / total_targets
                loss.backward()
            loss_total += loss.item()
        loss_total = distributed.sum_scalar(loss_total)
        bare = distributed.sum_scalar(float(bare))
        params = self.optimizer.param_groups[0]["params"]
        if self.sharded:  # FSDP2 summed the gradients into each process's rows
            sharding.sparse_local_grads(self.banks, torch.cat([r.flatten() for r in used]))
        else:
            distributed.sum_gradients(params)
        if not math.isfinite(loss_total):
            raise NonFiniteLoss(
                f"loss is {loss_total} at step {step + 1}; the last good checkpoint is kept at {self.ckpt_dir}. "
                "Lower train.lr, check the data, or use float32 (model.dtype=float32)."
            )
        (sharding.clip_grad_norm_ if self.sharded else clip_grad_norm_)(params, self.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, bare / (len(examples) * self.world_size)

    def validate(self) -> tuple[Evaluation, float | None, float]:
        """The validation sets' target NLL and (when selection reads it) the paper's metric,
        and their averages over the mixture's selection sets (None: no metric, no generation)."""
        generate = None if self.train.select_by == "metric" else {}  # selection by NLL or at the last step: no generation
        args = (self.model, self.tokenizer, self.validation, self.limits, self.scale.eval_batch_size, self.seq2seq, self.device)
        with self.autocast():
            result = evaluate(*args, desc="validation", generate=generate, packed=self.packing)
        sets = self.mixture.selection_sets
        average = selection_metric(result.scores, sets) if result.scores else None
        return result, average, selection_metric(result.nll, sets)

    def fit(self, tracker) -> dict:
        s = self.scale
        state = {
            "step": 0,
            "best_step": None,
            "best_score": None,  # the kept checkpoint's average validation metric (None: not generated)
            "best_nll": math.inf,  # and its average validation target NLL
            "best_validation": {},
            "best_validation_nll": {},
            "history": [],
            "train_loss": [],
            "featureless_fraction": [],
            "train_seconds": 0.0,
        }
        if (self.ckpt_dir / STATE).exists():
            state.update(
                {k: v for k, v in load_checkpoint(self.ckpt_dir, self.model, self.optimizer, self.scheduler, self.banks).items() if k in state}
            )
            say(f"[flix] resuming {self.run_dir} from step {state['step']}")
        else:
            torch.manual_seed(self.seed)
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
            if (self.main or self.sharded) and is_validation_step(step, s):
                result, average, nll = self.validate()
                state["history"].append({"step": step, "validation_average": average, "validation_nll": nll, "loss": loss})
                tracker.log(
                    {
                        **({} if average is None else {"validation/average": average}),
                        "validation/nll": nll,
                        **{f"validation/{task}/{lang}": v for task, langs in result.scores.items() for lang, v in langs.items()},
                        **{f"validation_nll/{task}/{lang}": v for task, langs in result.nll.items() for lang, v in langs.items()},
                    },
                    step=step,
                )
                if state["best_step"] is None or selection_key(average, nll, step, self.train.select_by) > selection_key(
                    state["best_score"], state["best_nll"], state["best_step"], self.train.select_by
                ):
                    state.update(best_score=average, best_nll=nll, best_step=step, best_validation=result.scores, best_validation_nll=result.nll)
                    self.model.save_pretrained(self.run_dir / "best_adapter")  # sharded: every process gathers, the main one writes
                    self._write_predictions("validation", self.validation, result)
                metric = "" if average is None else f"validation average {average:.2f}, "
                kept = "" if state["best_score"] is None else f"{state['best_score']:.2f}, "
                message = f"[flix] step {step}: {metric}target NLL {nll:.3f} (kept: step {state['best_step']}, {kept}NLL {state['best_nll']:.3f})"
                if self.main:
                    bar.write(message)
                    log.info(message)
            if (self.main or self.sharded) and (step % s.checkpoint_every == 0 or step == s.steps):
                save_checkpoint(self.ckpt_dir, self.model, self.optimizer, self.scheduler, state, self.banks)
        bar.close()
        distributed.barrier()
        return state

    def test(self) -> tuple[Evaluation, dict]:
        """Both metrics of the kept adapter on test, and each test example's id and
        statistics (`flix.metrics.example_stats`: what the report's intervals resample);
        writes its predictions."""
        self._load_best()
        s = self.scale
        data = read_split(self.root, self.mixture.eval_datasets, "test", s.test_nll_examples or s.test_examples)
        # greedy outputs on a fixed sample of that sample (all of it when test_nll_examples is null)
        prompted = {(task, lang): eval_sample(examples, s.test_examples, task, "test", lang) for (task, lang), examples in data.items()}
        args = (self.model, self.tokenizer, data, self.limits, s.eval_batch_size, self.seq2seq, self.device)
        with self.autocast():
            result = evaluate(*args, desc="test", generate=prompted, packed=self.packing)  # target NLL packed where training packs
        self._write_predictions("test", data, result, prompted)
        stats: dict[str, dict[str, list]] = {}
        ids: dict[str, dict[str, list[str]]] = {}
        nll_ids: dict[str, dict[str, list[str]]] = {}
        for (task, lang), examples in prompted.items():
            stats.setdefault(task, {})[lang] = example_stats(task, [ex.target for ex in examples], result.predictions[(task, lang)])
            ids.setdefault(task, {})[lang] = [ex.id for ex in examples]
            nll_ids.setdefault(task, {})[lang] = [ex.id for ex in data[(task, lang)]]
        return result, example_entries(stats=stats, nll=result.example_nll, ids=ids, nll_ids=nll_ids)

    def _load_best(self) -> None:
        from safetensors.torch import load_file

        path = self.run_dir / "best_adapter" / WEIGHTS_NAME
        self.model.load_adapter_state_dict(load_file(str(path)), source=str(path))

    def _write_predictions(self, split: str, data: dict, result: Evaluation, prompted: dict | None = None) -> None:
        """predictions/<split>/<task>.<lang>.jsonl: every scored example's target NLL, and its
        greedy output where one was generated (`prompted`; else null)."""
        if not self.main:
            return
        for (task, lang), examples in data.items():
            outputs = dict(zip((ex.id for ex in (prompted or data)[(task, lang)]), result.predictions.get((task, lang), [])))
            rows = zip(examples, result.example_nll[task][lang])
            lines = [
                json.dumps({"id": ex.id, "target": ex.target, "prediction": outputs.get(ex.id), "nll": nll}, ensure_ascii=False) for ex, nll in rows
            ]
            atomic_write_text(self.run_dir / "predictions" / split / f"{task}.{lang}.jsonl", "\n".join(lines) + "\n")
