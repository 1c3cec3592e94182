"""Checks a run's configuration and data before any model loads or any file is written,
so a bad setting fails in a second with one message, not after an hour of training."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from flix.data import reader
from flix.data.mixtures import Mixture
from flix.pipeline.schema import range_problems


class ConfigError(ValueError):
    """A setting or input file that cannot work; the message names it and what to do."""


PROBLEMS = "bad run configuration:\n  "  # ConfigError's head, then one problem a line


def config_problems(cfg: DictConfig) -> list[str]:
    """Values outside the ranges the schema declares (flix.pipeline.schema; types were
    checked when the config was composed), and what the schema cannot say."""
    problems = range_problems(cfg)
    s = cfg.scale
    if not problems and s.warmup_steps > s.steps:
        problems.append(f"scale.warmup_steps={s.warmup_steps}: must be <= scale.steps ({s.steps})")
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


def check_run(cfg: DictConfig, mixture: Mixture) -> Path:
    """The run's data root, resolved once (cfg.data.root, else FLIX_DATA_ROOT) and holding
    every file the mixture reads; else ConfigError listing every problem found (files, and
    an API key for online W&B, are checked only once the settings are sound)."""
    from flix.pipeline.tracking import wandb_key_problems

    problems = config_problems(cfg)
    if not problems:
        root = reader.resolve_root(cfg.data.root)
        mixture.check(root)  # missing files, with what exists
        problems = data_problems(mixture, root) + wandb_key_problems(cfg.logger)
    if problems:
        raise ConfigError(PROBLEMS + "\n  ".join(problems))
    return root
