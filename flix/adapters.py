"""FLixConfig, the router, injection of FLix layers into a Hugging Face model, and the
FLixModel wrapper (route, save/load, peft export).

For input x with active features f(x):  W(x) = W0 + scale * sum_{i in f(x)} B_i A_i,
scale = alpha / active_rank. Each example's update is a LoRA of rank sum_i r_i, so
FLix is exported per feature combination as a standard peft LoRA adapter.

A layer keeps all features' A rows in one bank `flix_A` (rows x d_in) and B rows in
`flix_B` (rows x d_out); `flix.features` explains the row layout. A mixed batch is
routed with two row gathers and two batched matmuls, fused with the frozen layer
into one autograd node (`flix.layer`): no loop over examples, the compute per token
depends on the active rank, not on the number of features, and gradients are sparse
(only the rows an example used get any). When every example has the same rows (one
feature combination, or only an always-on feature) the matmuls run over all tokens
at once.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from flix.features import PAD, FeatureSpace
from flix.layer import FLixLayer, is_conv1d

CONFIG_NAME = "flix_config.json"
DROPOUT_MODES = ("independent", "keep_one")
WEIGHTS_NAME = "flix_adapter.safetensors"


@dataclass
class FLixConfig:
    """Everything that defines a FLix adapter (DESIGN.md §5).

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
    sparse_grad:     sparse bank gradients (None: on when there are feature groups).
    """

    features: dict[str, list[str]] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    shared_rank: int = 0
    target_modules: list[str] | str | None = None
    alpha: float = 16.0
    feature_dropout: float = 0.0
    dropout_mode: str = "independent"
    sparse_grad: bool | None = None

    def __post_init__(self):
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {self.feature_dropout}")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {', '.join(DROPOUT_MODES)}, got {self.dropout_mode!r}")
        self.space = FeatureSpace(self.features, self.ranks, self.shared_rank)
        if self.sparse_grad is None:
            self.sparse_grad = bool(self.features)

    @property
    def scaling(self) -> float:
        return self.alpha / self.space.active_rank

    def to_dict(self) -> dict:
        return asdict(self)  # fields only: the derived `space` is rebuilt on load

    @classmethod
    def from_dict(cls, d: dict) -> FLixConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Router:
    """The current batch's bank rows, shared by every FLix layer of a model."""

    def __init__(self, space: FeatureSpace):
        self.space = space
        self.rows: torch.Tensor | None = None  # (batch, active_rank)
        self._cache: dict = {}

    def set(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        previous, self.rows, self._cache = self.rows, rows, {}
        return previous

    def rows_for(self, n: int, device: torch.device) -> torch.Tensor:
        """Rows for a layer input whose leading dimension is n: (n, active_rank), or
        (1, active_rank) when every example has the same rows, so that layers do one
        plain matmul over all tokens instead of a batched one.

        generate() repeats each prompt for beams and return sequences
        (repeat_interleave), so n may be a multiple of the routed batch.
        """
        key = (n, device)
        if key in self._cache:
            return self._cache[key]
        rows = self.rows
        if rows is None:
            if self.space.features:
                raise RuntimeError(
                    "this FLix model has feature groups: call it inside `with model.route([{'task': ..., 'lang': ...}, ...]):` (one dict per example)"
                )
            rows = self.space.route([{}])
        elif n % rows.shape[0]:
            raise RuntimeError(
                f"model.route() got {rows.shape[0]} examples but a layer saw a batch of {n}: route exactly one feature dict per input row"
            )
        elif bool((rows == rows[:1]).all()):
            rows = rows[:1]
        elif n != rows.shape[0]:
            rows = rows.repeat_interleave(n // rows.shape[0], dim=0)
        self._cache[key] = rows = rows.to(device)
        return rows


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(model: nn.Module, target_modules: list[str] | str | None) -> list[str]:
    """Full names of the Linear/Conv1D modules to adapt."""
    if target_modules is None:
        from flix.models import default_target_modules

        target_modules = default_target_modules(model)
    names = [
        name
        for name, module in model.named_modules()
        if name and _matches(name, target_modules) and (isinstance(module, nn.Linear) or is_conv1d(module))
    ]
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear/Conv1D in {type(model).__name__}; "
            "pass module-name suffixes such as ['q_proj', 'v_proj'] or a regex"
        )
    return names


class FLixModel(nn.Module):
    """A Hugging Face model whose target modules carry FLix banks.

    Use `with model.route(features): model(...)` (or `.generate(...)`), one feature
    dict per example. Attributes not found here are looked up on the base model.
    """

    def __init__(self, model: nn.Module, config: FLixConfig):
        super().__init__()
        self.base_model = model
        self.flix_config = config
        self.router = Router(config.space)
        model.requires_grad_(False)
        self.adapted_modules = find_target_modules(model, config.target_modules)
        for name in self.adapted_modules:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = FLixLayer(getattr(parent, child), self.router, config.scaling, config.sparse_grad)
            setattr(parent, child, layer)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def flix_layers(self) -> dict[str, FLixLayer]:
        return {name: self.base_model.get_submodule(name) for name in self.adapted_modules}

    @contextmanager
    def route(self, features: list[dict]):
        """Route the next forward/generate calls: one feature dict per example.

        In training mode feature dropout is drawn here (from torch's global RNG).
        """
        features = list(features)
        dropout = self.flix_config.feature_dropout if self.training else 0.0
        rows = self.flix_config.space.route(features, dropout=dropout, keep_one=self.flix_config.dropout_mode == "keep_one")
        previous = self.router.set(rows)
        try:
            yield self
        finally:
            self.router.set(previous)

    # -- parameters -------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{p}": getattr(layer, p).detach() for name, layer in self.flix_layers().items() for p in ("flix_A", "flix_B")}

    def num_trainable_parameters(self) -> int:
        """Adapter parameters, not counting the zero padding row of each bank."""
        return sum((layer.flix_A.shape[0] - 1) * (layer.in_features + layer.out_features) for layer in self.flix_layers().values())

    # -- persistence --------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write flix_config.json and flix_adapter.safetensors, atomically."""
        from safetensors.torch import save_file

        from flix.io import atomic_dir

        with atomic_dir(directory) as tmp:
            tensors = {k: v.contiguous() for k, v in self.adapter_state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_NAME))
            meta = {"config": self.flix_config.to_dict(), "adapted_modules": self.adapted_modules}
            # key order matters: the order of groups fixes the bank row layout
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        return Path(directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> FLixModel:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{directory / CONFIG_NAME} not found: is {directory} a FLix adapter directory?")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        config = FLixConfig.from_dict(meta["config"])
        config.target_modules = meta["adapted_modules"]  # exactly the modules that were saved
        flix_model = cls(model, config)
        flix_model.load_adapter_state_dict(load_file(str(directory / WEIGHTS_NAME)), source=str(directory / WEIGHTS_NAME))
        return flix_model

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy saved bank weights into this model (same feature space and modules)."""
        expected = self.adapter_state_dict()
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for key, value in tensors.items():
                expected[key].copy_(value)

    def export_peft(self, features: dict, directory: str | Path) -> Path:
        """Write one feature combination as a standard peft LoRA adapter.

        The combination's A rows and B rows are concatenated along the rank axis;
        lora_alpha is set so that peft's alpha / r equals FLix's alpha / active_rank.
        """
        from peft import LoraConfig
        from safetensors.torch import save_file

        from flix.io import atomic_dir

        rows = self.flix_config.space.route([features])[0]
        rows = rows[rows != PAD]
        r = len(rows)
        if r == 0:
            raise ValueError(f"features {features} activate no adapter rows: nothing to export")
        layers = self.flix_layers()
        conv1d = [name for name, layer in layers.items() if is_conv1d(layer.base_layer)]
        peft_config = LoraConfig(
            r=r,
            lora_alpha=self.flix_config.alpha * r / self.flix_config.space.active_rank,
            target_modules=list(layers),
            fan_in_fan_out=bool(conv1d) and len(conv1d) == len(layers),
            lora_dropout=0.0,
            bias="none",
            base_model_name_or_path=getattr(self.base_model, "name_or_path", None),
        )
        tensors = {}
        for name, layer in layers.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.flix_A.detach()[rows].contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.flix_B.detach()[rows].T.contiguous()
        with atomic_dir(directory) as tmp:
            peft_config.save_pretrained(str(tmp))
            save_file(tensors, str(tmp / "adapter_model.safetensors"))
        return Path(directory)


def get_flix_model(model: nn.Module, config: FLixConfig) -> FLixModel:
    """Freeze `model` and add FLix banks to its target modules."""
    return FLixModel(model, config)
