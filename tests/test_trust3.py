"""Trust, round 3 (issue 24): a killed or damaged kernel build, paths and archive members
that reach outside their folder, weights of the wrong shape, damaged or odd run records in
a study and a report, bad settings, odd score files, and quiet interrupts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flix import cpu_kernels
from flix.lock import run_lock

REPO = Path(__file__).resolve().parents[1]
LOAD_KERNEL = "from flix import cpu_kernels; assert cpu_kernels.kernel() is not None; print('kernel loaded')"


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A copy of this machine's kernel build in its own TORCH_EXTENSIONS_DIR (mtimes kept, so
    it is up to date): its faults touch no other process's cache."""
    module = cpu_kernels.kernel()
    assert module is not None, "the CPU kernel should build here (g++ and ninja are in the setup)"
    built = Path(module.__file__).parent
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folder = tmp_path / "ext" / built.name
    shutil.copytree(built, folder)
    (folder / ".lock").unlink(missing_ok=True)
    return folder


def load_kernel_in_child(timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD_KERNEL], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_killed_kernel_build_does_not_block_later_runs(kernel_cache):
    # what a build killed by SIGKILL leaves: torch's marker and our lock file, no live owner
    (kernel_cache / "lock").write_text("")
    (kernel_cache / ".lock").write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00\n")
    done = load_kernel_in_child(timeout=120)  # before the fix: waited forever
    assert done.returncode == 0 and "kernel loaded" in done.stdout, done.stderr


def test_kernel_build_held_too_long_falls_back_with_one_message(kernel_cache, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "BUILD_WAIT_S", 0.5)
    cpu_kernels.kernel.cache_clear()
    try:
        with run_lock(kernel_cache):  # a live builder that does not finish
            with pytest.warns(RuntimeWarning, match=f"still held by pid {os.getpid()}.*Deleting {kernel_cache}"):
                assert cpu_kernels.kernel() is None
    finally:
        cpu_kernels.kernel.cache_clear()


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_damaged_kernel_library_is_rebuilt(kernel_cache, keep):
    library = kernel_cache / f"{kernel_cache.name}.so"
    data = library.read_bytes()
    library.write_bytes(data[: int(len(data) * keep)])  # a newer mtime: ninja sees it as up to date
    done = load_kernel_in_child()  # before the fix: Bus error (truncated) or "could not be built" (empty)
    assert done.returncode == 0 and "kernel loaded" in done.stdout, done.stderr
    assert "damaged or unfinished; rebuilding" in done.stderr
    assert library.stat().st_size > len(data) // 2
    again = load_kernel_in_child()  # stamped now: loads without a word
    assert again.returncode == 0 and "damaged" not in again.stderr, again.stderr


# -- adapters: exact shapes, a zero padding row; export confined to its output --------------

FEATURES = {"task": ["ner", "qa_in_lang"], "lang": ["sw", "yo"]}
TRAINED = [{"task": "ner", "lang": "sw"}, {"task": "qa_in_lang", "lang": "yo"}]


def saved_adapter(folder: Path, features=FEATURES) -> Path:
    """A tiny adapter with trained-looking B banks and two trained combinations."""
    import torch

    from flix import FLixConfig, get_flix_model
    from flix.models import load_model

    model = get_flix_model(load_model({"name": "tiny", "seed": 0})[0], FLixConfig(features=features, ranks={"task": 4, "lang": 2}))
    with torch.no_grad():
        for layer in model.flix_layers().values():
            layer.flix_B.normal_(std=0.2)[0].zero_()
    model.seen = set(map(tuple, model.flix_config.space.feature_ids(TRAINED).tolist()))
    return model.save_pretrained(folder)


def edit_weights(adapter: Path, change) -> str:
    """Rewrite one bank tensor of the adapter's safetensors with change(tensor); its key."""
    from safetensors.torch import load_file, save_file

    from flix.adapters import WEIGHTS_NAME

    tensors = load_file(str(adapter / WEIGHTS_NAME))
    key = sorted(k for k in tensors if k.endswith("flix_B"))[0]
    tensors[key] = change(tensors[key])
    save_file(tensors, str(adapter / WEIGHTS_NAME))
    return key


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t[1:2].clone(), r"has shape \(1, \d+\), this model needs \(\d+, \d+\)"),  # (1, d) would broadcast
        (lambda t: t[1].clone(), r"has shape \(\d+,\), this model needs"),  # (d,)
        (lambda t: t[1, 0].clone(), r"has shape \(\), this model needs"),  # a scalar
        (lambda t: t.index_fill(0, __import__("torch").tensor([0]), 0.5), "non-zero padding row 0"),
    ],
    ids=["row", "vector", "scalar", "padding"],
)
def test_wrong_weights_are_refused_naming_file_and_tensor(tmp_path, change, message):
    from flix import FLixModel
    from flix.models import load_model

    adapter = saved_adapter(tmp_path / "adapter")
    key = edit_weights(adapter, change)
    with pytest.raises(ValueError, match=message) as err:  # before: loaded, broadcast into every row
        FLixModel.from_pretrained(load_model({"name": "tiny"})[0], adapter)
    assert str(adapter / "flix_adapter.safetensors") in str(err.value) and key in str(err.value)


def test_export_writes_nothing_outside_its_output(tmp_path, capsys):
    from flix.export import main as export_main

    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    traversal = "../../victim"  # from out/, the combination's folder task=ner,lang=../../victim is tmp_path/victim
    adapter = saved_adapter(tmp_path / "adapter", {"task": ["ner"], "lang": ["sw", traversal]})
    config = json.loads((adapter / "flix_config.json").read_text())
    config["trained_combinations"] = [{"task": "ner", "lang": traversal}]
    (adapter / "flix_config.json").write_text(json.dumps(config))
    assert export_main([str(adapter), str(tmp_path / "out" / "x"), "--model", "tiny"]) == 2  # before: replaced victim/
    assert (victim / "keep").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "victim"]
    assert "path separator" in capsys.readouterr().err


def drop_config_key(adapter):
    config = json.loads((adapter / "flix_config.json").read_text())
    del config["config"]
    (adapter / "flix_config.json").write_text(json.dumps(config))


def edit_config(adapter, **changes):
    config = json.loads((adapter / "flix_config.json").read_text())
    config["config"].update(changes)
    (adapter / "flix_config.json").write_text(json.dumps(config))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage, args, message",
    [
        (lambda a: (a / "flix_adapter.safetensors").unlink(), [], r"flix_adapter.safetensors cannot be read"),
        (lambda a: truncate(a / "flix_adapter.safetensors"), [], r"flix_adapter.safetensors cannot be read"),
        (drop_config_key, [], r"flix_config.json has no 'config' key"),
        (lambda a: edit_config(a, ranks={"task": 3, "lang": 2}), [], r"has shape \(\d+, \d+\), this model needs"),
        (lambda a: edit_config(a, features={"task": ["ner", "qa_in_lang", "mt"], "lang": ["sw", "yo"]}), [], "this model needs"),
        (lambda a: edit_config(a, ranks={"task": "4", "lang": 2}), [], "ranks and shared_rank must be whole numbers"),
        (lambda a: None, ["--features", "task=ner,lang=zz"], r"\{'lang': 'zz'\} are not in this adapter"),
        (lambda a: None, ["--features", "size=big"], r"\{'size': 'big'\} are not in this adapter .*task: ner, qa_in_lang"),
    ],
    ids=["no-weights", "truncated-weights", "no-config-key", "changed-ranks", "changed-features", "string-rank", "untrained-lang", "unknown-group"],
)
def test_export_refuses_bad_adapters_and_features_with_a_message(tmp_path, capsys, damage, args, message):
    from flix.export import main as export_main

    adapter = saved_adapter(tmp_path / "adapter")
    damage(adapter)
    assert export_main([str(adapter), str(tmp_path / "out"), "--model", "tiny", *args]) == 2  # before: tracebacks, or a task-only adapter
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
