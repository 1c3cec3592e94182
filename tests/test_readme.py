"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert (tmp_path / "adapter" / "flix_config.json").exists()
    assert (tmp_path / "ner-sw" / "adapter_model.safetensors").exists()
    assert namespace["out"].shape[0] == 1


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    import torch

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "FLixDataCollator" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert len(namespace["manifest"]["adapters"]) == 4 and (tmp_path / "trained-adapter" / "flix_config.json").exists()
    assert (tmp_path / "trainer-out" / "checkpoint-4" / "model.safetensors").exists()
    assert "eval_loss" in namespace["metrics"]
    assert torch.equal(namespace["out"], namespace["peft_out"]), "the exported adapters generate what FLix generates"
