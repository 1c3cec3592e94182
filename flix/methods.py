"""The paper's methods, each a FLixConfig built from the mixture's features.

Ranks follow the paper (§4): every dataset has a task and a language feature and
an example's active rank is 6. Multitask mixtures (one language) give the task 2
and the language 4; multilingual and joint mixtures give the task 4 and the
language 2. The baselines are FLix with one always-on feature:
compute_matched's rank is FLix's active rank, param_matched's is FLix's rank
summed over all features (equal trainable parameters), and `single` trains a
compute-matched adapter on one dataset.
"""
from __future__ import annotations

from flix.adapters import FLixConfig
from flix.data.mixtures import feature_ranks
from flix.features import FeatureSpace

METHODS = ("flix", "compute_matched", "param_matched", "flix_shared", "single")
# Table 5 (Appendix A): an always-on feature of rank 4 plus task 1 and language 1.
SHARED_SPLIT = {"shared": 4, "task": 1, "lang": 1}


def flix_ranks(kind: str, lang_rank: int | None = None) -> dict[str, int]:
    """Task and language ranks for a mixture kind; `lang_rank` overrides (Table 4)."""
    ranks = feature_ranks(kind)
    if lang_rank is not None:
        ranks["lang"] = int(lang_rank)
    return ranks


def method_config(
    method: str,
    features: dict[str, list[str]],
    kind: str,
    *,
    alpha: float = 16.0,
    feature_dropout: float = 0.0,
    dropout_mode: str = "independent",
    lang_rank: int | None = None,
    target_modules: list[str] | str | None = None,
) -> FLixConfig:
    """The FLixConfig of `method` for a mixture with these training features."""
    ranks = flix_ranks(kind, lang_rank)
    ranks = {group: ranks.get(group, ranks["lang"]) for group in features}
    flix_space = FeatureSpace(features, ranks)
    common = dict(alpha=alpha, target_modules=target_modules)
    if method == "flix":
        return FLixConfig(features=features, ranks=ranks, feature_dropout=feature_dropout, dropout_mode=dropout_mode, **common)
    if method in ("compute_matched", "single"):
        return FLixConfig(shared_rank=flix_space.active_rank, **common)
    if method == "param_matched":
        return FLixConfig(shared_rank=flix_space.total_rank, **common)
    if method == "flix_shared":
        split = {group: SHARED_SPLIT.get(group, 1) for group in features}
        return FLixConfig(
            features=features, ranks=split, shared_rank=SHARED_SPLIT["shared"], feature_dropout=feature_dropout,
            dropout_mode=dropout_mode, **common
        )
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
