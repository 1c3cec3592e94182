"""Deploying a FLix adapter where FLix itself is not installed: one feature combination
as a standard peft LoRA adapter, every trained combination at once with a manifest
(`flix export`: flix.pipeline.export_command), or one combination merged into the base weights.

A combination's update is a LoRA whose rank is the sum of its features' ranks (the
active rank, 6 for the paper's FLix): its A rows and B rows concatenated along the rank
axis, with lora_alpha chosen so that peft's alpha / r equals FLix's alpha / active_rank.

Over a quantized base (`model.quantize=nf4|int8`) the banks are float32 and export as
they are: peft loads the adapter over the same quantized base (its bnb LoRA layers). Merging
is refused there: W0 + update would have to be re-quantized, which rounds the update
away in part; the adapter (save_pretrained) loads onto the float base, which merges.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flix.features import PAD
from flix.io import atomic_dir, atomic_write_text, write_safetensors
from flix.layer import is_conv1d, is_quantized

MANIFEST = "manifest.json"


def combination_rows(model, features: dict) -> torch.Tensor:
    """The bank rows one feature combination uses (unknown features use none)."""
    rows = model.flix_config.space.rows([features])[0]
    rows = rows[rows != PAD]
    if len(rows) == 0:
        raise ValueError(f"features {features} activate no adapter rows: nothing to export")
    return rows


def folder_name(features: dict) -> str:
    """task=ner,lang=sw: a combination as a folder name, refused where it would not be one
    folder inside the output (a value such as ../../x from an edited config)."""
    name = ",".join(f"{group}={value}" for group, value in features.items()) or "shared"
    if any(c in name for c in "/\\\0"):
        raise ValueError(f"features {features} cannot name a folder: a group or value holds a path separator")
    return name


def export_peft(model, features: dict, directory: str | Path) -> Path:
    """Write one feature combination as a standard peft LoRA adapter (atomically)."""
    return write_peft(model, combination_rows(model, features), directory)


def write_peft(model, rows: torch.Tensor, directory: str | Path) -> Path:
    """Bank rows as one peft LoRA adapter of rank len(rows), scaled as FLix scales them
    (alpha / active rank): a combination's rows, or one feature's (flix.serve sums those)."""
    from peft import LoraConfig

    r = len(rows)
    layers = model.flix_layers()
    conv1d = [name for name, layer in layers.items() if is_conv1d(layer.base_layer)]
    peft_config = LoraConfig(
        r=r,
        lora_alpha=model.flix_config.alpha * r / model.flix_config.space.active_rank,
        target_modules=list(layers),
        fan_in_fan_out=bool(conv1d) and len(conv1d) == len(layers),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=getattr(model.base_model, "name_or_path", None),
    )
    tensors = {}
    for name, layer in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.flix_A.detach()[rows].contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.flix_B.detach()[rows].T.contiguous()
    with atomic_dir(directory) as tmp:
        peft_config.save_pretrained(str(tmp))
        write_safetensors(tensors, tmp / "adapter_model.safetensors")
    return Path(directory)


def export_all(model, directory: str | Path, combinations: list[dict] | None = None) -> Path:
    """One peft adapter per combination (default: those the adapter was trained on) in
    directory/<task=...,lang=...>/, and manifest.json mapping features to folders.
    max_lora_rank is what a multi-LoRA server (e.g. vLLM's --max-lora-rank) needs."""
    combinations = model.trained_combinations if combinations is None else combinations
    if not combinations:
        raise ValueError("no combinations to export: this adapter recorded none it was trained on; pass them (--features task=ner,lang=sw)")
    known = model.flix_config.features
    for features in combinations:  # all checked before anything is written
        unknown = {g: v for g, v in features.items() if v not in known.get(g, [])}
        if unknown:
            have = "; ".join(f"{g}: {', '.join(vs)}" for g, vs in known.items()) or "none"
            raise ValueError(f"features {unknown} are not in this adapter (its features: {have})")
        folder_name(features)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for features in combinations:
        folder = folder_name(features)
        export_peft(model, features, directory / folder)
        entries.append({"features": features, "path": folder, "rank": len(combination_rows(model, features))})
    manifest = {"max_lora_rank": max(e["rank"] for e in entries), "adapters": entries}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return directory


@torch.no_grad()
def merge_and_unload(model, features: dict) -> nn.Module:
    """The base model with one combination merged into its weights, FLix layers
    removed: W0 + scale * A_rows^T B_rows. It computes what FLix computes for that
    combination; the FLixModel is not usable afterwards. Refused over a quantized base."""
    rows = combination_rows(model, features)
    quantized = [name for name, layer in model.flix_layers().items() if is_quantized(layer.base_layer)]
    if quantized:  # checked before anything changes: the model stays usable
        raise ValueError(
            f"cannot merge into a quantized base: {len(quantized)} adapted layers (e.g. {quantized[0]}) hold 4/8-bit bitsandbytes weights, "
            "and re-quantizing W0 + update would round the update away in part. Save the adapter (save_pretrained), load it onto the base "
            "in float (model.quantize=none: FLixModel.from_pretrained) and merge there, or serve a peft adapter (export_peft, `flix export`) "
            "over the quantized base"
        )
    scaling = model.flix_config.scaling
    model.route_hook.remove()
    for name, layer in model.flix_layers().items():
        a, b = layer.flix_A[rows], layer.flix_B[rows]  # (r, d_in), (r, d_out)
        delta = scaling * (a.T.double() @ b.double())  # (d_in, d_out)
        base = layer.base_layer
        weight = base.weight
        weight += (delta.T if isinstance(base, nn.Linear) else delta).to(weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.base_model.get_submodule(parent_name), child, base)
    return model.base_model
