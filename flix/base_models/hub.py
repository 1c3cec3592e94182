"""Pretrained models from a hub id or a local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def load_pretrained(source: str | Path, kind: str | None, dtype: torch.dtype, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any hub id or local folder; kind defaults from the config's is_encoder_decoder."""
    config = AutoConfig.from_pretrained(source, **kwargs)
    kind = kind or ("seq2seq" if config.is_encoder_decoder else "causal")
    if kind not in ("causal", "seq2seq"):
        raise ValueError(f"model kind must be 'causal' or 'seq2seq', got {kind!r}")
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(source, config=config, dtype=dtype, **kwargs)
    return model, AutoTokenizer.from_pretrained(source, **kwargs)


def in_hub_cache(hub_id: str) -> bool:
    try:
        AutoConfig.from_pretrained(hub_id, local_files_only=True)
    except OSError:
        return False
    return True
