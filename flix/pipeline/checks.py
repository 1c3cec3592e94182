"""Checks a run's configuration and data before any model loads or any file is written,
so a bad setting fails in a second with one message, not after an hour of training."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from flix.data import reader
from flix.data.mixtures import Mixture

# scale keys and the smallest value each may take (None allowed where null means "all")
AT_LEAST = {
    "steps": 1,
    "batch_size": 1,
    "micro_batch_size": 1,
    "eval_every": 1,
    "checkpoint_every": 1,
    "eval_batch_size": 1,
    "max_prompt_tokens": 1,
    "max_target_tokens": 1,
    "warmup_steps": 0,
}
AT_LEAST_OR_NULL = {"eval_examples": 1, "test_examples": 1, "max_langs_per_task": 1, "max_context_chars": 1}


class ConfigError(ValueError):
    """A setting or input file that cannot work; the message names it and what to do."""


def _number_problems(section: DictConfig, prefix: str, at_least: dict, nullable: bool) -> list[str]:
    problems = []
    for key, low in at_least.items():
        if key not in section:
            continue
        value = section[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            allowed = f"an integer >= {low}" + (" or null" if nullable else "")
            problems.append(f"{prefix}{key}={value!r}: must be {allowed}")
    return problems


def config_problems(cfg: DictConfig) -> list[str]:
    s = cfg.scale
    problems = _number_problems(s, "scale.", AT_LEAST, False) + _number_problems(s, "scale.", AT_LEAST_OR_NULL, True)
    if not problems and s.warmup_steps > s.steps:
        problems.append(f"scale.warmup_steps={s.warmup_steps}: must be <= scale.steps ({s.steps})")
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        problems.append(f"seed={seed!r}: must be a whole number from 0 to 2**32 - 1")
    lang_rank = cfg.rank.lang
    if lang_rank is not None and (isinstance(lang_rank, bool) or not isinstance(lang_rank, int) or lang_rank < 1):
        problems.append(f"rank.lang={lang_rank!r}: must be an integer >= 1, or null for the method's ranks (rank=paper)")
    dropout = cfg.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"dropout={dropout!r}: must be a number in [0, 1) (feature dropout probability)")
    lr = cfg.train.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        problems.append(f"train.lr={lr!r}: must be a positive number")
    path = cfg.model.get("path")
    if path and not Path(str(path)).expanduser().is_dir():
        problems.append(f"model.path={path}: no such directory (a local model folder with config.json)")
    name = str(cfg.model.name)
    if not path and name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        problems.append(f"model.name={name}: no such directory; give a local model folder or a hub id like org/name")
    return problems


def data_problems(mixture: Mixture, root: Path) -> list[str]:
    """Every file the run reads must hold at least one example (an empty test file would
    otherwise fail only after training)."""
    problems = []
    for task, split, lang in mixture.required_files():
        path = reader.dataset_path(root, task, split, lang)
        if path.is_file() and not _has_line(path):
            problems.append(f"{path}: empty; the run reads its {split} split. Restore the file, or drop {lang} from the mixture's {task} languages")
    return problems


def _has_line(path: Path) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def check_run(cfg: DictConfig, mixture: Mixture) -> None:
    """Raise ConfigError listing every problem found (files are checked only once the
    settings are sound)."""
    problems = config_problems(cfg)
    if not problems:
        root = reader.resolve_root(cfg.data.root)
        mixture.check(root)  # missing files, with what exists
        problems = data_problems(mixture, root)
    if problems:
        raise ConfigError("bad run configuration:\n  " + "\n  ".join(problems))
