"""Tables 1-5: which runs and evaluation sets fill each cell, laid out as the paper's CSVs.

The paper CSV gives the layout (row labels, column headers, Avg.); the specs here map
each row and column to a `Source` (a Selection of runs and the evaluation sets averaged
in it); `flix.report.cells` fills each cell from its runs. Each table is built twice: in
the paper's metric, and in the gold targets' NLL (`TABLE_nll`, nats per target token,
lower is better; no paper numbers). Marks are Holm-corrected per metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from flix.record import RunRecord
from flix.report import uncertainty
from flix.report.cells import NLL, Cell, Footnotes, Source, average_cell, compare_rows, fill
from flix.report.collect import PAPER_DROPOUT, PAPER_RANK, RunIndex, Selection
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
    "table3": "Table 3: FLix feature dropout on {mixture}",
    "table4": "Table 4: FLix language-feature rank on the multilingual mixtures (test)",
    "table5": "Table 5: FLix with shared parameters, Study A mixture (test)",
}
NLL_TITLE = " - gold target NLL (nats per target token, lower is better)"
# Table 3's mixture: the paper's (in-language QA) when its dropout sweep was run, else
# multilingual NER (the cpu-scale study's, whose p = 0.7 row is Table 2's FLix runs).
TABLE3_MIXTURES = ("multilingual_qa_in_lang", "multilingual_ner")
# Each ablation row is compared with its table's control row (the paper's setting).
CONTROLS = {"table3": "0.7", "table4": "2", "table5": "FLix"}
ZERO_SHOT_COLUMNS = {"Zero-shot Unseen Comb: ": "unseen_combination", "Zero-shot Unseen Lang: ": "unseen_language"}
ZERO_SHOT_MIXTURES = {"semantic_parsing": "zeroshot_sp"}  # Table 1 scores these zero-shot columns on their own mixture
MULTITASK_COLUMNS = {"Multitask Swahili": "multitask_sw", "Multitask Bengali": "multitask_bn"}
TABLE5_ROWS = {"FLix": "flix", "+ shared parameters": "flix_shared", "Compute-matched LoRA": "compute_matched"}


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


def _table3(row: str, col: str, mixture: str = TABLE3_MIXTURES[0]) -> Source:
    split = {"Validation": "validation", "Test": "test"}[col]
    return Source(Selection("flix", mixture, dropout=float(row)), split=split)


def table3_mixture(index: RunIndex) -> str:
    """The paper's Table 3 mixture if a FLix run of another dropout than the default exists
    on it; otherwise the first of TABLE3_MIXTURES that has such runs (else the paper's)."""
    for mixture in TABLE3_MIXTURES:
        if any(r.method == "flix" and r.mixture == mixture and r.dropout is not None and r.dropout != PAPER_DROPOUT for r in index.runs):
            return mixture
    return TABLE3_MIXTURES[0]


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


def build(name: str, index: RunIndex, paper_dir: str | Path, metric: str = "score") -> Table:
    """One paper table: its CSV's rows and columns, each cell from the runs SOURCES names,
    in the paper's metric or (metric="nll") the gold target NLL."""
    paper = read_paper(paper_dir, name)
    cols = [c for c in paper.columns if c != AVG]
    notes = Footnotes()
    rows, methods = [], {}
    recipe, title = SOURCES[name], TITLES[name]
    if name == "table3":
        mixture = table3_mixture(index)
        recipe, title = (lambda row, col: _table3(row, col, mixture)), title.format(mixture=mixture)
        if mixture != TABLE3_MIXTURES[0]:  # the paper ran its sweep on another task: say so beside its figures
            title += f" (the paper's figures beside ours are on {TABLE3_MIXTURES[0]}, the paper's Table 3 mixture)"
    for label in map(str, paper.index):
        try:
            sources = [replace(recipe(label, col), metric=metric) for col in cols]
        except (KeyError, ValueError) as err:
            raise ValueError(f"{PAPER_FILES[name]}: row {label!r}: no cell recipe ({err}); see flix/report/tables.py SOURCES") from None
        papers = [_number(paper.loc[label, col]) if metric == "score" else None for col in cols]
        cells = [fill(source, number, index, notes) for source, number in zip(sources, papers)]
        if AVG in paper.columns:
            cells.append(average_cell(cells, _number(paper.loc[label, AVG]) if metric == "score" else None, cols, notes))
        rows.append((label, cells))
        methods[label] = sources[0].selection.method
    compare_rows(rows, methods, notes, CONTROLS.get(name))
    suffix = "" if metric == "score" else f"_{NLL}"
    return Table(name + suffix, title + (NLL_TITLE if metric == NLL else ""), paper.index.name, list(paper.columns), rows, notes.texts)


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


DROPOUT_MODES_MIXTURE = "multilingual_ner"


def build_dropout_modes(index: RunIndex, metric: str = "score") -> Table:
    """Beyond the paper (experiments/dropout_modes.yaml): FLix without feature dropout,
    with the paper's independent p (the default dropout, the control) and with keep_one,
    beside compute-matched LoRA."""
    mixture = DROPOUT_MODES_MIXTURE
    control = f"FLix, p = {PAPER_DROPOUT:g} independent"
    rows = {
        METHOD_LABELS["compute_matched"]: Selection("compute_matched", mixture),
        "FLix, no dropout": Selection("flix", mixture, dropout=0.0),
        control: Selection("flix", mixture),
        f"FLix, p = {PAPER_DROPOUT:g} keep-one": Selection("flix", mixture, dropout_mode="keep_one"),
    }
    notes = Footnotes()
    built = [
        (label, [fill(Source(sel, split=split, metric=metric), None, index, notes) for split in ("validation", "test")])
        for label, sel in rows.items()
    ]
    compare_rows(built, {label: sel.method for label, sel in rows.items()}, notes, control)
    title = f"Feature dropout modes on {mixture} (beyond the paper; no paper numbers)" + (NLL_TITLE if metric == NLL else "")
    return Table("dropout_modes" + ("" if metric == "score" else f"_{NLL}"), title, "Method", ["Validation", "Test"], built, notes.texts)


def build_all(index: RunIndex, paper_dir: str | Path) -> list[Table]:
    """Tables 1-5 and, when a keep_one run exists, the dropout-modes table: each in the
    paper's metric, then each in the gold target NLL. Marks are Holm-corrected over every
    paired comparison of the tables of one metric (the NLL tables are a second family)."""
    keep_one = any(r.dropout_mode == "keep_one" for r in index.finished)
    tables = []
    for metric in ("score", NLL):
        family = [build(name, index, paper_dir, metric) for name in PAPER_FILES]
        family += [build_dropout_modes(index, metric)] if keep_one else []
        uncertainty.holm(comparisons(family))  # one family per metric
        tables += family
    return tables


def comparisons(tables: list[Table]) -> list[uncertainty.Difference]:
    """Every paired difference the tables show (the family the marks are corrected over)."""
    return [d for t in tables for _, cells in t.rows for c in cells for d in c.versus.values()]
