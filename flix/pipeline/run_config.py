"""A run's configuration: composing conf/train.yaml, its hash, and the mixture it names.

The hash names the run directory (conf/train.yaml `run_name`), so the same settings
always land in the same directory and a study skips what is done.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flix.data.mixture_files import load_mixture
from flix.data.mixtures import Mixture
from flix.pipeline import schema
from flix.record.setting import UNHASHED, decisive

CONF = Path(__file__).resolve().parents[2] / "conf"


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved configuration that decides a run's results (flix.record.setting
    `decisive`: the same part the report compares across seeds)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    for key in UNHASHED:  # before resolving: hydra's and run_name's interpolations need the hash
        container.pop(key, None)
    resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    return hashlib.sha256(json.dumps(decisive(resolved), sort_keys=True).encode()).hexdigest()[:10]


# conf/train.yaml names run directories with ${config_hash:}; registered with this module,
# which every entry point that composes the config imports for `compose` or `config_hash`.
OmegaConf.register_new_resolver("config_hash", lambda *, _root_: config_hash(_root_), replace=True)
schema.register()  # conf/train.yaml starts from the typed schema (flix.pipeline.schema)


def compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    """conf/train.yaml with the overrides, as `python -m flix.train` composes it
    (`hydra=True` keeps the hydra node, e.g. for the run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=hydra)


GROUPS = tuple(sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"))
# Names from the paper and the design card that are not options of the group they were given to.
HINTS = {
    ("mixture", "study_b"): "study_b is a study (Table 2), not a mixture: run `make study-b` or `python -m flix study study_b`",
    ("mixture", "ablations"): "ablations is a study (Tables 3-4): run `make ablations`",
    ("mixture", "zeroshot"): "the zero-shot mixture is mixture=zeroshot_sp",
    ("mixture", "single"): "single is a method: method=single (one adapter per dataset)",
    ("method", "lora"): "LoRA is method=compute_matched (rank of FLix's active rank) or method=param_matched",
}


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def override_problems(args: list[str], data: bool = False) -> list[str]:
    """What cannot work, found from the command line before Hydra runs (which would write a
    run folder and a failed.json for each, or print a traceback): group options that do not
    exist (`rank=1`, `mixture=study_b`), named with the choices and, for the paper's names,
    where that thing lives; keys that do not exist (`droput=0.5`, with the key meant); and
    the values flix.pipeline.checks refuses (`seed=abc`, `dropout=abc`), for every value of a sweep.
    data=True also checks what a run checks before it starts (flix.pipeline.checks.check_run:
    the data root and every file the mixture reads), the defaults' too."""
    problems = _group_problems(args)
    if problems:
        return problems
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except HydraException:  # a syntax error: Hydra's own message says where
        return []
    overrides = [o for o in overrides if not o.key_or_group.startswith("hydra")]
    if not overrides and not data:  # --help, or the defaults: nothing to check, and no composing (seconds)
        return []
    # each override's values, one per value of a sweep
    options = {
        o.input_line.partition("=")[0]: list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for o in overrides
    }
    first = {key: values[0] for key, values in options.items()}
    cfg = compose([f"{key}={first[key]}" for key in first if key.lstrip("+~") in GROUPS])
    keys = _keys(OmegaConf.to_container(cfg))
    for o in overrides:
        key, _, text = o.input_line.partition("=")
        if key[0] not in "+~" and key not in GROUPS and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}={text}?" if close else "`python -m flix.train --cfg job` lists every setting"
            problems.append(f"{o.input_line}: no such setting; {hint}")
    if problems:
        return problems
    from flix.pipeline.checks import config_problems

    lines = [first] + [first | {key: value} for key, values in options.items() for value in values[1:]]
    for line in lines:
        try:
            cfg = compose([f"{key}={value}" for key, value in line.items()])
        except (HydraException, ValueError) as err:  # a value of the wrong type (the schema's types)
            problem = _composition_problem(err)
            problems += [problem] if problem not in problems else []
            continue
        found = (config_problems(cfg) + quantize_problems(cfg)) or (_start_problems(cfg) if data else [])
        problems += [p for p in found if p not in problems]
    return problems


def quantize_problems(cfg: DictConfig) -> list[str]:
    """A quantized base that cannot run, found from the command line (flix.base_models.quantize
    and flix.pipeline.sharding say the same, but only once Hydra has made the run folder):
    bitsandbytes not installed, or FSDP, which shards floating-point weights."""
    method = cfg.model.get("quantize", "none")
    if method == "none":
        return []
    if cfg.train.get("parallel") == "fsdp":
        return [
            f"model.quantize={method} with train.parallel=fsdp: FSDP shards floating-point weights, not a quantized base; use model.quantize=none or train.parallel=ddp"
        ]
    if importlib.util.find_spec("bitsandbytes") is None:
        return [f'model.quantize={method} needs bitsandbytes, which is not installed: pip install -e ".[quant]", or use model.quantize=none']
    return []


def _start_problems(cfg: DictConfig) -> list[str]:
    """What flix.pipeline.checks.check_run refuses for a run of cfg, one line each."""
    from flix.data.mixtures import MixtureError
    from flix.data.reader import DataError
    from flix.pipeline.checks import PROBLEMS, ConfigError, check_run

    try:
        check_run(cfg, load_mixture_for(cfg))
    except (ConfigError, MixtureError, DataError) as err:
        return str(err).removeprefix(PROBLEMS).strip().split("\n  ")
    return []


def _composition_problem(err: Exception) -> str:
    """One line from Hydra's error and its cause, e.g. `scale.steps=abc: Value 'abc' of
    type 'str' could not be converted to Integer`."""
    head = str(err).splitlines()[0] if str(err) else type(err).__name__
    cause = err.__cause__ or err.__context__
    detail = str(cause).splitlines()[0] if cause is not None and str(cause) else ""
    return f"{head.removeprefix('Error merging override ')}: {detail}" if detail else head


_ABSENT = object()


def _keys(container: dict, prefix: str = "") -> list[str]:
    """Every setting's dotted key (train, train.lr, ...)."""
    keys = []
    for key, value in container.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += _keys(value, f"{prefix}{key}.")
    return keys


def _group_problems(args: list[str]) -> list[str]:
    problems = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") not in GROUPS:
            continue
        group = key.lstrip("+~")
        for option in value.split(","):  # a multirun sweep: -m method=flix,single
            if option and option not in choices(group):
                hint = HINTS.get((group, option)) or (
                    f"the language rank {option} is rank=lang{option}" if group == "rank" and f"lang{option}" in choices(group) else ""
                )
                if group == "rank" and not hint and option.lstrip("-").isdigit():
                    hint = "a language rank must be >= 1: rank=lang1, rank=lang2, or rank.lang=N for another"
                close = difflib.get_close_matches(option, choices(group), n=1)
                hint = hint or (f"did you mean {group}={close[0]}?" if close else "")
                problems.append(f"{group}={option}: no such option{'; ' + hint if hint else ''} (choices: {', '.join(choices(group))})")
    return problems


def load_mixture_for(cfg: DictConfig) -> Mixture:
    """The run's mixture: its data variant, cut to the scale's languages per task."""
    mixture = load_mixture(cfg.mixture, cfg.data.variant)
    if cfg.scale.max_langs_per_task:
        mixture = mixture.restrict(int(cfg.scale.max_langs_per_task))
    return mixture
