"""Tables 1-5: which runs and evaluation sets fill each cell, laid out as the paper's CSVs.

The paper CSV gives the layout (row labels, column headers, Avg.); the specs here map
each row and column to a Selection of runs and the evaluation sets averaged in it.
Every cell keeps the runs it came from, so pages can state seeds, models and commits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from flix.data.mixtures import CONF_DIR, VARIANTS, load_mixture_by_name
from flix.report import uncertainty
from flix.report.collect import PAPER_RANK, Run, RunIndex, Selection

AVG = "Avg."
DASH = "–"
PAPER_FILES = {
    "table1": "table1_study_a.csv",
    "table2": "table2_study_b.csv",
    "table3": "table3_dropout.csv",
    "table4": "table4_rank.csv",
    "table5": "table5_shared.csv",
}
TITLES = {
    "table1": "Table 1: Study A, joint multitask multilingual learning (test)",
    "table2": "Table 2: Study B, multilingual or multitask learning (test)",
    "table3": "Table 3: FLix feature dropout on multilingual in-language QA",
    "table4": "Table 4: FLix language-feature rank on the multilingual mixtures (test)",
    "table5": "Table 5: FLix with shared parameters, Study A mixture (test)",
}
METHOD_ROWS = {"Compute-matched": "compute_matched", "Param-matched": "param_matched", "FLix": "flix"}
MULTILINGUAL = {
    "ner": "multilingual_ner",
    "semantic_parsing": "multilingual_semantic_parsing",
    "qa_in_lang": "multilingual_qa_in_lang",
    "qa_cross_lang": "multilingual_qa_cross_lang",
}


@dataclass(frozen=True)
class Source:
    """A cell's recipe: the runs, the evaluation sets (None: every supervised set of the
    mixture, averaged: one set for multilingual mixtures, the tasks for multitask), the split."""

    selection: Selection
    sets: tuple[str, ...] | None = None
    split: str = "test"


@dataclass
class Cell:
    value: float | None
    paper: float | None
    runs: list[Run] = field(default_factory=list)
    notes: list[int] = field(default_factory=list)
    # bootstrap replicates of the value (test cells whose runs recorded per-example statistics)
    samples: np.ndarray | None = field(default=None, repr=False)
    # FLix rows: paired differences from the baselines' cells of the same column, by method
    versus: dict[str, uncertainty.Difference] = field(default_factory=dict)

    @property
    def interval(self) -> tuple[float, float] | None:
        return None if self.samples is None else uncertainty.interval(self.samples)

    @property
    def diff(self) -> float | None:
        return None if self.value is None or self.paper is None else self.value - self.paper


@dataclass
class Table:
    name: str
    title: str
    row_header: str
    columns: list[str]
    rows: list[tuple[str, list[Cell]]]
    footnotes: list[str]

    @property
    def runs(self) -> list[Run]:
        seen = {id(r): r for _, cells in self.rows for c in cells for r in c.runs}
        return list(seen.values())

    def row_seeds(self, cells: list[Cell]) -> list[int]:
        return sorted({r.seed for c in cells for r in c.runs if r.seed is not None})

    def counts(self) -> tuple[int, int]:
        """(filled, missing) cells, Avg. included."""
        cells = [c for _, row in self.rows for c in row]
        filled = sum(c.value is not None for c in cells)
        return filled, len(cells) - filled


def zero_shot_set(mixture: str) -> str:
    """The name of a mixture's one zero-shot evaluation set, from conf/mixture/<name>.yaml."""
    names = {s.name for v in VARIANTS for s in load_mixture_by_name(mixture, v, CONF_DIR).eval_sets if s.zero_shot}
    if len(names) != 1:
        raise ValueError(f"conf/mixture/{mixture}.yaml: expected one zero-shot set name, found {sorted(names)}")
    return names.pop()


def specs() -> dict[str, dict[str, dict[str, Source]]]:
    """table -> row label -> column label -> Source (Avg. columns are computed)."""
    rank2 = (PAPER_RANK, 2)  # multilingual mixtures: the paper's language rank is 2
    study_a = {
        "NER": "ner",
        "Semantic Parsing": "semantic_parsing",
        "QA InLang": "qa_in_lang",
        "QA CrossLang": "qa_cross_lang",
        "Zero-shot Unseen Comb: QA CrossLang": "qa_cross_lang_unseen_comb",
        "Zero-shot Unseen Lang: QA CrossLang": "qa_cross_lang_unseen_lang",
    }
    zs_sp = zero_shot_set("zeroshot_sp")

    def table1(method):
        cols = {col: Source(Selection(method, "study_a"), (name,)) for col, name in study_a.items()}
        cols["Zero-shot Unseen Comb: Semantic parsing"] = Source(Selection(method, "zeroshot_sp"), (zs_sp,))
        return cols

    def table2(method):
        labels = {"NER": "ner", "Semantic Parsing": "semantic_parsing", "QA InLang": "qa_in_lang", "QA CrossLang": "qa_cross_lang"}
        cols = {f"Multilingual {label}": Source(Selection(method, MULTILINGUAL[task])) for label, task in labels.items()}
        cols["Multitask Swahili"] = Source(Selection(method, "multitask_sw"))
        cols["Multitask Bengali"] = Source(Selection(method, "multitask_bn"))
        return cols

    def table4(ranks):
        labels = {"QA CrossLang": "qa_cross_lang", "QA InLang": "qa_in_lang", "Semantic Parsing": "semantic_parsing", "NER": "ner"}
        return {label: Source(Selection("flix", MULTILINGUAL[task], lang_ranks=ranks)) for label, task in labels.items()}

    def table5(method):
        labels = {"QA InLang": "qa_in_lang", "QA CrossLang": "qa_cross_lang", "Semantic parsing": "semantic_parsing", "NER": "ner"}
        return {label: Source(Selection(method, "study_a"), (name,)) for label, name in labels.items()}

    dropout = {f"{p:.1f}": Selection("flix", "multilingual_qa_in_lang", dropout=p) for p in (0.7, 0.5, 0.3, 0.0)}
    return {
        "table1": {label: table1(m) for label, m in METHOD_ROWS.items()},
        "table2": {label: table2(m) for label, m in METHOD_ROWS.items()},
        "table3": {p: {"Validation": Source(s, split="validation"), "Test": Source(s)} for p, s in dropout.items()},
        "table4": {"2": table4(rank2), "1": table4((1,))},
        "table5": {"FLix": table5("flix"), "+ shared parameters": table5("flix_shared"), "Compute-matched LoRA": table5("compute_matched")},
    }


def read_paper(paper_dir: str | Path, name: str) -> pd.DataFrame:
    """A paper table: index the row labels (as written), float columns."""
    frame = pd.read_csv(Path(paper_dir) / PAPER_FILES[name], dtype=str)
    frame = frame.set_index(frame.columns[0])
    return frame.astype(float)


def run_value(run: Run, source: Source) -> float | None:
    """One run's number for a cell: the mean of the sets' averages, None if any is absent."""
    sets = run.eval_sets
    names = source.sets or [n for n, s in sets.items() if not s.get("zero_shot")]
    values = [(sets.get(n) or {}).get(source.split) for n in names]
    if not names or any(v is None for v in values):
        return None
    return float(np.mean(values))


class Footnotes:
    """Numbered, de-duplicated notes of one table."""

    def __init__(self):
        self.texts: list[str] = []

    def add(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1


def fill(source: Source, paper: float | None, index: RunIndex, notes: Footnotes) -> Cell:
    """Average a cell over its finished runs (seeds); note what is missing or failed."""
    finished, failed = index.select(source.selection)
    scored = [(r, run_value(r, source)) for r in finished]
    used = [(r, v) for r, v in scored if v is not None]
    cell = Cell(float(np.mean([v for _, v in used])) if used else None, paper, [r for r, _ in used])
    cell.samples = bootstrap(source, cell.runs)
    what = source.selection.describe()
    for run in failed:
        seed = f"seed {run.seed}" if run.seed is not None else "a run"
        cell.notes.append(notes.add(f"{what}, {seed}: run failed ({run.failure}) [{run.path}]"))
    for run, value in scored:
        if value is None:
            sets = ", ".join(source.sets) if source.sets else "its supervised sets"
            cell.notes.append(notes.add(f"{what}, seed {run.seed}: no {source.split} score for {sets} [{run.path}]"))
    if not finished and not failed:
        cell.notes.append(notes.add(f"missing run: {what} under {index.root}"))
    return cell


def bootstrap(source: Source, runs: list[Run]) -> np.ndarray | None:
    """Replicates of a test cell over its runs' per-example statistics (None for validation
    cells, or when a run predates them). Runs pair up across methods by seed."""
    if source.split != "test" or not runs or any("test_stats" not in r.results for r in runs):
        return None
    sets = runs[0].eval_sets
    names = source.sets or [n for n, s in sets.items() if not s.get("zero_shot")]
    groups = [[(sets[n]["task"], lang) for lang in sets[n]["langs"]] for n in names]
    seeds = [r.seed for r in runs]
    keys = seeds if None not in seeds and len(set(seeds)) == len(seeds) else list(range(len(runs)))
    stats = {key: {(task, lang): r.results["test_stats"][task][lang] for group in groups for task, lang in group} for key, r in zip(keys, runs)}
    return uncertainty.replicates(stats, groups)


BASELINES = ("compute_matched", "param_matched")


def compare_rows(rows: list[tuple[str, list[Cell]]], methods: dict[str, str]) -> None:
    """Give FLix rows their paired differences from each baseline row of the table, per column."""
    for baseline in BASELINES:
        base_row = next((cells for label, cells in rows if methods.get(label) == baseline), None)
        if base_row is None:
            continue
        for label, cells in rows:
            if methods.get(label) not in ("flix", "flix_shared"):
                continue
            for cell, base in zip(cells, base_row):
                if cell.samples is not None and base.samples is not None and cell.value is not None and base.value is not None:
                    cell.versus[baseline] = uncertainty.compare(cell.samples, base.samples, cell.value - base.value)


def average_cell(cells: list[Cell], paper: float | None, columns: list[str], notes: Footnotes) -> Cell:
    """Avg. of a row: the plain mean of its cells, a dash when any is missing."""
    missing = [col for col, c in zip(columns, cells) if c.value is None]
    runs = list({id(r): r for c in cells for r in c.runs}.values())
    if missing:
        return Cell(None, paper, runs, [notes.add(f"Avg. needs every column; missing: {', '.join(missing)}")])
    samples = None if any(c.samples is None for c in cells) else np.mean([c.samples for c in cells], axis=0)
    return Cell(float(np.mean([c.value for c in cells])), paper, runs, samples=samples)


def build(name: str, index: RunIndex, paper_dir: str | Path) -> Table:
    paper = read_paper(paper_dir, name)
    spec = specs()[name]
    labels = [str(label) for label in paper.index]
    if set(labels) != set(spec):
        raise ValueError(f"{PAPER_FILES[name]}: rows {labels} differ from the report's {list(spec)}")
    notes = Footnotes()
    rows = []
    for label in labels:
        paper_row = paper.loc[label]
        cols = [c for c in paper.columns if c != AVG]
        unknown = set(cols) - set(spec[label])
        if unknown:
            raise ValueError(f"{PAPER_FILES[name]}: no mapping for columns {sorted(unknown)}")
        cells = [fill(spec[label][col], _number(paper_row[col]), index, notes) for col in cols]
        if AVG in paper.columns:
            cells.append(average_cell(cells, _number(paper_row[AVG]), cols, notes))
        rows.append((label, cells))
    compare_rows(rows, {label: next(iter(cols.values())).selection.method for label, cols in spec.items()})
    return Table(name, TITLES[name], paper.index.name, list(paper.columns), rows, notes.texts)


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


DROPOUT_MODES_MIXTURE = "multilingual_ner"


def build_dropout_modes(index: RunIndex) -> Table:
    """Beyond the paper (experiments/dropout_modes.yaml): FLix without feature dropout,
    with the paper's independent p = 0.7 and with keep_one, beside compute-matched LoRA."""
    mixture = DROPOUT_MODES_MIXTURE
    rows = {
        "Compute-matched": Selection("compute_matched", mixture),
        "FLix, no dropout": Selection("flix", mixture, dropout=0.0),
        "FLix, p = 0.7 independent": Selection("flix", mixture, dropout=0.7),
        "FLix, p = 0.7 keep-one": Selection("flix", mixture, dropout=0.7, dropout_mode="keep_one"),
    }
    notes = Footnotes()
    built = [(label, [fill(Source(sel, split=split), None, index, notes) for split in ("validation", "test")]) for label, sel in rows.items()]
    compare_rows(built, {label: sel.method for label, sel in rows.items()})
    title = f"Feature dropout modes on {mixture} (beyond the paper; no paper numbers)"
    return Table("dropout_modes", title, "Method", ["Validation", "Test"], built, notes.texts)


def build_all(index: RunIndex, paper_dir: str | Path) -> list[Table]:
    """Tables 1-5, and the dropout-modes table when a keep_one run exists."""
    tables = [build(name, index, paper_dir) for name in PAPER_FILES]
    if any(r.dropout_mode == "keep_one" for r in index.finished):
        tables.append(build_dropout_modes(index))
    return tables

