"""Per-language validation and test scores of every method, per mixture (paper appendices C, D).

Only the default configuration (dropout 0.7, the paper's ranks) is shown: the Table 3/4
ablations are theirs alone. Each evaluation set is its own section, as in the paper,
so zero-shot languages never mix into a supervised average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from flix.record import RunRecord, SetRecord
from flix.report.collect import RunIndex, Selection
from flix.report.labels import METHOD_LABELS

SPLITS = ("validation", "test")
AVERAGE = "Average"


@dataclass
class Section:
    """One evaluation set: rows languages then Average, columns (method, split)."""

    name: str
    task: str
    zero_shot: str | None
    frame: pd.DataFrame


@dataclass
class Appendix:
    mixture: str
    sections: list[Section]
    runs: dict[str, list[RunRecord]]  # method label -> the runs averaged


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else np.nan


def _section(name: str, info: SetRecord, runs: dict[str, list[RunRecord]]) -> Section:
    langs = list(dict.fromkeys(lang for rs in runs.values() for r in rs if name in r.eval_sets for lang in r.eval_sets[name].langs))
    columns = pd.MultiIndex.from_product([list(runs), SPLITS], names=["method", "split"])
    frame = pd.DataFrame(index=pd.Index(langs + [AVERAGE], name="language"), columns=columns, dtype=float)
    task = info.task
    for method, rs in runs.items():
        for split in SPLITS:
            for lang in langs:
                frame.loc[lang, (method, split)] = _mean([r.score(split, task, lang) for r in rs])
            frame.loc[AVERAGE, (method, split)] = _mean([r.eval_sets[name].average(split) if name in r.eval_sets else None for r in rs])
    return Section(name, task, info.zero_shot, frame)


def build_appendix(index: RunIndex, mixture: str) -> Appendix | None:
    runs = {label: index.select(Selection(m, mixture))[0] for m, label in METHOD_LABELS.items()}
    runs = {m: rs for m, rs in runs.items() if rs}
    if not runs:
        return None
    sets = {name: info for rs in runs.values() for r in rs for name, info in r.eval_sets.items()}
    return Appendix(mixture, [_section(name, info, runs) for name, info in sets.items()], runs)


def build_appendices(index: RunIndex) -> list[Appendix]:
    mixtures = dict.fromkeys(r.mixture for r in index.finished)
    return [a for m in mixtures if (a := build_appendix(index, m)) is not None]
