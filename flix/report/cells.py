"""One table cell from its runs: which runs and evaluation sets it averages (`Source`),
the value with its notes, its uncertainty (`flix.report.uncertainty`) and its paired
differences from other rows' cells (FLix rows against the LoRA baselines, ablation rows
against their table's control row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from flix.record import RunRecord
from flix.report import uncertainty
from flix.report.collect import RunIndex, Selection, has_features

NLL = "nll"  # the second metric: a table's `_nll` variant


@dataclass(frozen=True)
class Source:
    """A cell's recipe: the runs, which of their evaluation sets (by task and zero-shot kind;
    several are averaged, e.g. a multitask mixture's tasks) and the split."""

    selection: Selection
    task: str | None = None  # None: every task's sets
    zero_shot: str | None = None  # None: the supervised sets
    split: str = "test"
    metric: str = "score"  # score: the paper's metric; nll: the gold target NLL

    @property
    def key(self) -> str:
        """The number this cell averages, as notes name it (test, test_nll, ...)."""
        return self.split if self.metric == "score" else f"{self.split}_{NLL}"

    def set_names(self, run: RunRecord) -> list[str]:
        """The run's evaluation sets (as its record names them) this cell averages."""
        return [n for n, s in run.eval_sets.items() if s.zero_shot == self.zero_shot and self.task in (None, s.task)]

    def average(self, run: RunRecord, name: str) -> float | None:
        """The run's average over one evaluation set in this cell's split and metric."""
        return run.eval_sets[name].average(self.split, nll=self.metric == NLL)

    def describe_sets(self) -> str:
        kind = f"{self.zero_shot} sets" if self.zero_shot else "supervised sets"
        return f"its {self.task} {kind}" if self.task else f"its {kind}"


@dataclass
class Cell:
    value: float | None
    paper: float | None
    runs: list[RunRecord] = field(default_factory=list)
    notes: list[int] = field(default_factory=list)
    # per-seed values and example resamples (test cells whose runs recorded per-example statistics)
    evidence: uncertainty.Evidence | None = field(default=None, repr=False)
    # paired differences from other rows' cells of the same column: "compute_matched" and
    # "param_matched" on FLix rows, "control" on ablation rows
    versus: dict[str, uncertainty.Difference] = field(default_factory=dict)

    @property
    def shown(self) -> float | None:
        """The value a table prints: None (a dash) when absent or not a finite number."""
        return self.value if self.value is not None and math.isfinite(self.value) else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """None without evidence, or evidence that is not the shown value's (`evidence_problem`)."""
        if self.evidence is None or evidence_problem(self) is not None:
            return None
        estimate = uncertainty.estimate(self.evidence)
        return estimate.low, estimate.high

    @property
    def seed_noise(self) -> bool:
        """Whether the interval has a seed part (2+ seeds) or covers test examples only."""
        return self.evidence is not None and len(self.evidence.seeds) > 1

    @property
    def diff(self) -> float | None:
        return None if self.value is None or self.paper is None else self.value - self.paper


def evidence_problem(cell: Cell) -> str | None:
    """Why the cell's evidence cannot give its interval: numbers that are not finite, or
    per-example statistics whose value is not the cell's (a 1e308 shown with [0.0, 0.0]).
    Records are checked for both (flix.record.check); this keeps any other path honest."""
    evidence = cell.evidence
    if evidence is None or cell.value is None:
        return None
    if not (np.isfinite(evidence.values).all() and np.isfinite(evidence.resampled).all()):
        return "its runs' per-example statistics are not all finite numbers"
    if not math.isclose(evidence.mean, cell.value, rel_tol=1e-6, abs_tol=1e-6):
        return f"its runs' per-example statistics give {evidence.mean:.6g}, not the value shown ({cell.value:.6g})"
    return None


def run_value(run: RunRecord, source: Source) -> float | None:
    """One run's number for a cell: the mean of the sets' averages, None if any is absent."""
    names = source.set_names(run)
    values = [source.average(run, n) for n in names]
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
    what = source.selection.describe()
    try:
        cell.evidence = cell_evidence(source, cell.runs)
        if (problem := evidence_problem(cell)) is not None:
            cell.evidence = None  # nor a paired difference from it
            raise ValueError(problem)
    except ValueError as err:  # e.g. seeds scored on different examples: no interval rather than a wrong one
        cell.notes.append(notes.add(f"{what}: no interval ({err})"))
    for run in failed:
        seed = f"seed {run.seed}" if run.seed is not None else "a run"
        cell.notes.append(notes.add(f"{what}, {seed}: run failed ({run.failure}) [{where(index, run)}]"))
    for run, value in scored:
        if value is None:
            cell.notes.append(notes.add(f"{what}, seed {run.seed}: no {source.key} score for {source.describe_sets()} [{where(index, run)}]"))
    if conflict:
        cell.notes.append(notes.add(f"{what}: {conflict}"))
    elif not finished and not failed:
        cell.notes.append(notes.add(f"missing run: {what} under {index.root.name}/"))
    return cell


def where(index: RunIndex, run: RunRecord) -> str:
    """A run's directory as pages show it: relative to the runs root, never a machine path."""
    try:
        return str(run.path.relative_to(index.root))
    except ValueError:
        return run.path.name


def cell_evidence(source: Source, runs: list[RunRecord]) -> uncertainty.Evidence | None:
    """A test cell's evidence from its runs' per-example records (None for validation
    cells, or when a run predates them). Seeds and examples pair up across rows."""
    per_example = [r.test_stats if source.metric == "score" else r.test_example_nll for r in runs]
    if source.split != "test" or not runs or any(values is None for values in per_example):
        return None
    sets = runs[0].eval_sets
    groups = [[(sets[n].task, lang) for lang in sets[n].langs] for n in source.set_names(runs[0])]
    test_sets = [t for group in groups for t in group]
    seeds = [r.seed for r in runs]
    keys = seeds if None not in seeds and len(set(seeds)) == len(seeds) else list(range(len(runs)))
    stats, ids = {}, None
    for key, r, values in zip(keys, runs, per_example):
        rows = {(task, lang): values[task][lang] for task, lang in test_sets}
        stats[key] = rows if source.metric == "score" else {t: [[v, 1.0] for v in nll] for t, nll in rows.items()}
        scored = r.test_ids if source.metric == "score" else r.test_nll_ids
        recorded = {(task, lang): tuple(scored[task][lang]) for task, lang in test_sets} if scored is not None else None
        if ids is not None and recorded != ids:
            raise ValueError(f"seeds were scored on different test examples ({index_name(runs)})")
        ids = recorded if ids is None else ids
    scorer = uncertainty.score_from_stats if source.metric == "score" else uncertainty.mean_of_values
    return uncertainty.evidence(stats, groups, ids, scorer)


def index_name(runs: list[RunRecord]) -> str:
    return ", ".join(sorted({r.path.name for r in runs}))


BASELINES = ("compute_matched", "param_matched")


def _pair(cell: Cell, other: Cell, key: str, notes: Footnotes, what: str) -> None:
    if cell.evidence is None or other.evidence is None or cell is other:
        return
    try:
        difference = uncertainty.difference(cell.evidence, other.evidence)
    except ValueError as err:
        cell.notes.append(notes.add(f"{what}: not compared ({err})"))
        return
    difference.about = frozenset({_compared(cell), _compared(other)})
    cell.versus[key] = difference


def _compared(cell: Cell) -> tuple:
    """What one side of a comparison is: its runs and the test examples it is scored on."""
    return tuple(sorted(str(r.path) for r in cell.runs)), cell.evidence.examples


def compare_rows(rows: list[tuple[str, list[Cell]]], methods: dict[str, str], notes: Footnotes, control: str | None = None) -> None:
    """Paired differences, per column: FLix rows against each baseline row of the table,
    and every other row against the `control` row (an ablation's own control)."""
    for baseline in BASELINES:
        base_row = next((cells for label, cells in rows if methods.get(label) == baseline), None)
        if base_row is None:
            continue
        for label, cells in rows:
            if has_features(methods[label]):
                for cell, base in zip(cells, base_row):
                    _pair(cell, base, baseline, notes, f"{label} vs {baseline}")
    control_row = dict(rows).get(control) if control else None
    if control_row is not None:
        for label, cells in rows:
            for cell, base in zip(cells, control_row):
                _pair(cell, base, "control", notes, f"{label} vs {control}")


def average_cell(cells: list[Cell], paper: float | None, columns: list[str], notes: Footnotes) -> Cell:
    """Avg. of a row: the plain mean of its cells, a dash when any is missing."""
    missing = [col for col, c in zip(columns, cells) if c.value is None]
    runs = list({id(r): r for c in cells for r in c.runs}.values())
    if missing:
        return Cell(None, paper, runs, [notes.add(f"Avg. needs every column; missing: {', '.join(missing)}")])
    cell = Cell(float(np.mean([c.value for c in cells])), paper, runs)
    if all(c.evidence is not None for c in cells) and len({c.evidence.seeds for c in cells}) == 1:
        cell.evidence = uncertainty.average([c.evidence for c in cells])
    return cell
