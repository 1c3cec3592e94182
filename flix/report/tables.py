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

from flix.report import uncertainty
from flix.report.collect import DEFAULT_DROPOUT, PAPER_RANK, RunIndex, RunRecord, Selection, has_features
from flix.report.labels import METHOD_LABELS, method_of, task_of

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
ZERO_SHOT_COLUMNS = {"Zero-shot Unseen Comb: ": "unseen_combination", "Zero-shot Unseen Lang: ": "unseen_language"}
ZERO_SHOT_MIXTURES = {"semantic_parsing": "zeroshot_sp"}  # Table 1 scores these zero-shot columns on their own mixture
MULTITASK_COLUMNS = {"Multitask Swahili": "multitask_sw", "Multitask Bengali": "multitask_bn"}
TABLE5_ROWS = {"FLix": "flix", "+ shared parameters": "flix_shared", "Compute-matched LoRA": "compute_matched"}


@dataclass(frozen=True)
class Source:
    """A cell's recipe: the runs, which of their evaluation sets (by task and zero-shot kind;
    several are averaged, e.g. a multitask mixture's tasks) and the split."""

    selection: Selection
    task: str | None = None  # None: every task's sets
    zero_shot: str | None = None  # None: the supervised sets
    split: str = "test"

    def set_names(self, run: RunRecord) -> list[str]:
        """The run's evaluation sets (as its results.json records them) this cell averages."""
        return [n for n, s in run.eval_sets.items() if s.get("zero_shot") == self.zero_shot and self.task in (None, s["task"])]

    def describe_sets(self) -> str:
        kind = f"{self.zero_shot} sets" if self.zero_shot else "supervised sets"
        return f"its {self.task} {kind}" if self.task else f"its {kind}"


@dataclass
class Cell:
    value: float | None
    paper: float | None
    runs: list[RunRecord] = field(default_factory=list)
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
    def runs(self) -> list[RunRecord]:
        seen = {id(r): r for _, cells in self.rows for c in cells for r in c.runs}
        return list(seen.values())

    def row_seeds(self, cells: list[Cell]) -> list[int]:
        return sorted({r.seed for c in cells for r in c.runs if r.seed is not None})

    def cell(self, row: str, column: str) -> Cell:
        cells = dict(self.rows)[row]
        return cells[self.columns.index(column)]

    def cell_notes(self, cell: Cell) -> list[str]:
        return [self.footnotes[n - 1] for n in cell.notes]

    def counts(self) -> tuple[int, int]:
        """(filled, missing) cells, Avg. included."""
        cells = [c for _, row in self.rows for c in row]
        filled = sum(c.value is not None for c in cells)
        return filled, len(cells) - filled


def _table1(row: str, col: str) -> Source:
    method = method_of(row)
    for prefix, kind in ZERO_SHOT_COLUMNS.items():
        if col.startswith(prefix):
            task = task_of(col[len(prefix) :])
            return Source(Selection(method, ZERO_SHOT_MIXTURES.get(task, "study_a")), task, kind)
    return Source(Selection(method, "study_a"), task_of(col))


def _table2(row: str, col: str) -> Source:
    method = method_of(row)
    if col in MULTITASK_COLUMNS:
        return Source(Selection(method, MULTITASK_COLUMNS[col]))
    return Source(Selection(method, multilingual(task_of(col.removeprefix("Multilingual ")))))


def _table3(row: str, col: str) -> Source:
    split = {"Validation": "validation", "Test": "test"}[col]
    return Source(Selection("flix", "multilingual_qa_in_lang", dropout=float(row)), split=split)


def _table4(row: str, col: str) -> Source:
    # the paper's language rank on multilingual mixtures is 2: runs with rank.lang 2 count too
    ranks = {"2": (PAPER_RANK, 2), "1": (1,)}[row]
    return Source(Selection("flix", multilingual(task_of(col)), lang_ranks=ranks))


def _table5(row: str, col: str) -> Source:
    return Source(Selection(TABLE5_ROWS[row], "study_a"), task_of(col))


# table -> (row label, column label) -> Source; the paper CSVs give the labels
SOURCES = {"table1": _table1, "table2": _table2, "table3": _table3, "table4": _table4, "table5": _table5}


def multilingual(task: str) -> str:
    """The one-task, all-languages mixture of a task (conf/mixture/multilingual_TASK.yaml)."""
    return f"multilingual_{task}"


def read_paper(paper_dir: str | Path, name: str) -> pd.DataFrame:
    """A paper table: index the row labels (as written), float columns."""
    frame = pd.read_csv(Path(paper_dir) / PAPER_FILES[name], dtype=str)
    frame = frame.set_index(frame.columns[0])
    return frame.astype(float)


def run_value(run: RunRecord, source: Source) -> float | None:
    """One run's number for a cell: the mean of the sets' averages, None if any is absent."""
    names = source.set_names(run)
    values = [run.eval_sets[n].get(source.split) for n in names]
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
    finished, failed, conflict = index.select(source.selection)
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
            cell.notes.append(notes.add(f"{what}, seed {run.seed}: no {source.split} score for {source.describe_sets()} [{run.path}]"))
    if conflict:
        cell.notes.append(notes.add(f"{what}: {conflict}"))
    elif not finished and not failed:
        cell.notes.append(notes.add(f"missing run: {what} under {index.root}"))
    return cell


def bootstrap(source: Source, runs: list[RunRecord]) -> np.ndarray | None:
    """Replicates of a test cell over its runs' per-example statistics (None for validation
    cells, or when a run predates them). Runs pair up across methods by seed."""
    if source.split != "test" or not runs or any("test_stats" not in r.results for r in runs):
        return None
    sets = runs[0].eval_sets
    names = source.set_names(runs[0])
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
            if not has_features(methods[label]):
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
    """One paper table: its CSV's rows and columns, each cell from the runs SOURCES names."""
    paper = read_paper(paper_dir, name)
    cols = [c for c in paper.columns if c != AVG]
    notes = Footnotes()
    rows, methods = [], {}
    for label in map(str, paper.index):
        try:
            sources = [SOURCES[name](label, col) for col in cols]
        except (KeyError, ValueError) as err:
            raise ValueError(f"{PAPER_FILES[name]}: row {label!r}: no cell recipe ({err}); see flix/report/tables.py SOURCES") from None
        cells = [fill(source, _number(paper.loc[label, col]), index, notes) for source, col in zip(sources, cols)]
        if AVG in paper.columns:
            cells.append(average_cell(cells, _number(paper.loc[label, AVG]), cols, notes))
        rows.append((label, cells))
        methods[label] = sources[0].selection.method
    compare_rows(rows, methods)
    return Table(name, TITLES[name], paper.index.name, list(paper.columns), rows, notes.texts)


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


DROPOUT_MODES_MIXTURE = "multilingual_ner"


def build_dropout_modes(index: RunIndex) -> Table:
    """Beyond the paper (experiments/dropout_modes.yaml): FLix without feature dropout,
    with the paper's independent p (the default dropout) and with keep_one, beside compute-matched LoRA."""
    mixture = DROPOUT_MODES_MIXTURE
    rows = {
        METHOD_LABELS["compute_matched"]: Selection("compute_matched", mixture),
        "FLix, no dropout": Selection("flix", mixture, dropout=0.0),
        f"FLix, p = {DEFAULT_DROPOUT:g} independent": Selection("flix", mixture),
        f"FLix, p = {DEFAULT_DROPOUT:g} keep-one": Selection("flix", mixture, dropout_mode="keep_one"),
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
