"""What a results.json must be before the report or a study uses it: one schema (types,
ranges, plain names, set averages that agree with their languages' scores) and a run
identity that agrees with the folder the record sits in. Records are input (committed,
copied, edited by hand): `check_results` raises ValueError naming the first key that is
wrong, and the caller names the file and skips it, never a traceback.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from flix.record.write import EXAMPLE_KEYS, SCORE_KEYS

# A name that becomes part of a path or a cell (mixture, method, scale, task, language,
# evaluation set): no separators, no leading dot or sign, nothing a shell or a sheet reads.
PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# conf/train.yaml run_name: METHOD-drop{dropout}-rank{rank.name}-seed{seed}-{config_hash}
RUN_NAME = "{method}-drop{dropout}-rank{rank}-seed{seed}-{hash}"
NAMED_BY_HASH = re.compile(r".+-seed.+-[0-9a-f]{10}")  # a folder the pipeline named (not hydra.run.dir's)
TEXT_KEYS = ("model", "data_root", "variant", "commit", "study")


def plain(name, key: str) -> str:
    """`name` if it is a plain name; else ValueError naming `key`."""
    if not isinstance(name, str) or not PLAIN.fullmatch(name) or ".." in name:
        raise ValueError(f"{key} is {name!r}, not a plain name (letters, digits, _ . -)")
    return name


def one_line(text, key: str) -> None:
    """Recorded text shown on pages (a model, a commit, a version): a string without line
    breaks or control characters (a newline would end a LaTeX comment)."""
    if text is None:
        return
    if not isinstance(text, str) or any(ord(ch) < 32 or ch in "\x7f\x85\u2028\u2029" for ch in text):
        raise ValueError(f"{key} is {text!r}, not one line of text")


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_results(results: dict, run_dir: Path | None = None) -> None:
    """The whole schema of a flix results.json (flix/record/__init__.py lists its keys);
    `run_dir`: the folder it sits in, which its recorded run name must be."""
    for key in ("method", "mixture", "scale"):
        plain(results.get(key), key)
    for key in TEXT_KEYS:
        one_line(results.get(key), key)
    versions = results.get("versions")
    if versions is not None:
        if not isinstance(versions, dict):
            raise ValueError(f"versions is {versions!r}, not a {{package: version}} object")
        for name, value in versions.items():
            one_line(name, "versions")
            one_line(str(value) if finite(value) else value, f"versions.{name}")
    _check_config(results.get("config"), results)
    scores = {key: _score_table(results, key) for key in SCORE_KEYS if key in results or key in ("validation", "test")}
    _check_eval_sets(results.get("eval_sets"), scores)
    for key in EXAMPLE_KEYS:
        _check_examples(results.get(key), key)
    _check_example_scores(results, scores)
    if run_dir is not None:
        check_run_name(results, run_dir)


def _check_config(config, results: dict) -> None:
    if not isinstance(config, dict):
        raise ValueError("config is not an object (the resolved config the run is identified by)")
    for key in ("method", "mixture", "scale"):
        section = config.get(key)
        name = section.get("name") if isinstance(section, dict) else section
        plain(name, f"config.{key}.name")
        if key != "method" and name != results.get(key):  # method: named by the report's own check
            raise ValueError(f"{key} {results.get(key)!r} but its config says {name!r}")
    seed, dropout = config.get("seed"), config.get("dropout")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"config.seed is {seed!r}, not an integer")
    if dropout is not None and not (finite(dropout) and 0 <= dropout < 1):
        raise ValueError(f"config.dropout is {dropout!r}, not a number in [0, 1)")
    rank = config.get("rank") if config.get("rank") is not None else {}
    lang = rank.get("lang") if isinstance(rank, dict) else "?"
    if lang is not None and not (isinstance(lang, int) and not isinstance(lang, bool) and lang >= 1):
        raise ValueError(f"config.rank.lang is {lang!r}, not null or an integer >= 1")
    train = config.get("train") if config.get("train") is not None else {}
    mode = train.get("dropout_mode", "independent") if isinstance(train, dict) else None
    plain(mode, "config.train.dropout_mode")


def _score_table(results: dict, key: str) -> dict:
    """{task: {language: finite number}}."""
    table = results.get(key)
    if not isinstance(table, dict) or not all(isinstance(langs, dict) for langs in table.values()):
        raise ValueError(f"{key} is not a {{task: {{language: score}}}} object")
    for task, langs in table.items():
        plain(task, f"{key} task")
        for lang, score in langs.items():
            plain(lang, f"{key} language of {task}")
            if not finite(score):
                raise ValueError(f"{key} score of {task}/{lang} is {score!r}, not a finite number")
    return table


def _check_eval_sets(sets, scores: dict) -> None:
    """Every set names its task and languages, and each recorded average is the mean of
    its languages' scores (a table cell reads the average, an interval the languages)."""
    if sets is None or sets == {}:
        raise ValueError("no eval_sets: a results.json names the sets it was scored on (a record of older code, or edited)")
    if not isinstance(sets, dict):
        raise ValueError("eval_sets is not a {name: {task: ..., langs: [...], ...}} object")
    for name, entry in sets.items():
        plain(name, "eval_sets name")
        if not isinstance(entry, dict):
            raise ValueError(f"eval_sets {name} is not an object")
        task, langs, zero = entry.get("task"), entry.get("langs"), entry.get("zero_shot")
        plain(task, f"eval_sets {name} task")
        if not isinstance(langs, list) or not langs:
            raise ValueError(f"eval_sets {name} langs is {langs!r}, not a list of languages")
        for lang in langs:
            plain(lang, f"eval_sets {name} language")
        if zero is not None:
            plain(zero, f"eval_sets {name} zero_shot")
        for key in SCORE_KEYS:
            value = entry.get(key)
            if value is None:
                continue
            if not finite(value):
                raise ValueError(f"eval_sets {name} {key} is {value!r}, not a finite number")
            if key not in scores:  # no per-language table to check it against (a hand-made record)
                continue
            found = [scores[key][task][lang] for lang in langs if lang in scores.get(key, {}).get(task, {})]
            mean = math.fsum(found) / len(found) if found else None
            if mean is None or not math.isclose(value, mean, rel_tol=1e-6, abs_tol=1e-6):
                raise ValueError(f"eval_sets {name} {key} is {value!r}, but its languages' {key} scores average {mean!r}")


def _check_examples(table, key: str) -> None:
    """Per test example: {task: {language: [entries]}}, every number finite."""
    if table is None:
        return
    if not isinstance(table, dict) or not all(isinstance(langs, dict) for langs in table.values()):
        raise ValueError(f"{key} is not a {{task: {{language: [one per example]}}}} object")
    for task, langs in table.items():
        for lang, entries in langs.items():
            if not isinstance(entries, list):
                raise ValueError(f"{key} of {task}/{lang} is {type(entries).__name__}, not a list (one per example)")
            if key in ("test_stats", "test_example_nll") and not all(_all_finite(e) for e in entries):
                raise ValueError(f"{key} of {task}/{lang} holds a value that is not a finite number")


def _check_example_scores(results: dict, scores: dict) -> None:
    """Each test score is what its examples' statistics give (the report's intervals resample
    those), each test NLL the mean of its examples' NLL: a score edited alone is refused."""
    from flix.metrics import TASK_METRIC, score_from_stats

    for key, table, of in (("test_stats", "test", score_from_stats), ("test_example_nll", "test_nll", lambda _, v: math.fsum(v) / len(v))):
        if table not in scores:  # no per-language table to check them against (a hand-made record)
            continue
        for task, langs in (results.get(key) or {}).items():
            for lang, entries in langs.items():
                if not entries:
                    continue
                if key == "test_stats":
                    if task not in TASK_METRIC or len({len(e) if isinstance(e, list) else -1 for e in entries}) != 1:
                        raise ValueError(f"{key} of {task}/{lang} is not one row of {TASK_METRIC.get(task, 'its task')} statistics per example")
                    entries = [math.fsum(column) for column in zip(*entries)]
                try:
                    value = of(task, entries)
                except (ValueError, TypeError, IndexError, ZeroDivisionError) as err:
                    raise ValueError(f"{key} of {task}/{lang} cannot be scored ({err})") from None
                recorded = scores[table].get(task, {}).get(lang)
                if recorded is None or not math.isclose(recorded, value, rel_tol=1e-6, abs_tol=1e-6):
                    raise ValueError(f"{table} score of {task}/{lang} is {recorded!r}, but its examples' {key} give {value!r}")


def _all_finite(entry) -> bool:
    if isinstance(entry, list):
        return all(_all_finite(e) for e in entry)
    return finite(entry)


def expected_run_name(config: dict, config_hash: str) -> str:
    """The run directory's name the pipeline gives a run of `config` (conf/train.yaml run_name)."""
    rank = config.get("rank") or {}
    return RUN_NAME.format(
        method=config["method"]["name"] if isinstance(config.get("method"), dict) else config.get("method"),
        dropout=config.get("dropout"),
        rank=rank.get("name") if isinstance(rank, dict) else rank,
        seed=config.get("seed"),
        hash=config_hash,
    )


def check_run_name(results: dict, run_dir: Path) -> None:
    """A record that names its run (config.run_name, recorded since run directories were
    named by hash) sits in that run's folder, and its name agrees with its own config and
    config_hash: a record copied or edited into another run's place is refused."""
    config = results["config"]
    name, config_hash = config.get("run_name"), results.get("config_hash")
    if name is None:
        return  # records of hand-named folders (hydra.run.dir) do not say
    if config_hash is None or name != expected_run_name(config, config_hash):
        raise ValueError(f"its run name {name!r} is not what its config and config_hash {config_hash!r} make")
    if NAMED_BY_HASH.fullmatch(Path(run_dir).name) and Path(run_dir).name != name:
        raise ValueError(f"the record of run {name!r} sits in a folder named {Path(run_dir).name!r}")
