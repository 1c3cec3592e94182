"""FLixModel: a Hugging Face model whose target modules carry FLix banks (injection,
routing, save/load; the config is flix.config, export and merging live in flix.export).

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
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flix.config import CONFIG_NAME, FLixConfig
from flix.features import PAD
from flix.layer import FLixLayer
from flix.routing import FEATURES_KEY, RoutedCall, Router, as_ids, packed_tokens, routed_signature, take_features
from flix.targets import find_target_modules

WEIGHTS_NAME = "flix_adapter.safetensors"
BANKS = (".flix_A", ".flix_B")


class FLixModel(nn.Module):
    """A Hugging Face model whose target modules carry FLix banks.

    Route each example by its features, one of three ways: `model(**batch,
    flix_features=...)` (a list of feature dicts, or the (batch, groups) id tensor that
    `flix.FLixDataCollator` puts in a batch), one keyword per feature group
    (`model(**batch, task=[...], lang=[...])`), or `with model.route(features):` around
    hand-written calls. The same holds for `.generate(...)`. Attributes not found here
    are looked up on the base model.
    """

    def __init__(self, model: nn.Module, config: FLixConfig):
        super().__init__()
        self.base_model = model
        self.flix_config = config
        self.router = Router(config.space)
        self.seen: set[tuple[int, ...]] = set()  # feature-id rows trained (before dropout)
        model.requires_grad_(False)
        self.adapted_modules = find_target_modules(model, config.target_modules)
        for name in self.adapted_modules:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = FLixLayer(getattr(parent, child), self.router, config.scaling, config.sparse_grad)
            setattr(parent, child, layer)
        routed_signature(model.forward, config.space.groups)  # refuses a group named like a model argument, which routing would swallow
        self.route_hook = model.register_forward_pre_hook(self._route_hook, with_kwargs=True)
        # instance attributes win over the methods below: the exact signatures Trainer inspects
        self.forward, self.generate = RoutedCall(self, "forward"), RoutedCall(self, "generate")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, labels=None, flix_features=None, **kwargs):
        # what the class shows (Trainer finds the label names here); instances call RoutedCall
        if labels is not None:
            kwargs["labels"] = labels
        return self.routed_call("forward", args, {**kwargs, FEATURES_KEY: flix_features})

    def generate(self, *args, flix_features=None, **kwargs):
        return self.routed_call("generate", args, {**kwargs, FEATURES_KEY: flix_features})

    def routed_call(self, name: str, args: tuple, kwargs: dict):
        """forward: the base model's, whose pre-hook routes by the call's features.
        generate: routed for the whole generation (its inner forwards carry none)."""
        if name == "forward":
            return self.base_model(*args, **kwargs)
        features = take_features(self.router.space, kwargs)
        if features is None:
            return self.base_model.generate(*args, **kwargs)
        with self._routed(as_ids(self.router.space, features)):
            return self.base_model.generate(*args, **kwargs)

    def _route_hook(self, module, args, kwargs):
        """Forward pre-hook on the base model: routes by `flix_features` or feature-group
        keywords, so it works however the base model is called (TRL, for one, replaces
        forward). Those rows stay set for gradient checkpointing's recompute in backward;
        a call with no features outside route() clears them."""
        features = take_features(self.router.space, kwargs)
        if features is not None:
            ids = as_ids(self.router.space, features)
            self.router.set(self.rows_for(ids), packed_tokens(len(ids), args, kwargs))
        elif not self.router.contexts:
            self.router.set(None)
        return args, kwargs

    def flix_layers(self) -> dict[str, FLixLayer]:
        return {name: self.base_model.get_submodule(name) for name in self.adapted_modules}

    def rows_for(self, ids: torch.Tensor, dropout_keys: list[int] | None = None) -> torch.Tensor:
        """Bank rows for (batch, groups) feature ids; in training mode feature dropout is
        drawn here and the combinations are recorded. The draw comes from torch's global
        RNG, or with `dropout_keys` (one integer per example) from each example's own
        generator seeded by its key: the same example draws the same mask however the
        batch is split over processes or micro-batches."""
        space, config = self.flix_config.space, self.flix_config
        if not self.training:
            return space.rows_from_ids(ids)
        if ids.shape[1]:  # a featureless space (plain LoRA) has no combinations
            self.seen.update(map(tuple, torch.unique(ids.cpu(), dim=0).tolist()))
        draw = dict(feature_dropout=config.feature_dropout, keep_one=config.dropout_mode == "keep_one")
        if dropout_keys is None:
            return space.rows_from_ids(ids, **draw)
        if len(dropout_keys) != len(ids):
            raise ValueError(f"{len(dropout_keys)} dropout keys for {len(ids)} examples: give one per example")
        return torch.cat(
            [space.rows_from_ids(ids[i : i + 1], generator=torch.Generator().manual_seed(k), **draw) for i, k in enumerate(dropout_keys)]
        )

    @contextmanager
    def route(self, features: list[dict], dropout_keys: list[int] | None = None, token_examples: torch.Tensor | None = None):
        """Route the forward/generate calls inside the block: one feature dict per
        example (`dropout_keys`: see rows_for). Packed rows (flix.packing) give each input
        position's example index in `token_examples` (-1: none). With gradient
        checkpointing, call backward inside the block too."""
        with self._routed(as_ids(self.flix_config.space, list(features)), dropout_keys, token_examples):
            yield self

    @contextmanager
    def _routed(self, ids: torch.Tensor, dropout_keys: list[int] | None = None, token_examples: torch.Tensor | None = None):
        previous = self.router.set(self.rows_for(ids, dropout_keys), token_examples)
        self.router.contexts += 1
        try:
            yield self
        finally:
            self.router.contexts -= 1
            self.router.set(*previous)

    @property
    def trained_combinations(self) -> list[dict[str, str]]:
        """Feature combinations this adapter was trained on (recorded in training mode,
        saved by save_pretrained): what `flix export` writes a peft adapter for."""
        if not self.seen:
            return []
        return self.flix_config.space.combinations(torch.tensor(sorted(self.seen), dtype=torch.long))

    # -- parameters -------------------------------------------------------------

    def banks(self) -> dict[str, nn.Parameter]:
        """The bank parameters by adapter key (sharded DTensors under FSDP)."""
        return {f"{name}.{p}": getattr(layer, p) for name, layer in self.flix_layers().items() for p in ("flix_A", "flix_B")}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The full banks. Sharded banks (FSDP2 DTensors) are gathered: every process must call this."""
        return {key: _full(p.detach()) for key, p in self.banks().items()}

    def state_dict(self, *args, **kwargs):
        """The FLix banks only: the base model is frozen and loads from its own weights,
        so `torch.save(model.state_dict())` and Trainer checkpoints hold just the adapter
        (and tied weights, which safetensors refuses to save twice, never come in)."""
        full = super().state_dict(*args, **kwargs)
        for key in [k for k in full if not k.endswith(BANKS)]:
            del full[key]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load banks saved by state_dict(); strict checks the bank keys only."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k.endswith(BANKS)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"FLix state dict does not fit this model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        return type(result)(missing, result.unexpected_keys)

    def num_trainable_parameters(self) -> int:
        """Adapter parameters, not counting the zero padding row of each bank."""
        return sum((layer.flix_A.shape[0] - 1) * (layer.in_features + layer.out_features) for layer in self.flix_layers().values())

    # -- persistence --------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write flix_config.json and flix_adapter.safetensors, atomically."""
        from flix.io import atomic_dir, write_safetensors

        tensors = {k: v.contiguous() for k, v in self.adapter_state_dict().items()}  # sharded: gathered by every process
        if _sharded_elsewhere(self):  # the gathered banks are written once, by process 0
            torch.distributed.barrier()
            return Path(directory)
        with atomic_dir(directory) as tmp:
            write_safetensors(tensors, tmp / WEIGHTS_NAME)
            meta = {
                "config": self.flix_config.to_dict(),
                "adapted_modules": self.adapted_modules,
                "trained_combinations": self.trained_combinations,
            }
            # key order matters: the order of groups fixes the bank row layout
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if _is_sharded(self):
            torch.distributed.barrier()  # the others read it only once it is complete
        return Path(directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> FLixModel:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} not found: is {directory} a FLix adapter directory?")
        try:
            meta = json.loads(config_path.read_text())
            config = FLixConfig.from_dict(meta["config"])
            config.target_modules = meta["adapted_modules"]  # exactly the modules that were saved
            flix_model = cls(model, config)
        except KeyError as err:
            raise ValueError(f"{config_path} has no {err} key: it is not a FLix adapter config; save the adapter again") from err
        except (ValueError, TypeError, AttributeError) as err:  # bad JSON, ranks, features or modules
            raise ValueError(f"{config_path} is not a valid FLix adapter config: {err}") from err
        try:
            tensors = load_file(str(weights_path))
        except (OSError, SafetensorError) as err:  # missing, truncated, not safetensors
            raise ValueError(f"{weights_path} cannot be read ({err}): the adapter is incomplete or damaged; save it again") from err
        flix_model.load_adapter_state_dict(tensors, source=str(weights_path))
        trained = meta.get("trained_combinations") or []
        flix_model.seen = set(map(tuple, config.space.feature_ids(trained).tolist()))
        return flix_model

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy saved bank weights into this model (same feature space and modules); sharded
        banks take their own rows of the full tensors (every process passes them all)."""
        expected = self.banks()
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in tensors.items():
            # exactly: copy_ would broadcast a (1, d), (d,) or scalar tensor into every row
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)}, this model needs {tuple(expected[key].shape)}: "
                    "it was saved for other features, ranks or another base model"
                )
            if value[PAD].any():
                raise ValueError(
                    f"{source}: {key} has a non-zero padding row {PAD} (featureless examples would no longer "
                    "equal the base model): the file is damaged or was edited; retrain or restore it"
                )
        with torch.no_grad():
            for key, value in tensors.items():
                target = expected[key]
                if hasattr(target, "full_tensor"):  # a DTensor: this process's shard of the full bank
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None).to_local()
                    target = target.to_local()
                target.copy_(value)

    def export_peft(self, features: dict, directory: str | Path) -> Path:
        """Write one feature combination as a standard peft LoRA adapter (flix.export)."""
        from flix.export import export_peft

        return export_peft(self, features, directory)

    def merge_and_unload(self, features: dict) -> nn.Module:
        """The base model with one combination merged into its weights (flix.export)."""
        from flix.export import merge_and_unload

        return merge_and_unload(self, features)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_sharded(model: FLixModel) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.banks().values())


def _sharded_elsewhere(model: FLixModel) -> bool:
    """Sharded, and this is not process 0 (which writes the gathered banks)."""
    return _is_sharded(model) and torch.distributed.get_rank() != 0


def get_flix_model(model: nn.Module, config: FLixConfig) -> FLixModel:
    """Freeze `model` and add FLix banks to its target modules."""
    return FLixModel(model, config)
