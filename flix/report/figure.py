"""Figure 2: how much each method gains or loses when a task's multilingual mixture
grows into the joint multitask multilingual one (study_a), per task.

The paper prints no numbers for Figure 2; its panel here is Table 1 minus Table 2 for
the same task, which is what the figure plots (QA CrossLang's two columns cover
different languages, as the paper notes, so that bar is only indicative).
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure

from flix.io import atomic_write_bytes, atomic_write_text
from flix.report import uncertainty
from flix.report.labels import METHOD_LABELS, TASK_LABELS
from flix.report.tables import DASH, Table

METHODS = ("compute_matched", "param_matched", "flix")
COLORS = {"compute_matched": "#8c96c6", "param_matched": "#fdae6b", "flix": "#31a354"}


def figure_data(table1: Table, table2: Table) -> pd.DataFrame:
    """One row per (task, method) from the built Tables 1 and 2: multilingual and joint
    test averages, their change with its interval, the paper's change, and the notes of
    whatever is missing."""
    rows = []
    for task, label in TASK_LABELS.items():
        for method in METHODS:
            row = METHOD_LABELS[method]
            multi, joint = table2.cell(row, f"Multilingual {label}"), table1.cell(row, label)
            change = None if multi.value is None or joint.value is None else joint.value - multi.value
            low = high = None
            if change is not None and multi.evidence is not None and joint.evidence is not None:
                try:  # paired where the two mixtures scored the same test examples (resampled alike)
                    paired = uncertainty.difference(joint.evidence, multi.evidence)
                    low, high = paired.low, paired.high
                except ValueError:  # other examples or seeds: no interval rather than a wrong one
                    pass
            seeds = sorted({r.seed for c in (multi, joint) for r in c.runs if r.seed is not None})
            rows.append(
                {
                    "task": label,
                    "method": row,
                    "multilingual": multi.value,
                    "joint": joint.value,
                    "change": change,
                    "change low": low,
                    "change high": high,
                    "paper change": joint.paper - multi.paper,
                    "seeds": ", ".join(map(str, seeds)),
                    "notes": "; ".join(dict.fromkeys(table2.cell_notes(multi) + table1.cell_notes(joint))),
                }
            )
    return pd.DataFrame(rows)


def _bars(ax, frame: pd.DataFrame, column: str, title: str) -> None:
    tasks = list(dict.fromkeys(frame["task"]))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        name = METHOD_LABELS[method]
        part = frame[frame["method"] == name].set_index("task").reindex(tasks)
        xs = [t + (i - (len(METHODS) - 1) / 2) * width for t in range(len(tasks))]
        values = list(part[column])
        heights = [0.0 if pd.isna(v) else v for v in values]
        ax.bar(xs, heights, width, label=name, color=COLORS[method], edgecolor="black", linewidth=0.5)
        if f"{column} low" in part:  # 95% intervals where the runs recorded per-example statistics
            for x, v, lo, hi in zip(xs, values, part[f"{column} low"], part[f"{column} high"]):
                if not (pd.isna(v) or pd.isna(lo)):
                    ax.errorbar(x, v, yerr=[[v - lo], [hi - v]], color="black", capsize=2, linewidth=0.8)
        for x, v in zip(xs, values):
            if pd.isna(v):
                ax.annotate(
                    "n/a",
                    (x, 0.0),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="grey",
                    style="italic",
                    rotation=90,
                )
            else:
                ax.annotate(
                    f"{v:+.1f}",
                    (x, v),
                    xytext=(0, 3 if v >= 0 else -3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom" if v >= 0 else "top",
                    fontsize=7,
                )
    known = [v for v in frame[column] if not pd.isna(v)]
    low, high = min([0.0, *known]), max([0.0, *known])
    pad = max(1.0, 0.2 * (high - low))
    ax.set_ylim(low - pad, high + pad)  # room above and below zero for labels and "n/a"
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def plot(frame: pd.DataFrame, out_dir: str | Path, scale: str) -> list[Path]:
    """figure2.png and figure2.svg: reproduced changes beside the paper's. A bare Figure
    (no pyplot) draws PNG with Agg and leaves the caller's matplotlib backend alone."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    _bars(axes[0], frame, "change", f"Reproduced ({scale} scale)")
    _bars(axes[1], frame, "paper change", "Paper (Table 1 − Table 2)")
    axes[0].set_ylabel("change in score (joint − multilingual)")
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle("Figure 2: multitask multilingual (study_a) vs multilingual-only tuning, test", fontsize=11)
    fig.text(
        0.5,
        0.01,
        "n/a: a run is missing (named in index.html and figure2.csv). QA CrossLang: the two mixtures "
        "score different languages (the paper's Table 1 note), so that bar is indicative only.",
        ha="center",
        fontsize=7.5,
        color="#444",
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out = Path(out_dir)
    svg = io.StringIO()
    with rc_context({"svg.hashsalt": "flix-figure2"}):  # fixed clip-path ids and no date: a re-render of the same runs is byte-identical
        fig.savefig(svg, format="svg", metadata={"Date": None})
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=130)
    return [atomic_write_bytes(out / "figure2.png", png.getvalue()), atomic_write_text(out / "figure2.svg", svg.getvalue())]


def write_csv(frame: pd.DataFrame, out_dir: str | Path) -> Path:
    """The plotted numbers, with each missing bar's reason spelled out."""
    table = frame.copy()
    for column in ("multilingual", "joint", "change", "change low", "change high", "paper change"):
        table[column] = [DASH if pd.isna(v) else f"{v:.2f}" for v in table[column]]
    return atomic_write_text(Path(out_dir) / "figure2.csv", table.to_csv(index=False))
