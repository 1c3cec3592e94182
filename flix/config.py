"""FLixConfig: everything that defines a FLix adapter (what `get_flix_model` builds and
`save_pretrained` writes as flix_config.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flix.features import FeatureSpace

CONFIG_NAME = "flix_config.json"
DROPOUT_MODES = ("independent", "keep_one")


@dataclass
class FLixConfig:
    """Everything that defines a FLix adapter (README.md, "FLix in your own code"; its place
    among the parts: docs/ARCHITECTURE.md).

    features:        group -> feature values seen in the training mixture.
    ranks:           group -> rank of each of its features.
    shared_rank:     rank of an always-on feature (compute/param-matched LoRA, Table 5).
    target_modules:  module-name suffixes (list) or one regex (str); None = the
                     model family's attention and MLP projections.
    alpha:           LoRA alpha; every example's update is scaled by alpha / active_rank.
    feature_dropout: training-time probability of turning off each active feature,
                     independently per feature and example (`FeatureSpace.route`).
    dropout_mode:    "independent" (the paper's reading; with two groups and p = 0.7, 49%
                     of examples keep no feature) or "keep_one" (an example that would
                     lose every feature keeps one, chosen at random).
    sparse_grad:     sparse bank gradients, over the rows a batch used; they need a
                     sparse-aware optimizer such as flix.optim.SparseAdamW (flix.pipeline.run uses
                     it). Off by default: dense gradients work with any torch optimizer
                     and with transformers.Trainer. A training choice, not saved.
    """

    features: dict[str, list[str]] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    shared_rank: int = 0
    target_modules: list[str] | str | None = None
    alpha: float = 16.0
    feature_dropout: float = 0.0
    dropout_mode: str = "independent"
    sparse_grad: bool = False

    def __post_init__(self):
        ranks = [self.shared_rank, *self.ranks.values()]
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise ValueError(f"ranks and shared_rank must be whole numbers, got ranks={self.ranks}, shared_rank={self.shared_rank!r}")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {self.feature_dropout}")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {', '.join(DROPOUT_MODES)}, got {self.dropout_mode!r}")
        self.space = FeatureSpace(self.features, self.ranks, self.shared_rank)

    @property
    def scaling(self) -> float:
        return self.alpha / self.space.active_rank

    def to_dict(self) -> dict:
        out = asdict(self)  # fields only: the derived `space` is rebuilt on load
        out.pop("sparse_grad")  # how it trains, not what the adapter is
        return out

    @classmethod
    def from_dict(cls, d: dict) -> FLixConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
