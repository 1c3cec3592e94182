"""Writers: Markdown, LaTeX and CSV (the HTML page: flix.report.html). Every page carries
where its numbers came from (scale, data roots, models, seeds, commits, render date) and
the caveats of the scale, so a table never travels alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flix.io import atomic_write_text
from flix.record import RunRecord
from flix.report.appendix import Appendix
from flix.report.cells import Cell
from flix.report.tables import DASH, Table

SMOKE_NOTE = "smoke numbers are a pipeline check (tiny random model, a few steps), not results"
MINI_NOTE = (
    "Mini-scale mixtures use documented substitutes for what the mini data lacks (the `mini.notes` "
    "of conf/mixture/*.yaml), so these numbers are not comparable to the paper's."
)
MARKS = {"compute_matched": "*", "param_matched": "†", "control": "‡"}
CELL_NOTE = (
    "Each cell: reproduced [95% interval] (paper X, reproduced − paper); Avg. is the mean of the row's columns; seeds "
    "are averaged. Intervals combine the test examples (bootstrap) and, with 2+ seeds, the seeds (a t interval over "
    "the per-seed values, so 2-3 seeds give wide intervals); an interval marked ° has one seed and covers test-example "
    "noise only. On FLix rows, * (vs compute-matched LoRA) and † (vs param-matched LoRA), and on ablation rows ‡ (vs "
    "the table's control row: dropout 0.7, language rank 2, FLix, p = 0.7 independent), mark a paired difference "
    "(same seeds, same test examples) with a two-sided p < 0.05 after Holm's correction over every comparison of the "
    "report in this metric. cells.csv has each difference, its interval, the per-seed differences and the raw and "
    "corrected p-values."
)


@dataclass
class Page:
    """What every page states about the runs behind it."""

    scale: str
    rendered: str

    def meta(self, runs: list[RunRecord]) -> list[tuple[str, str]]:
        def values(field, short=False):  # e.g. `model`: the distinct values the finished runs record
            found = sorted({str(getattr(r, field)) for r in runs if r.finished and getattr(r, field) is not None})
            return ", ".join(_short(v) if short else v for v in found) or "none"

        seeds = sorted({r.seed for r in runs if r.seed is not None})
        return [
            ("Scale", self.scale),
            ("Data root(s)", values("data_root")),
            ("Model(s)", values("model")),
            ("Seeds", ", ".join(map(str, seeds)) or "none"),
            ("Commit(s)", values("commit", short=True)),
            ("Versions", _versions_text(runs)),
            ("Rendered", self.rendered),
        ]

    def notes(self, runs: list[RunRecord]) -> list[str]:
        notes = [f"Smoke scale: {SMOKE_NOTE}."] if self.scale == "smoke" else []
        if self.scale in ("smoke", "mini") or any(r.finished and r.variant == "mini" for r in runs):
            notes.append(MINI_NOTE)
        mixed = {name: found for name, found in _versions(runs).items() if len(found) > 1}
        if mixed:
            notes.append(
                "Warning: these runs come from different versions ("
                + "; ".join(f"{name} {' / '.join(found)}" for name, found in mixed.items())
                + "); their numbers may differ for that reason alone."
            )
        return notes


def _versions(runs: list[RunRecord]) -> dict[str, list[str]]:
    """Each recorded package (and the device) -> the distinct values the runs recorded."""
    found: dict[str, set[str]] = {}
    for r in runs:
        for name, value in r.versions.items():
            found.setdefault(name, set()).add(str(value))
    return {name: sorted(values) for name, values in found.items()}


def _versions_text(runs: list[RunRecord]) -> str:
    text = ", ".join(f"{name} {' / '.join(values)}" for name, values in _versions(runs).items()) or "not recorded"
    unrecorded = sum(1 for r in runs if r.finished and not r.versions)
    return text + (f" ({unrecorded} run(s) made before versions were recorded)" if unrecorded and text != "not recorded" else "")


def _short(commit: str) -> str:
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def cell_text(cell: Cell, digits: int = 1) -> str:
    """One decimal, as the paper prints; the NLL tables (a few nats) take `digits=2`."""
    text = DASH if cell.shown is None else f"{cell.shown:.{digits}f}"  # never "nan" or "inf"
    if cell.shown is not None and cell.interval is not None:
        text += " [{:.{d}f}, {:.{d}f}]".format(*cell.interval, d=digits) + ("" if cell.seed_noise else "°")
    text += "".join(mark for key, mark in MARKS.items() if key in cell.versus and cell.versus[key].significant_holm)
    if cell.paper is not None:
        diff = "" if cell.diff is None else f", {cell.diff:+.1f}"
        text += f" (paper {cell.paper:.1f}{diff})"
    return text + "".join(f" [{n}]" for n in cell.notes)


def _seeds(seeds: list[int]) -> str:
    """How many seeds and which: "2 (0, 1)"."""
    return f"{len(seeds)} ({', '.join(map(str, seeds))})" if seeds else DASH


def _number(value: float | None, digits: int = 2) -> str:
    return DASH if value is None or pd.isna(value) else f"{value:.{digits}f}"


def one_decimal(value: float | None) -> str:
    """Pages show one decimal, as the paper does; CSVs keep two."""
    return _number(value, 1)


# -- Markdown ----------------------------------------------------------------------


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s):
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(esc, row)) + " |" for row in rows]) + "\n"


def md_header(title: str, page: Page, runs: list[RunRecord]) -> str:
    parts = [f"# {title}\n"]
    parts += [f"> **{note}**\n" if note.startswith("Smoke") else f"> {note}\n" for note in page.notes(runs)]
    parts.append("".join(f"- {key}: {value}\n" for key, value in page.meta(runs)))
    return "\n".join(parts)


def md_notes(notes: list[str]) -> str:
    return "\nNotes:\n\n" + "".join(f"- [{i}] {text}\n" for i, text in enumerate(notes, 1)) if notes else ""


def table_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    header = [table.row_header, *table.columns, "Seeds"]
    digits = 2 if table.name.endswith("_nll") else 1
    return header, [[label, *(cell_text(c, digits) for c in cells), _seeds(table.row_seeds(cells))] for label, cells in table.rows]


def table_md(table: Table, page: Page) -> str:
    header, rows = table_rows(table)
    return md_header(table.title, page, table.runs) + "\n" + md_table(header, rows) + f"\n{CELL_NOTE}\n" + md_notes(table.footnotes)


def appendix_md(appendix: Appendix, page: Page) -> str:
    runs = [r for rs in appendix.runs.values() for r in rs]
    parts = [md_header(f"Appendix: per-language scores, mixture {appendix.mixture}", page, runs)]
    parts.append("Seeds averaged: " + "; ".join(f"{m} {_seeds(sorted({r.seed for r in rs}))}" for m, rs in appendix.runs.items()) + "\n")
    for s in appendix.sections:
        zero = f", zero-shot: {s.zero_shot}" if s.zero_shot else ""
        header = ["language", *(f"{m} {split}" for m, split in s.frame.columns)]
        rows = [[lang, *map(one_decimal, values)] for lang, values in zip(s.frame.index, s.frame.to_numpy())]
        parts.append(f"## {s.name} (task {s.task}{zero})\n\n" + md_table(header, rows))
    return "\n".join(parts)


# -- CSV ---------------------------------------------------------------------------


def table_csv(table: Table) -> str:
    records = []
    for label, cells in table.rows:
        record = {table.row_header: label}
        for column, cell in zip(table.columns, cells):
            record[column] = _number(cell.value)
            record[f"{column} paper"] = _number(cell.paper)
            record[f"{column} diff"] = _number(cell.diff)
        notes = dict.fromkeys(n for c in cells for n in c.notes)
        record["seeds"] = _seeds(table.row_seeds(cells))
        record["notes"] = "; ".join(f"[{n}] {table.footnotes[n - 1]}" for n in notes)
        records.append(record)
    return pd.DataFrame(records).to_csv(index=False)


def cells_csv(tables: list[Table]) -> str:
    """Every cell of every table, one row each (long format), with its interval and its
    paired differences (FLix rows vs each LoRA baseline, ablation rows vs their control):
    the difference, its interval, the per-seed differences, raw and Holm p-values."""
    records = []
    for table in tables:
        for label, cells in table.rows:
            for column, cell in zip(table.columns, cells):
                low, high = cell.interval or (None, None)
                record = {
                    "table": table.name,
                    "row": label,
                    "column": column,
                    "ours": cell.value,
                    "ci_low": low,
                    "ci_high": high,
                    "seeds": len({r.seed for r in cell.runs}),
                    "seed_ids": " ".join(str(r.seed) for r in cell.runs),
                    "interval_covers": None if cell.interval is None else ("seeds and examples" if cell.seed_noise else "examples only"),
                    "paper": cell.paper,
                }
                for key in MARKS:
                    vs = cell.versus.get(key)
                    record |= {
                        f"diff_vs_{key}": vs and vs.diff,
                        f"diff_ci_low_vs_{key}": vs and vs.low,
                        f"diff_ci_high_vs_{key}": vs and vs.high,
                        f"diff_per_seed_vs_{key}": vs and " ".join(f"{seed}:{d:.4f}" for seed, d in zip(vs.seeds, vs.per_seed)),
                        f"p_vs_{key}": vs and vs.p_value,
                        f"p_holm_vs_{key}": vs and vs.p_holm,
                    }
                records.append(record)
    return pd.DataFrame(records).to_csv(index=False, float_format="%.4f")


def appendix_csv(appendix: Appendix) -> str:
    frames = []
    for s in appendix.sections:
        frame = s.frame.copy()
        frame.columns = [f"{m} {split}" for m, split in frame.columns]
        frame = frame.map(_number).reset_index()
        frame.insert(0, "zero_shot", s.zero_shot or "")
        frame.insert(0, "task", s.task)
        frame.insert(0, "set", s.name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).to_csv(index=False)


# -- LaTeX -------------------------------------------------------------------------

_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    DASH: "--",
    "−": "$-$",
}


def one_line(text) -> str:
    """Recorded text as one line: TeX ends a % comment at a line break, so a newline in a
    record's field would make the rest of it a live line (\\input{...})."""
    return " ".join(str(text).splitlines())


def tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in one_line(text))


def table_tex(table: Table, page: Page) -> str:
    header, rows = table_rows(table)
    meta = page.meta(table.runs)
    notes = page.notes(table.runs)
    lines = [
        f"% {one_line(table.title)}",
        *(f"% {one_line(k)}: {one_line(v)}" for k, v in meta),
        *(f"% NOTE: {one_line(n)}" for n in notes),
        "% needs \\usepackage{booktabs}",
        r"\begin{table}[ht]",
        r"\centering",
        r"\scriptsize",
        r"\begin{tabular}{l" + "l" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(tex(h) for h in header) + r" \\",
        r"\midrule",
        *(" & ".join(tex(c) for c in row) + r" \\" for row in rows),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    lines += [r"\par\smallskip " + tex(f"[{i}] {text}") for i, text in enumerate(table.footnotes, 1)]
    caption = f"{table.title}. {CELL_NOTE} " + "; ".join(f"{k}: {v}" for k, v in meta) + ". " + " ".join(notes)
    lines += [r"\caption{" + tex(caption.strip()) + "}", r"\label{tab:" + table.name + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# -- files -------------------------------------------------------------------------


def write_table(table: Table, page: Page, out_dir: Path) -> list[Path]:
    return [
        atomic_write_text(out_dir / f"{table.name}.md", table_md(table, page)),
        atomic_write_text(out_dir / f"{table.name}.tex", table_tex(table, page)),
        atomic_write_text(out_dir / f"{table.name}.csv", table_csv(table)),
    ]


def write_appendix(appendix: Appendix, page: Page, out_dir: Path) -> list[Path]:
    stem = out_dir / f"appendix_{appendix.mixture}"
    return [
        atomic_write_text(stem.with_suffix(".md"), appendix_md(appendix, page)),
        atomic_write_text(stem.with_suffix(".csv"), appendix_csv(appendix)),
    ]
