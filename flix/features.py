"""The feature space: which features exist, their ranks, and how examples route.

Every layer's adapter bank is one table of rows: row 0 is a zero padding row that
never trains, then the always-on shared feature's rows, then each group's features,
each owning `rank` consecutive rows. An example's route is a fixed-width row of
indices into that table: the shared rows, then for every group the rows of its
active feature, padded with 0 up to the group's widest rank. A dropped or unknown
feature simply points at the padding row, so every example costs the same compute
whatever the number of features.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

PAD = 0  # index of the zero row in every bank


@dataclass
class FeatureSpace:
    """Feature groups with their vocabularies and ranks.

    features:    group -> feature values, e.g. {"task": ["ner", "qa_in_lang"], "lang": [...]}.
    ranks:       group -> rank of each feature of that group.
    shared_rank: rank of one always-on feature (plain LoRA when there are no groups).
    """

    features: dict[str, list[str]] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    shared_rank: int = 0

    def __post_init__(self):
        self.features = {g: list(dict.fromkeys(map(str, v))) for g, v in self.features.items()}
        for group in self.features:
            if group not in self.ranks:
                raise ValueError(f"feature group {group!r} has no rank: add ranks[{group!r}]")
        if self.shared_rank < 0 or any(r < 0 for r in self.ranks.values()):
            raise ValueError("ranks must be >= 0")
        if self.active_rank == 0:
            raise ValueError("the feature space has no rank at all: set ranks or shared_rank")
        self._build_tables()

    @property
    def active_rank(self) -> int:
        """Rank of one example's update when all its features are on (the paper's 6)."""
        return self.shared_rank + sum(self.ranks[g] for g in self.features)

    @property
    def total_rank(self) -> int:
        """Rank summed over every feature: the param-matched LoRA rank."""
        return self.shared_rank + sum(self.ranks[g] * len(fs) for g, fs in self.features.items())

    @property
    def num_rows(self) -> int:
        return 1 + self.total_rank

    def _build_tables(self) -> None:
        # Per group, a (num_features + 1, width) table of bank rows; the last row is
        # "no feature" (all padding) for dropped or unknown features.
        offset = 1 + self.shared_rank
        self._index: dict[str, dict[str, int]] = {}
        self._tables: dict[str, torch.Tensor] = {}
        for group, values in self.features.items():
            r = self.ranks[group]
            table = torch.full((len(values) + 1, r), PAD, dtype=torch.long)
            for i in range(len(values)):
                table[i] = torch.arange(offset, offset + r)
                offset += r
            self._index[group] = {v: i for i, v in enumerate(values)}
            self._tables[group] = table
        self._shared = torch.arange(1, 1 + self.shared_rank, dtype=torch.long)

    def rows_of(self, group: str, feature: str) -> list[int]:
        """Bank rows owned by one feature."""
        row = self._tables[group][self._index[group][feature]]
        return row[row != PAD].tolist()

    @property
    def groups(self) -> list[str]:
        return list(self._tables)

    def feature_ids(self, examples: list[dict]) -> torch.Tensor:
        """(batch, groups) feature ids, a column per group in group order: routing as a
        tensor (what FLixDataCollator puts in a batch as `flix_features`). An unknown or
        absent feature gets its group's 'no feature' id, so an unseen language routes
        with the task alone."""
        rows = [[index.get(str(ex.get(group)), len(index)) for group, index in self._index.items()] for ex in examples]
        return torch.tensor(rows, dtype=torch.long).reshape(len(examples), len(self._index))

    def combinations(self, ids: torch.Tensor) -> list[dict[str, str]]:
        """The distinct feature combinations in a (batch, groups) id tensor, as dicts
        without the groups whose feature is 'no feature'."""
        out = []
        for row in torch.unique(ids.cpu(), dim=0).tolist():
            values = zip(self._index, row)
            out.append({group: self.features[group][i] for group, i in values if i < len(self.features[group])})
        return out

    def rows(
        self, examples: list[dict], feature_dropout: float = 0.0, generator: torch.Generator | None = None, keep_one: bool = False
    ) -> torch.Tensor:
        """(batch, active_rank) bank rows for each example (one feature dict each)."""
        return self.rows_from_ids(self.feature_ids(examples), feature_dropout, generator, keep_one)

    def rows_from_ids(
        self, ids: torch.Tensor, feature_dropout: float = 0.0, generator: torch.Generator | None = None, keep_one: bool = False
    ) -> torch.Tensor:
        """(batch, active_rank) bank rows from (batch, groups) feature ids.

        Feature dropout (training only; the shared feature always stays): each group
        feature of each example is turned off independently with probability `feature_dropout`
        (p), so with G groups an example keeps no feature at all with probability p**G
        (0.49 for the paper's 0.7 and two groups) and teaches nothing. With `keep_one`, an
        example whose draws would turn off every group keeps one group's feature, chosen
        uniformly: no example is left without one, and a single feature is then off with
        probability p - p**G / G (0.455 for 0.7 and two groups).
        """
        groups = self.groups
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        if ids.dim() != 2 or ids.shape[1] != len(groups):
            raise ValueError(f"feature ids must be (batch, {len(groups)}) for the groups {groups}, got shape {tuple(ids.shape)}")
        n = ids.shape[0]
        limits = torch.tensor([len(self._index[g]) for g in groups], dtype=torch.long)
        if n and ((ids < 0) | (ids > limits)).any():
            raise ValueError(f"feature ids out of range for the groups {groups} (each id < its number of features, or = it for none)")
        if feature_dropout > 0 and groups:
            # one draw per group in group order, so a seed gives the same routes as before keep_one existed
            off = torch.stack([torch.rand(n, generator=generator) < feature_dropout for _ in groups], dim=1)
            if keep_one:
                bare = off.all(dim=1)
                kept = torch.randint(len(groups), (n,), generator=generator)
                off[bare, kept[bare]] = False
            ids = torch.where(off, limits, ids)
        parts = [self._shared.expand(n, -1)] + [self._tables[group][ids[:, g]] for g, group in enumerate(groups)]
        return torch.cat(parts, dim=1)


def featureless(rows: torch.Tensor) -> torch.Tensor:
    """Which routed examples use no bank row at all (every feature dropped or unknown)."""
    return (rows == PAD).all(dim=1)


def dropout_key(seed: int, step: int, position: int) -> int:
    """The seed of one training example's feature-dropout draw: its run seed, step and
    position in the global batch (63 bits of a hash, so keys of nearby steps are unrelated)."""
    return int.from_bytes(hashlib.sha256(f"dropout/{seed}/{step}/{position}".encode()).digest()[:8], "little") >> 1
