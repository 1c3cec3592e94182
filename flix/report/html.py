"""The one self-contained HTML page: every table with its provenance, Figure 2 (inline
PNG), the runs table and the appendix tables."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from flix.record import RunRecord
from flix.report.appendix import Appendix
from flix.report.formats import CELL_NOTE, Page, one_decimal, table_rows
from flix.report.runs import NOTE as RUNS_NOTE
from flix.report.runs import runs_table
from flix.report.tables import Table

_CSS = """
body { font-family: sans-serif; max-width: 1300px; margin: 1.5em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 3px 7px; overflow-wrap: anywhere; }  /* long paths and notes wrap: tables fit 1400 px */
th { background: #eee; } td { text-align: right; } td:first-child { text-align: left; white-space: nowrap; }
td.missing { color: #a00; background: #fbf3f3; }
.warn { border: 2px solid #c00; background: #fee; padding: 0.6em 1em; font-weight: bold; }
.note { border-left: 4px solid #999; padding-left: 0.8em; }
.meta { color: #555; font-size: 0.85em; } .footnotes { font-size: 0.8em; color: #444; }
"""


def _h(text) -> str:
    return html.escape(str(text))


def html_table(header: list[str], rows: list[list[str]], missing: set[tuple[int, int]] = frozenset()) -> str:
    head = "<tr>" + "".join(f"<th>{_h(h)}</th>" for h in header) + "</tr>"
    body = "".join(
        "<tr>" + "".join(f"<td{' class=missing' if (i, j) in missing else ''}>{_h(c)}</td>" for j, c in enumerate(row)) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f'<div style="overflow-x:auto"><table>{head}{body}</table></div>\n'


def html_notes(notes: list[str]) -> str:
    return "".join(f'<p class="footnotes">[{i}] {_h(t)}</p>' for i, t in enumerate(notes, 1))


def html_meta(page: Page, runs: list[RunRecord]) -> str:
    return '<p class="meta">' + " · ".join(f"{_h(k)}: {_h(v)}" for k, v in page.meta(runs)) + "</p>\n"


def html_page(
    page: Page,
    all_runs: list[RunRecord],
    tables: list[Table],
    figure: tuple[pd.DataFrame, Path] | None,
    appendices: list[Appendix],
    runs: pd.DataFrame,  # flix.report.runs.runs_frame(all_runs)
) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>FLix report ({_h(page.scale)})</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>FLix reproduction report: {_h(page.scale)} scale</h1>",
    ]
    parts += [f'<p class="warn">{_h(n)}</p>' if n.startswith("Smoke") else f'<p class="note">{_h(n)}</p>' for n in page.notes(all_runs)]
    parts.append("<dl>" + "".join(f"<dt>{_h(k)}</dt><dd>{_h(v)}</dd>" for k, v in page.meta(all_runs)) + "</dl>")
    parts.append(f"<p>{_h(CELL_NOTE)}</p>")
    for table in tables:
        header, rows = table_rows(table)
        missing = {(i, j + 1) for i, (_, cells) in enumerate(table.rows) for j, c in enumerate(cells) if c.value is None}
        parts += [
            f'<h2 id="{table.name}">{_h(table.title)}</h2>',
            html_meta(page, table.runs),
            html_table(header, rows, missing),
            html_notes(table.footnotes),
        ]
    if figure is not None:
        frame, png = figure
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        header = list(frame.columns)
        rows = [[one_decimal(v) if isinstance(v, float) or v is None else v for v in row] for row in frame.itertuples(index=False)]
        parts += [
            '<h2 id="figure2">Figure 2: change from multilingual-only to multitask multilingual tuning</h2>',
            f'<img alt="Figure 2" style="max-width:100%" src="data:image/png;base64,{data}">',
            html_table(header, rows),
        ]
    header, rows, total = runs_table(runs)
    parts += ['<h2 id="runs">Runs: cost and training</h2>', html_table(header, rows), *(f"<p>{_h(line)}</p>" for line in [*total, RUNS_NOTE])]
    if appendices:
        parts.append('<h2 id="appendix">Appendix: per-language scores</h2>')
    for appendix in appendices:
        parts.append(f"<details><summary>mixture {_h(appendix.mixture)}</summary>")
        for s in appendix.sections:
            zero = f", zero-shot: {s.zero_shot}" if s.zero_shot else ""
            header = ["language", *(f"{m} {split}" for m, split in s.frame.columns)]
            rows = [[lang, *map(one_decimal, values)] for lang, values in zip(s.frame.index, s.frame.to_numpy())]
            parts += [f"<h3>{_h(s.name)} (task {_h(s.task)}{_h(zero)})</h3>", html_table(header, rows)]
        parts.append("</details>")
    return "\n".join(parts + ["</body></html>"]) + "\n"
