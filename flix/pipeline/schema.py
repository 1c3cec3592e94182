"""The run config's types and ranges, declared once: Hydra structured configs (dataclasses
in the ConfigStore) under conf/train.yaml, so a value of the wrong type fails when the
config is composed, naming its key (`scale.steps=abc`), and `range_problems` checks every
declared range before any file is written or any model loads.

The sections whose shape belongs to one option (method, mixture, model, logger) stay
open (`Any`). A field here must exist in every option of its group: the composed config,
and so every run's hash, is exactly what the yaml files say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from flix.data.sampling import STRATEGIES
from flix.record import SELECT_BY

# flix.config.DROPOUT_MODES, repeated so that composing a config loads no torch (a test
# checks the two agree).
DROPOUT_MODES = ("independent", "keep_one")


def at_least(low: int | float, nullable: bool = False, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"at_least": low, "nullable": nullable})


def above(low: float, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"above": low})


def one_of(choices: tuple[str, ...], default: Any = MISSING) -> Any:
    return field(default=default, metadata={"one_of": choices})


@dataclass
class ScaleConfig:
    """conf/scale/*.yaml: the budget of a run."""

    name: str = MISSING
    steps: int = at_least(1)
    batch_size: int = at_least(1)
    micro_batch_size: int = at_least(1)
    warmup_steps: int = at_least(0)
    eval_every: int = at_least(1)
    checkpoint_every: int = at_least(1)
    eval_examples: Optional[int] = at_least(1, nullable=True)  # per validation dataset (null: all)
    test_examples: Optional[int] = at_least(1, nullable=True)  # per test dataset (null: all): greedy outputs
    test_nll_examples: Optional[int] = at_least(1, nullable=True, default=None)  # target NLL on a larger sample (null: test_examples)
    eval_batch_size: int = at_least(1)
    max_langs_per_task: Optional[int] = at_least(1, nullable=True)
    max_prompt_tokens: int = at_least(1)
    max_target_tokens: int = at_least(1)
    max_context_chars: Optional[int] = at_least(1, nullable=True)
    cpu_kernels: bool = False
    # several examples per row, no padding, where exact (causal models: flix.packing)
    packing: bool = False
    # micro-batches by computed positions instead of micro_batch_size rows (null: rows)
    tokens_per_micro_batch: Optional[int] = at_least(1, nullable=True, default=None)
    # which validation keeps the checkpoint (train.select_by follows it): metric (the paper's
    # rule; validations generate) | nll (validations by target NLL alone) | final (the last step)
    select_by: str = one_of(SELECT_BY, default="metric")


@dataclass
class TrainConfig:
    """conf/train.yaml `train`: the optimisation."""

    dropout_mode: str = one_of(DROPOUT_MODES)
    lr: float = above(0.0)
    weight_decay: float = at_least(0.0)
    alpha: float = above(0.0)
    max_grad_norm: float = above(0.0)
    select_by: str = one_of(SELECT_BY)
    sampling: str = one_of(STRATEGIES)
    cap: int = at_least(1)
    temperature: float = above(0.0)
    bf16: Any = "auto"  # auto | true | false (a union OmegaConf cannot type)
    gradient_checkpointing: bool = False
    threads: Optional[int] = at_least(1, nullable=True)
    parallel: str = one_of(("ddp", "fsdp"), default="ddp")  # several processes: replicate (ddp) or shard (fsdp) the base


@dataclass
class RankConfig:
    """conf/rank/*.yaml: the language features' rank (null: the method's ranks)."""

    name: str = MISSING
    lang: Optional[int] = at_least(1, nullable=True, default=None)


@dataclass
class DataConfig:
    """conf/data/*.yaml: where the XTREME-UP files are, and which mixture lists apply."""

    root: Optional[str] = None
    variant: str = one_of(("mini", "official"))


@dataclass
class RunConfig:
    seed: int = field(default=0, metadata={"at_least": 0, "below": 2**32})
    force: bool = False
    wait: bool = False
    study: Optional[str] = None
    table: Optional[str] = None
    dropout: float = field(default=0.7, metadata={"at_least": 0.0, "below": 1.0})  # FLix feature dropout p
    run_name: str = MISSING
    method: Any = None
    mixture: Any = None
    rank: RankConfig = field(default_factory=RankConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    logger: Any = None
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def register() -> None:
    """Put the schema where conf/train.yaml's defaults list finds it (`run_schema`)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def range_problems(cfg: DictConfig, schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Every value outside its declared range, as `key=value: must be ...`."""
    problems = []
    for f in fields(schema):
        value = cfg.get(f.name) if f.name in cfg else None
        sub = _dataclass_type(f)
        if sub is not None and isinstance(value, DictConfig):
            problems += range_problems(value, sub, f"{prefix}{f.name}.")
            continue
        rule = _rule(f.metadata, whole="int" in str(f.type))
        if rule and (value is not None or not f.metadata.get("nullable")) and not _holds(f.metadata, value):
            problems.append(f"{prefix}{f.name}={value!r}: must be {rule}")
    return problems


def _dataclass_type(f) -> type | None:
    default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
    return type(default) if default is not None and is_dataclass(default) else None


def _holds(meta: dict, value: Any) -> bool:
    if "one_of" in meta:
        return value in meta["one_of"]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value >= meta.get("at_least", -math.inf) and value > meta.get("above", -math.inf) and value < meta.get("below", math.inf)


def _rule(meta: dict, whole: bool) -> str:
    if "one_of" in meta:
        return "one of " + ", ".join(meta["one_of"])
    parts = [f">= {meta['at_least']}" if "at_least" in meta else "", f"> {meta['above']}" if "above" in meta else ""]
    parts += [f"< {meta['below']}" if "below" in meta else ""]
    rule = " and ".join(p for p in parts if p)
    return (f"{'an integer' if whole else 'a number'} {rule}" if rule else "") + (" or null" if meta.get("nullable") else "")
