"""FLixDataCollator: each example's features travel in the batch, so any training loop
that calls `model(**batch)` (transformers.Trainer, Seq2SeqTrainer, TRL's SFTTrainer,
accelerate scripts) trains FLix with per-example adapter sums.

The features become one (batch, groups) tensor of feature ids, `flix_features`: a
tensor, so device placement moves it, DDP and gradient accumulation split and keep it
like input_ids, and FLixModel.forward / .generate route by it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from flix.routing import FEATURES_KEY


class FLixDataCollator:
    """Wrap `collator` (default: transformers' default_data_collator): feature columns
    are taken out of each example and come back as batch["flix_features"].

    feature_columns: the model's feature groups by default (columns named `task`,
    `lang`, ...); a list of group names, or a mapping group -> column name. Trainer keeps
    columns named like the groups (FLixModel.forward names them); for other column names
    pass TrainingArguments(remove_unused_columns=False). A missing or unknown value
    routes as in model.route(): that group contributes nothing (an unseen language
    trains and predicts with its task alone).
    """

    def __init__(self, model, collator: Callable | None = None, feature_columns: Sequence[str] | Mapping[str, str] | None = None):
        from transformers import default_data_collator

        self.space = model.flix_config.space
        self.collator = collator or default_data_collator
        columns = self.space.groups if feature_columns is None else feature_columns
        self.columns = dict(columns) if isinstance(columns, Mapping) else {group: group for group in columns}
        unknown = sorted(set(self.columns) - set(self.space.groups))
        if unknown:
            raise ValueError(f"feature_columns name groups {unknown} the model does not have (its groups: {self.space.groups})")

    def __call__(self, examples: list[dict]) -> dict:
        if examples and not any(column in ex for ex in examples for column in self.columns.values()):
            raise ValueError(
                f"no example has a feature column ({', '.join(self.columns.values())}); keys: {sorted(examples[0])}. "
                "If the dataset has them under other names pass feature_columns={group: column} and "
                "TrainingArguments(remove_unused_columns=False)."
            )
        features, rest = [], []
        for ex in examples:
            features.append({group: ex.get(column) for group, column in self.columns.items()})
            rest.append({k: v for k, v in ex.items() if k not in self.columns.values()})
        batch = self.collator(rest)
        batch[FEATURES_KEY] = self.space.feature_ids(features)
        return batch
