"""Which bank rows the current batch uses: the Router every FLix layer of a model reads,
and routing given as data (`flix_features`, or one keyword per feature group) to a
model's forward or generate.

Routing as data is what lets `transformers.Trainer`, TRL and accelerate scripts train a
FLix model: they call `model(**batch)`, so the batch carries each example's features.
Rows routed that way stay set after the call returns, because gradient checkpointing
re-runs the layers during backward, after forward has returned; the next top-level call
replaces them (or clears them, if it brings no features).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from flix.features import PAD, FeatureSpace
from flix.packing import sequence_index

FEATURES_KEY = "flix_features"


class PackedRows(NamedTuple):
    """Routing for packed rows whose examples use different bank rows, two ways: `used`, the
    union of the batch's bank rows (U,), with `mask` (tokens, U), which rows each position's
    example uses (plain matmuls over all tokens: GPUs, torch's ops); and `example_rows`
    (runs, r), one set of bank rows per run of consecutive positions of one example (the
    padding row for padding), with `bounds` (runs + 1,) the runs' offsets (CPU kernels)."""

    used: torch.Tensor
    mask: torch.Tensor
    example_rows: torch.Tensor
    bounds: torch.Tensor


class Router:
    """The current batch's bank rows, shared by every FLix layer of a model."""

    def __init__(self, space: FeatureSpace):
        self.space = space
        self.rows: torch.Tensor | None = None  # (batch, active_rank)
        self.tokens: torch.Tensor | None = None  # packed rows: each input position's example (flix.packing)
        self.contexts = 0  # open `model.route()` blocks: their rows are not cleared by a featureless call
        self._cache: dict = {}

    def set(self, rows: torch.Tensor | None, tokens: torch.Tensor | None = None) -> tuple:
        """Route by `rows` (one per example) and, for packed rows, `tokens` (each input
        position's example index, -1 for none); returns what was set before."""
        previous = (self.rows, self.tokens)
        self.rows, self.tokens, self._cache = rows, None if tokens is None else tokens.reshape(-1), {}
        return previous

    def rows_for(self, n: int, device: torch.device, tokens: int | None = None):
        """Rows for a layer input whose leading dimension is n: (n, active_rank), or
        (1, active_rank) when every example has the same rows, so that layers do one
        plain matmul over all tokens instead of a batched one. Packed rows (`tokens`, the
        input's positions, set) whose examples differ get their PackedRows.

        generate() repeats each prompt for beams and return sequences
        (repeat_interleave), so n may be a multiple of the routed batch.
        """
        key = (n, device, tokens)
        if key in self._cache:
            return self._cache[key]
        if self.tokens is not None and self.rows is not None and not bool((self.rows == self.rows[:1]).all()):
            self._cache[key] = packed = self._packed(tokens, device)
            return packed
        rows = self.rows
        if rows is None:
            if self.space.features:
                raise RuntimeError(
                    "this FLix model has feature groups: pass each example's features, as "
                    f"model(..., {FEATURES_KEY}=[{{'task': ..., 'lang': ...}}, ...]) (FLixDataCollator puts them in a batch), "
                    "or call it inside `with model.route([...]):` (one dict per example)"
                )
            rows = self.space.rows([{}])
        elif self.tokens is not None:  # packed rows, every example the same rows: one plain matmul
            rows = rows[:1]
        elif n % rows.shape[0]:
            raise RuntimeError(f"{rows.shape[0]} examples were routed but a layer saw a batch of {n}: route exactly one feature dict per input row")
        elif bool((rows == rows[:1]).all()):
            rows = rows[:1]
        elif n != rows.shape[0]:
            rows = rows.repeat_interleave(n // rows.shape[0], dim=0)
        self._cache[key] = rows = rows.to(device)
        return rows

    def _packed(self, tokens: int | None, device: torch.device) -> PackedRows:
        """PackedRows, built once per batch for every layer: the bank rows any example uses
        (the zero padding row left out) and for each position whether its example uses each
        of them; and the runs of positions of one example with their rows."""
        if tokens != self.tokens.numel():
            raise RuntimeError(f"packed routing gives {self.tokens.numel()} positions an example, but a layer saw {tokens}")
        used = self.rows.unique()
        used = used[used != PAD]
        uses = (self.rows.unsqueeze(2) == used.view(1, 1, -1)).any(1)  # (examples, U)
        mask = torch.zeros(len(self.tokens), len(used), dtype=torch.float32)
        real = self.tokens >= 0
        mask[real] = uses[self.tokens[real]].float()
        starts = torch.ones(len(self.tokens), dtype=torch.bool)
        starts[1:] = self.tokens[1:] != self.tokens[:-1]
        first = starts.nonzero().squeeze(1)
        padding = torch.full_like(self.rows[:1], PAD)
        example_rows = torch.cat([self.rows, padding])[self.tokens[first]]  # index -1: the padding row
        bounds = torch.cat([first, torch.tensor([len(self.tokens)])])  # on CPU: only CPU kernels read them
        return PackedRows(used.to(device), mask.to(device), example_rows.to(device), bounds)


def as_ids(space: FeatureSpace, features) -> torch.Tensor:
    """(batch, groups) feature ids from what a caller passed: such a tensor already, a
    list of feature dicts (one per example), or a dict of columns (group -> values)."""
    if isinstance(features, torch.Tensor):
        return features
    if isinstance(features, dict):
        lengths = {len(v) for v in features.values()}
        if len(lengths) > 1:
            raise ValueError(f"feature columns differ in length: { {g: len(v) for g, v in features.items()} }")
        n = lengths.pop() if lengths else 0
        features = [{g: values[i] for g, values in features.items()} for i in range(n)]
    return space.feature_ids(list(features))


def take_features(space: FeatureSpace, kwargs: dict):
    """Pop a call's features from its keyword arguments: `flix_features`, else one
    keyword per feature group (dict of columns); None when there are none."""
    features = kwargs.pop(FEATURES_KEY, None)
    columns = {g: kwargs.pop(g) for g in space.groups if g in kwargs}
    columns = {g: v for g, v in columns.items() if v is not None}
    return features if features is not None else (columns or None)


def packed_tokens(examples: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """For a forward call routed with `examples` feature rows: each position's example
    when the call's rows are packed (fewer input rows than examples, and position ids
    that restart once per example, as transformers' DataCollatorWithFlattening writes
    them); None otherwise."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    ids = kwargs.get("inputs_embeds") if ids is None else ids
    positions = kwargs.get("position_ids")
    if ids is None or positions is None or ids.shape[0] == examples:
        return None
    tokens = sequence_index(positions.expand(ids.shape[0], -1))
    if int(tokens[-1]) + 1 != examples:
        raise RuntimeError(
            f"{examples} examples were routed but the packed rows' position ids hold {int(tokens[-1]) + 1} sequences: "
            "route one feature dict per packed example (padding at the end of a row counts as one)"
        )
    return tokens


def routed_signature(base_call, groups: list[str]) -> inspect.Signature:
    """The base model's forward/generate signature plus `flix_features` and one keyword
    per feature group: Trainer keeps the dataset columns a forward names
    (remove_unused_columns), so the feature columns reach the data collator."""
    params = list(inspect.signature(base_call).parameters.values())
    taken = {p.name for p in params}
    clash = [g for g in groups if g in taken]
    if clash:
        raise ValueError(f"feature group(s) {clash} share a name with an argument of the base model's {base_call.__name__}: rename the group")
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in [FEATURES_KEY, *groups]]
    return inspect.Signature(params + extra + var_kw)


class RoutedCall:
    """A FLixModel's `forward` / `generate` as an instance attribute: the base model's
    method behind routing (FLixModel.routed_call), with the base model's signature plus
    the features, which is what Trainer reads to keep dataset columns."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    @property
    def __signature__(self) -> inspect.Signature:
        return routed_signature(getattr(self.model.base_model, self.name), self.model.router.space.groups)

    def __call__(self, *args, **kwargs):
        return self.model.routed_call(self.name, args, kwargs)
