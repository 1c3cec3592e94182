"""Reading conf/mixture/NAME.yaml (or a config node) into a validated Mixture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flix.data.mixtures import KINDS, VARIANTS, EvalSet, Mixture, MixtureError, validate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "mixture"


def _plain(cfg: dict | DictConfig) -> dict:
    """A plain dict from a Hydra/omegaconf node (interpolations resolved) or a dict."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _eval_set(raw: Any, train: dict, key: str) -> EvalSet:
    if not isinstance(raw, dict) or "task" not in raw:
        raise MixtureError(f"{key}: an eval set needs at least `task` (and `name`), got {raw!r}.")
    unknown = set(raw) - {"name", "task", "langs", "zero_shot"}
    if unknown:
        raise MixtureError(f"{key}: unknown keys {sorted(unknown)}.")
    task = raw["task"]
    langs = raw.get("langs")
    if langs is None:
        if raw.get("zero_shot") or task not in train:
            raise MixtureError(f"{key}: give `langs`; only supervised sets of a trained task default to its training languages.")
        langs = train[task]
    return EvalSet(str(raw.get("name", task)), task, list(langs), raw.get("zero_shot"))


def load_mixture(cfg: dict | DictConfig, variant: str) -> Mixture:
    """Resolve one variant ("official" or "mini") of a mixture config and validate it."""
    if variant not in VARIANTS:
        raise MixtureError(f"Unknown mixture variant {variant!r}; variants are: {', '.join(VARIANTS)}.")
    cfg = _plain(cfg)
    name = cfg.get("name")
    if not name:
        raise MixtureError(f"A mixture config needs a `name`; got keys {sorted(cfg)}.")
    where = f"conf/mixture/{name}.yaml"
    if "kind" not in cfg:
        raise MixtureError(f"{where}: missing `kind` ({', '.join(KINDS)}).")
    section = cfg.get(variant)
    if not isinstance(section, dict) or not isinstance(section.get("train"), dict):
        raise MixtureError(f"{where}: missing `{variant}.train` (a mapping task -> languages).")
    train = {task: list(langs or []) for task, langs in section["train"].items()}
    raw_eval = section.get("eval") or []
    eval_sets = [_eval_set(r, train, f"{where}: {variant}.eval[{i}]") for i, r in enumerate(raw_eval)]
    if not eval_sets:
        raise MixtureError(f"{where}: `{variant}.eval` is empty; nothing would be scored.")
    mixture = Mixture(
        name=name,
        kind=cfg["kind"],
        variant=variant,
        train=train,
        eval_sets=eval_sets,
        notes=str(section.get("notes") or "").strip(),
    )
    validate(mixture)
    return mixture


def mixture_names(conf_dir: str | Path | None = None) -> list[str]:
    """Names of the mixture files in the config group."""
    return sorted(path.stem for path in Path(conf_dir or CONF_DIR).glob("*.yaml"))


def load_mixture_by_name(name: str, variant: str, conf_dir: str | Path | None = None) -> Mixture:
    """Read conf/mixture/NAME.yaml."""
    path = Path(conf_dir or CONF_DIR) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(mixture_names(conf_dir)) or "none"
        raise MixtureError(f"No mixture file {path}; mixtures are: {known}.")
    return load_mixture(OmegaConf.load(path), variant)
