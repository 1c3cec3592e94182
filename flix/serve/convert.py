"""GGUF files for llama-server from flix's models, by llama.cpp's own converters
(flix/serve/gguf_child.py, run in a child process over the cached llama.cpp source).

- feature_ggufs: one GGUF LoRA per feature of a FLix adapter, each at scale alpha / active
  rank, so that the server's per-request sum of a combination's features at scale 1 is
  FLix's update for that combination;
- base_gguf: a GGUF base: Gemma 3 270M's packaged Q4_K_M file as it is, or de-quantised
  to float32 (what flix's float model holds); a tiny test model in float32.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from flix.serve.llama_cpp import source_dir

CHILD = Path(__file__).with_name("gguf_child.py")
SHARED = "shared"  # the always-on feature's name in file names and manifests


def run_child(jobs: list[dict]) -> None:
    """Run GGUF jobs in one child process; ValueError with its one-line error on failure."""
    src = source_dir()
    with tempfile.TemporaryDirectory(prefix="flix-gguf-") as tmp:
        spec = Path(tmp) / "jobs.json"
        spec.write_text(json.dumps(jobs))
        done = subprocess.run([sys.executable, str(CHILD), str(src), str(spec)], capture_output=True, text=True)
    if done.returncode:
        errors = [line for line in done.stdout.splitlines() if line.startswith("error: ")]
        detail = errors[-1][len("error: ") :] if errors else (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(detail)


def base_config_dir(hf_model, folder: Path) -> Path:
    """folder/config.json: the base's config with the `architectures` entry the converters
    read (a config built in code, or Gemma's cached one, has none). The cache is untouched."""
    config = hf_model.config.to_dict()
    if config.get("is_encoder_decoder"):
        raise ValueError(f"the base model is {type(hf_model).__name__}, an encoder-decoder: llama-server serves causal language models only")
    config["architectures"] = [type(hf_model).__name__]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return folder


def features_of(model) -> list[tuple[str | None, str, list[int]]]:
    """(group, feature, bank rows) of every feature with trained rows: the shared one
    first (group None), then each group's in order."""
    space = model.flix_config.space
    out = [(None, SHARED, list(range(1, 1 + space.shared_rank)))] if space.shared_rank else []
    for group, values in space.features.items():
        out += [(group, value, space.rows_of(group, value)) for value in values if space.ranks[group]]
    return out


def file_name(group: str | None, feature: str) -> str:
    name = SHARED if group is None else f"{group}={feature}"
    if any(c in name for c in "/\\\0") or name.startswith("."):
        raise ValueError(f"feature {group}={feature} cannot name a file: it holds a path separator")
    return name + ".gguf"


def feature_ggufs(model, out: Path) -> list[dict]:
    """Write out/<group=feature>.gguf per feature; returns the manifest's adapter entries
    in the order llama-server must load them (their ids)."""
    import torch

    from flix.export import write_peft

    features = features_of(model)
    names = [file_name(group, feature) for group, feature, _ in features]  # all checked before any work
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flix-serve-export-") as tmp:
        base = base_config_dir(model.base_model, Path(tmp) / "base")
        jobs: list[dict] = [{"kind": "check", "base": str(base)}]
        for (group, feature, rows), name in zip(features, names):
            peft = write_peft(model, torch.tensor(rows, dtype=torch.long), Path(tmp) / "peft" / name)
            jobs.append({"kind": "lora", "peft": str(peft), "base": str(base), "out": str(out / name)})
        run_child(jobs)
    return [
        {"id": i, "group": group, "feature": feature, "rank": len(rows), "file": name}
        for i, ((group, feature, rows), name) in enumerate(zip(features, names))
    ]


def base_gguf(model_name: str, out: Path, dtype: str) -> Path:
    """A GGUF base for llama-server: gemma3_270m as packaged (q4_k_m) or in float32 (f32);
    a flix tiny model (f32)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if model_name == "gemma3_270m":
        import importlib

        from flix.base_models.gemma import GEMMA_INSTALL_HINT, GGUF_MODULE

        try:
            package = importlib.import_module(GGUF_MODULE)
        except ImportError:
            raise ValueError(f"the Gemma 3 270M GGUF package is not installed: {GEMMA_INSTALL_HINT}") from None
        if dtype == "q4_k_m":
            return package.assemble(out, overwrite=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".flix-base-") as tmp:
            packaged = package.assemble(Path(tmp) / package.MODEL_NAME)
            run_child([{"kind": "dequantise", "gguf": str(packaged), "out": str(Path(tmp) / "f32.gguf")}])
            shutil.move(str(Path(tmp) / "f32.gguf"), out)
        return out
    from flix.base_models.tiny import TINY

    if model_name not in TINY or dtype != "f32":
        raise ValueError(
            f"no GGUF base recipe for model {model_name!r} in {dtype}: use gemma3_270m (q4_k_m or f32) or tiny (f32), "
            "or convert your model with llama.cpp's convert_hf_to_gguf.py"
        )
    hf_model = TINY[model_name](0)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".flix-base-") as tmp:
        folder = base_config_dir(hf_model, Path(tmp) / "model")
        hf_model.save_pretrained(folder)
        base_config_dir(hf_model, folder)  # save_pretrained's config.json, with architectures kept
        run_child([{"kind": "float_base", "model": str(folder), "out": str(Path(tmp) / "f32.gguf")}])
        shutil.move(str(Path(tmp) / "f32.gguf"), out)
    return out
