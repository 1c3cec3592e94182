"""The thin client: a FLix combination as llama-server's per-request `lora` list, and the
few HTTP calls flix makes to the server (standard library only).

A manifest (written by `flix serve export`) lists the adapters in the order the server
loaded them, so an adapter's id is its place in `--lora a.gguf,b.gguf,...`. A combination
turns on its features' adapters at scale 1 and every other adapter at scale 0 (the list
names them all: an id left out would fall back to the server's start-up scale). A
feature the adapter has no rows for (an unseen language) turns nothing on, as in FLix.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "flix-llama-server-1"


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found: pass the folder `python -m flix serve export` wrote") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}: export it again with `python -m flix serve export`")
    return manifest


def lora_list(manifest: dict, features: dict[str, str]) -> list[dict]:
    """[{"id", "scale"}] for every adapter: 1.0 for the shared one and the combination's
    features, 0.0 for the rest. A group the adapter does not know is refused (a typo would
    silently serve the base)."""
    groups = {a["group"] for a in manifest["adapters"] if a["group"] is not None} | set(manifest.get("groups", []))
    unknown = sorted(set(features) - groups)
    if unknown:
        raise ValueError(f"feature group(s) {unknown} are not in this adapter (its groups: {', '.join(sorted(groups)) or 'none'})")
    on = lambda a: a["group"] is None or features.get(a["group"]) == a["feature"]  # noqa: E731
    return [{"id": a["id"], "scale": 1.0 if on(a) else 0.0} for a in manifest["adapters"]]


def server_args(manifest: dict, folder: str | Path) -> list[str]:
    """llama-server's options that load the adapters, all at scale 0 until a request says."""
    files = [str(Path(folder) / a["file"]) for a in sorted(manifest["adapters"], key=lambda a: a["id"])]
    return ["--lora", ",".join(files), "--lora-init-without-apply"] if files else []


def post(url: str, path: str, body: dict, timeout: float = 600.0) -> dict:
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def complete(url: str, prompt: str | list[int], lora: list[dict], n_predict: int = 32, n_probs: int = 0, **extra) -> dict:
    """One /completion request: greedy (temperature 0, top-k 1) unless extra says otherwise;
    prompt as text or as token ids; n_probs > 0 adds each step's top log-probabilities
    (before sampling) under completion_probabilities."""
    body = {"prompt": prompt, "n_predict": n_predict, "lora": lora, "temperature": 0.0, "top_k": 1, "cache_prompt": True, "seed": 0}
    if n_probs:
        body |= {"n_probs": n_probs, "post_sampling_probs": False}
    return post(url, "/completion", body | extra)


def next_logprobs(url: str, tokens: list[int], lora: list[dict], n_probs: int) -> dict[int, float] | None:
    """The server's log-probabilities of its top n_probs next tokens after `tokens`; None
    where the server holds its token back as an incomplete UTF-8 sequence (a byte token),
    which leaves the probabilities out of its reply."""
    reply = complete(url, tokens, lora, n_predict=1, n_probs=n_probs)
    if not reply.get("completion_probabilities"):
        return None
    top = reply["completion_probabilities"][0]["top_logprobs"]
    return {int(t["id"]): float(t["logprob"]) for t in top}


def tokenize(url: str, text: str) -> list[int]:
    return [int(t) for t in post(url, "/tokenize", {"content": text, "add_special": False})["tokens"]]
