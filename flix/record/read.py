"""Reading what a run recorded: results.json or failed.json as a `RunRecord`, the typed
view the report and the study use instead of keys. Everything that places a run in a
table cell comes from the record itself (its resolved config, its FLix block), never
from today's conf/: a record reads the same whatever the code or conf/ became since.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from flix.io import read_regular_text
from flix.record.check import check_results
from flix.record.setting import setting
from flix.record.write import EXAMPLE_KEYS, FAILED, SCORE_KEYS

# what reading a damaged or hand-edited record can raise: the report names and skips it
READ_ERRORS = (OSError, ValueError, TypeError, AttributeError, RecursionError)


@dataclass(frozen=True)
class SetRecord:
    """One evaluation set of a finished run (results.json `eval_sets`): what it scores, and
    its averages over its languages (None: not scored, or not recorded)."""

    task: str
    langs: list[str]
    zero_shot: str | None
    validation: float | None = None
    test: float | None = None
    validation_nll: float | None = None
    test_nll: float | None = None

    def average(self, split: str, nll: bool = False) -> float | None:
        """The paper's metric, or (nll) the mean gold target NLL, on `split`."""
        return getattr(self, f"{split}_nll" if nll else split)


@dataclass(frozen=True)
class Adapters:
    """What a run trained (results.json `flix`, its FLixConfig), as recorded."""

    features: object  # {group: [values]}; {} for none
    shared_rank: object  # the always-on adapter's rank; 0 for none

    @property
    def kind(self) -> tuple[bool, bool]:
        """(feature adapters, an always-on adapter)."""
        return bool(self.features), bool(self.shared_rank)


@dataclass(frozen=True)
class Training:
    """What a finished run's training cost and did (results.json; None where not recorded):
    the report's runs table."""

    seconds: float | None  # the whole run's wall time: training, validation, test
    train_seconds: float | None  # the training steps alone
    best_step: object  # the kept step; {dataset: step} for one adapter per dataset
    featureless: float | None  # mean fraction of training examples that had no adapter
    last_loss: float | None  # the last step's training loss (mean over adapters)
    validations: tuple = ()  # (step, average score, NLL) at each validation (None: not recorded)


@dataclass
class RunRecord:
    """One run directory: who the run is, and either its results or why it failed."""

    path: Path
    method: str | None = None
    mixture: str | None = None
    seed: int | None = None
    scale: str | None = None
    dropout: float | None = None
    lang_rank: int | None = None  # None: the method's ranks for the mixture kind
    dropout_mode: str = "independent"
    features: bool | None = None  # whether the method has feature adapters (dropout matters); None: not recorded
    setting: dict = field(default_factory=dict)  # flix.record.setting: what must agree across seeds
    failure: str | None = None  # failed.json's error, first line
    finished: bool = False
    named_method: str | None = None  # results.json `method` (the config's must agree)
    adapters: Adapters | None = None
    eval_sets: dict[str, SetRecord] = field(default_factory=dict)
    scores: dict[str, dict] = field(default_factory=dict, repr=False)  # SCORE_KEYS -> {task: {lang: value}}
    # per test example, {task: {lang: [one per example, in one order]}}; None: not recorded
    test_ids: dict | None = field(default=None, repr=False)
    test_stats: dict | None = field(default=None, repr=False)  # flix.metrics.example_stats
    test_example_nll: dict | None = field(default=None, repr=False)  # one per test_nll_ids
    test_nll_ids: dict | None = field(default=None, repr=False)  # records before it: test_ids
    model: str | None = None
    data_root: str | None = None
    variant: str | None = None
    commit: str | None = None
    versions: dict = field(default_factory=dict)
    training: Training | None = None

    def score(self, split: str, task: str, lang: str) -> float | None:
        """One language's score on `split` (the paper's metric; None: not scored)."""
        return self.scores.get(split, {}).get(task, {}).get(lang)


def identity(config: dict) -> dict:
    """Who a run is, from its resolved config (results.json and failed.json `config`):
    what the report selects runs by. ValueError or TypeError for values no run has."""

    def name(key):
        value = config.get(key)
        return value.get("name") if isinstance(value, dict) else value

    rank, train, method = config.get("rank") or {}, config.get("train") or {}, config.get("method")
    seed, dropout, lang_rank = config.get("seed"), config.get("dropout"), rank.get("lang")
    features = method.get("features") if isinstance(method, dict) else None
    return {
        "method": name("method"),
        "mixture": name("mixture"),
        "scale": name("scale"),
        "seed": None if seed is None else int(seed),
        "dropout": None if dropout is None else float(dropout),
        "lang_rank": None if lang_rank is None else int(lang_rank),
        "dropout_mode": train.get("dropout_mode") or "independent",
        "features": features if isinstance(features, bool) else None,  # records before conf/method had it: None
    }


def is_flix_results(results) -> bool:
    """Whether a results.json is a flix run's (others under a runs root are left out): one
    with a method or evaluation sets is, and must then be whole (flix.record.check)."""
    return isinstance(results, dict) and ("method" in results or "eval_sets" in results)


def read_results(path: Path) -> RunRecord | None:
    """A finished run; None for a results.json that is not a flix run's. ValueError if the
    file cannot be trusted: not a regular file, or not what flix.record.check says a record
    must be (types, ranges, plain names, averages, its run's folder)."""
    results = json.loads(read_regular_text(path))
    if not isinstance(results, dict):
        raise ValueError("not a JSON object")
    config = results.get("config") or {}
    known = identity(config)
    if not is_flix_results(results):
        return None
    check_results(results, path.parent)
    flix = results.get("flix")
    adapters = Adapters(flix.get("features"), flix.get("shared_rank")) if isinstance(flix, dict) else None
    if known["features"] is None and adapters is not None:  # a record whose config does not say: what it trained
        known["features"] = adapters.kind[0]
    return RunRecord(
        path=path.parent,
        **known,
        setting=setting(config) | ({"data_root": json.dumps(results["data_root"])} if results.get("data_root") else {}),
        finished=True,
        named_method=results["method"],
        adapters=adapters,
        eval_sets={name: _set_record(entry) for name, entry in results["eval_sets"].items()},
        scores={key: results[key] for key in SCORE_KEYS if key in results},
        **{key: results.get(key) for key in EXAMPLE_KEYS if key != "test_nll_ids"},
        test_nll_ids=results.get("test_nll_ids") or results.get("test_ids"),
        model=results.get("model"),
        data_root=results.get("data_root"),
        variant=results.get("variant"),
        commit=results.get("commit"),
        versions=results.get("versions") or {},
        training=_training(results),
    )


def _training(results: dict) -> Training:
    def per_adapter(key):  # a merged record (one adapter per dataset) keeps a value per dataset
        value = results.get(key)
        return list(value.values()) if isinstance(value, dict) else [value]

    def number(value):
        return float(value) if _finite(value) else None

    last = [number(losses[-1]) for losses in per_adapter("train_loss") if isinstance(losses, list) and losses]
    fractions = [number(f) for fs in per_adapter("featureless_fraction") if isinstance(fs, list) for f in fs]
    return Training(
        seconds=number(results.get("time_seconds")),
        train_seconds=number(results.get("train_seconds")),
        best_step=results.get("best_step"),
        featureless=_mean(fractions),
        last_loss=_mean(last),
        validations=tuple(
            (h["step"], number(h.get("validation_average")), number(h.get("validation_nll")))
            for h in (results.get("history") if isinstance(results.get("history"), list) else [])
            if isinstance(h, dict) and isinstance(h.get("step"), int)
        ),
    )


def _mean(values: list) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


def _set_record(entry: dict) -> SetRecord:
    averages = {key: entry.get(key) for key in SCORE_KEYS}
    return SetRecord(entry["task"], list(entry.get("langs") or []), entry.get("zero_shot"), **averages)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_failure(path: Path) -> RunRecord:
    """A failed run, never a crash on odd files: without a config it matches no cell."""
    try:
        data = json.loads(read_regular_text(path))
    except (OSError, ValueError) as error:
        data = {"error": f"unreadable {FAILED} ({error})"}
    data = data if isinstance(data, dict) else {"error": str(data)}
    reason = str(data.get("error") or "").strip() or "no reason recorded"
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    return RunRecord(path=path.parent, **identity(config), setting=setting(config), failure=reason.splitlines()[0])
