"""The environment is the locked one: every package of requirements.lock is installed at
its locked version (what `make setup` installs, and what the tests' numbers assume)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def locked() -> dict[str, str]:
    pins = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert match, f"{LOCK}:{number}: not a name==version pin: {line!r}"
            pins[match.group(1)] = match.group(2)
    return pins


def test_the_lock_pins_what_flix_depends_on():
    pins = {name.lower() for name in locked()}
    assert {"torch", "transformers", "peft", "hydra-core", "omegaconf", "wandb", "ruff", "pytest", "gguf", "trl"} <= pins


@pytest.mark.parametrize("name, version", sorted(locked().items()))
def test_installed_version_is_the_locked_one(name, version):
    installed = importlib.metadata.version(name).split("+")[0]  # 2.13.0+cpu is the locked 2.13.0
    assert installed == version, f"{name} {installed} installed, {version} locked: run `make setup` (or `make lock` to move the lock)"
