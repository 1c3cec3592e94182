"""The paper's methods as FLixConfigs: conf/method/NAME.yaml holds each method's ranks,
and `method_config` is the one code path that turns such a config into a FLixConfig.

Every method is FLix: the baselines are FLix with one always-on adapter and no features
(`shared_rank: active` is FLix's active rank, compute-matched; `total` is its rank summed
over every feature, param-matched), and `single` trains a compute-matched one per dataset.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Mapping

from omegaconf import DictConfig, OmegaConf

from flix.config import FLixConfig
from flix.data.mixtures import Mixture
from flix.features import FeatureSpace

METHODS = tuple(sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "method").glob("*.yaml")))


def load_method(name: str) -> dict:
    """conf/method/NAME.yaml as composed by Hydra (defaults applied)."""
    return copy.deepcopy(_load_method(name))


@functools.lru_cache(maxsize=None)
def _load_method(name: str) -> dict:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)} (conf/method/)")
    from flix.pipeline.run_config import compose

    return OmegaConf.to_container(compose([f"method={name}"]).method, resolve=True)


def kind_ranks(kind: str, method: str = "flix") -> dict[str, int]:
    """A method's rank per feature group for a mixture kind (conf/method/METHOD.yaml)."""
    return dict(load_method(method)["ranks"][kind])


def method_config(
    method: str | Mapping,
    features: dict[str, list[str]],
    kind: str,
    *,
    alpha: float = 16.0,
    feature_dropout: float = 0.0,
    dropout_mode: str = "independent",
    lang_rank: int | None = None,
    target_modules: list[str] | str | None = None,
) -> FLixConfig:
    """The FLixConfig of `method` (a conf/method name, or its config) for a mixture of
    `kind` with these training features; `lang_rank` overrides the language rank (Table 4)."""
    spec = load_method(method) if isinstance(method, str) else _plain(method)
    table = spec["ranks"]
    if kind not in table:
        raise ValueError(f"conf/method/{spec['name']}.yaml: ranks has no entry for mixture kind {kind!r} (has {', '.join(table)})")
    ranks = dict(table[kind])
    if lang_rank is not None:
        ranks["lang"] = int(lang_rank)
    ranks = {group: ranks[group] for group in features}
    shared = spec["shared_rank"]
    if shared in ("active", "total"):
        space = FeatureSpace(features, ranks)
        shared = space.active_rank if shared == "active" else space.total_rank
    common = dict(alpha=alpha, target_modules=target_modules, shared_rank=int(shared))
    if not spec["features"]:
        return FLixConfig(**common)
    # sparse bank gradients: flix.pipeline.run's SparseAdamW updates only the rows a batch used
    return FLixConfig(features=features, ranks=ranks, feature_dropout=feature_dropout, dropout_mode=dropout_mode, sparse_grad=True, **common)


def adapter_config(cfg: DictConfig, mixture: Mixture) -> FLixConfig:
    """The FLixConfig of the run's method (conf/method) for this mixture, with the run's
    dropout, alpha and language rank."""
    return method_config(
        cfg.method,
        mixture.features(),
        mixture.kind,
        alpha=cfg.train.alpha,
        feature_dropout=cfg.dropout,
        dropout_mode=cfg.train.dropout_mode,
        lang_rank=cfg.rank.lang,
        target_modules=OmegaConf.to_container(cfg.model.target_modules) if cfg.model.get("target_modules") else None,
    )


def _plain(method: Mapping) -> dict:
    return OmegaConf.to_container(method, resolve=True) if isinstance(method, DictConfig) else dict(method)


def build_model(model: DictConfig, adapter: FLixConfig, method: str, seed: int, gradient_checkpointing: bool):
    """The base model of `model` (conf/model) with `adapter`; (model, tokenizer, seq2seq)."""
    import torch  # here: this module is read by commands that must start without torch

    from flix.base_models import enable_activation_checkpointing, load_model, model_kind
    from flix.model import get_flix_model
    from flix.pipeline.tracking import say

    base, tokenizer = load_model(OmegaConf.to_container(model, resolve=True))
    torch.manual_seed(seed)  # adapter init
    flix_model = get_flix_model(base, adapter)
    space = adapter.space
    say(
        f"[flix] {method}: active rank {space.active_rank}, rank over all features {space.total_rank} "
        f"(shared {adapter.shared_rank}, groups {adapter.ranks}), {flix_model.num_trainable_parameters():,} trainable parameters"
    )
    if gradient_checkpointing:
        enable_activation_checkpointing(flix_model)
    return flix_model, tokenizer, model_kind(base) == "seq2seq"
