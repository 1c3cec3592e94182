"""What decides a run's results: its resolved config without what does not change them.
The pipeline hashes it into the run directory's name (flix.pipeline.run_config
`config_hash`); the report compares it across seeds (`setting`) and averages only runs
of one setting. Both must agree, so both use `decisive`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from flix.data.mixtures import VARIANTS

# Keys that do not change what a run computes: left out of its hash. (data.root stays in:
# a subsample and the full release are different runs.) `run_name` holds the hash itself.
# Runs made before a change to what is hashed keep their directories; studies do not
# reuse them (they run again), the report still reads them.
UNHASHED = ("hydra", "logger", "force", "wait", "study", "table", "run_name")
# How fast or how spread out, not what: kernels, FSDP, packing and the micro-batches' token
# budget compute the same to float rounding (a step's loss is its targets' sum / their count).
UNHASHED_NESTED = (
    ("train", "threads"),
    ("scale", "cpu_kernels"),
    ("train", "parallel"),
    ("scale", "packing"),
    ("scale", "tokens_per_micro_batch"),
)
# Keys added after runs were recorded, left out at the value every older run had, so
# that those runs keep their hash (a quantized base is another run; a float one is not).
HASHED_UNLESS = {("model", "quantize"): "none", ("scale", "test_nll_examples"): None, ("scale", "select_by"): "metric"}


def decisive(resolved: dict) -> dict:
    """A resolved config without what does not change results (a copy): the UNHASHED
    keys, the mixture's notes and its variant the run does not use; the data root as its
    real path, symlinks resolved (the same data given two ways is one run)."""
    container = copy.deepcopy(resolved)
    for key in UNHASHED:
        container.pop(key, None)
    for section, key in UNHASHED_NESTED:
        if isinstance(container.get(section), dict):
            container[section].pop(key, None)
    for (section, key), neutral in HASHED_UNLESS.items():
        if isinstance(container.get(section), dict) and container[section].get(key, neutral) == neutral:
            container[section].pop(key, None)
    data, mixture = container.get("data"), container.get("mixture")
    if isinstance(data, dict) and data.get("root"):
        data["root"] = os.path.realpath(os.path.expanduser(str(data["root"])))
    if isinstance(data, dict) and isinstance(mixture, dict):
        for variant in VARIANTS:
            if variant != data.get("variant"):
                mixture.pop(variant, None)
            elif isinstance(mixture.get(variant), dict):
                mixture[variant].pop("notes", None)
    return container


def setting(resolved: dict) -> dict[str, str]:
    """A recorded (resolved) config as flat key -> value, without the seed and what the
    hash leaves out: runs of one setting differ only by seed (the report averages those)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = json.dumps(value, sort_keys=True)

    walk("", {k: v for k, v in decisive(resolved).items() if k != "seed"})
    return flat


def as_recorded(resolved: dict) -> dict:
    """`decisive` with the data root by its folder's name, as records keep it
    (flix.record.write `portable`): a record compares with a planned run through this."""
    data = resolved.get("data")
    if isinstance(data, dict) and data.get("root"):
        resolved = {**resolved, "data": {**data, "root": Path(str(data["root"])).name}}
    container = decisive(resolved)
    if isinstance(container.get("data"), dict) and container["data"].get("root"):
        container["data"]["root"] = Path(container["data"]["root"]).name
    return container


def same_run(recorded: dict, planned: dict, recorded_hash: str | None, run_name: str) -> None:
    """ValueError unless a record (its config and config_hash) is the planned run's
    (`planned`: its resolved config; `run_name`: its folder's name, ending in its hash):
    an edited record (another dropout, more steps) or one of another run never stands in."""
    if not isinstance(recorded, dict):
        raise ValueError("its config is not an object")
    if not recorded_hash or not run_name.endswith(f"-{recorded_hash}"):
        raise ValueError(f"its config_hash {recorded_hash!r} is not the hash of run {run_name}")
    flat = [dict(_flat(as_recorded(c))) for c in (recorded, planned)]
    differ = sorted(k for k in flat[0].keys() | flat[1].keys() if flat[0].get(k) != flat[1].get(k))
    if differ:
        shown = "; ".join(f"{k}: {flat[0].get(k, 'absent')} recorded, {flat[1].get(k, 'absent')} planned" for k in differ[:3])
        raise ValueError(f"its config is not run {run_name}'s ({shown}{' ...' if len(differ) > 3 else ''})")


def _flat(value, prefix: str = ""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flat(inner, f"{prefix}{key}.")
    else:
        yield prefix[:-1], json.dumps(value, sort_keys=True)
