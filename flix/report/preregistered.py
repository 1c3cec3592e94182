"""A pre-registered study's own analysis: its design (experiments/<study>.yaml `design`)
names the conditions, the correction family and the primary metric before any run; this
module answers exactly those questions from the records, and draws the learning curves.

Each family comparison a - b is paired by seed and test example on the primary metric
(test target NLL, averaged over the mixture's languages), only over the seeds complete in
every condition of the family (docs/study-ner-nll.md, "Analysis"), Holm-corrected over the
family alone. Verdicts: established (Holm p < alpha), ruled out as large (the interval
inside +-smallest_effect), or not settled; and none before every seed the design names is
complete (a look part-way is an interim figure, not a test), or with one seed (no seed
variance: the t test has no degrees of freedom).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flix.io import atomic_write_bytes, atomic_write_text
from flix.record import RunRecord
from flix.report import uncertainty
from flix.report.labels import METHOD_LABELS

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@dataclass
class Question:
    name: str
    a: dict
    b: dict
    result: uncertainty.Difference | None = None
    verdict: str = "not run"


def load_design(scale: str, experiments: Path | None = None) -> dict | None:
    """The `design` of the study registered for this scale (experiments/*.yaml whose
    design names it), or None."""
    from omegaconf import OmegaConf

    for path in sorted((experiments or EXPERIMENTS).glob("*.yaml")):
        design = OmegaConf.to_container(OmegaConf.load(path)).get("design")
        if isinstance(design, dict) and design.get("scale") == scale and design.get("family"):
            return {**design, "study": path.stem, "file": f"experiments/{path.name}"}
    return None


def matches(run: RunRecord, condition: dict) -> bool:
    """Whether a run is the design's condition: its method, and its dropout when named
    (independent dropout, the method's ranks: a design condition names no other variant)."""
    if run.method != condition["method"] or run.dropout_mode != "independent" or run.lang_rank is not None:
        return False
    return "dropout" not in condition or (run.dropout is not None and math.isclose(run.dropout, float(condition["dropout"])))


def analyse(design: dict, runs: list[RunRecord]) -> list[Question]:
    """The family's comparisons on the seeds complete in all its conditions, Holm over them."""
    questions = [Question(q["name"], q["a"], q["b"]) for q in design["family"]]
    conditions = [c for q in questions for c in (q.a, q.b)]
    by_condition = [{r.seed: r for r in runs if matches(r, c) and r.test_example_nll is not None} for c in conditions]
    seeds = sorted(set.intersection(*(set(found) for found in by_condition))) if by_condition else []
    if not seeds:
        return questions
    for q in questions:
        q.result = uncertainty.difference(_evidence(q.a, runs, seeds), _evidence(q.b, runs, seeds))
    uncertainty.holm([q.result for q in questions])
    alpha, smallest = float(design.get("alpha", uncertainty.ALPHA)), float(design.get("smallest_effect", 0.0))
    planned = design.get("seeds") or []
    missing = sorted(set(planned) - set(seeds))
    for q in questions:
        d = q.result
        if missing or len(seeds) < 2:
            q.verdict = (
                f"interim: {len(seeds)} of {len(planned)} seeds, no verdict before "
                + (f"seed {missing[0]} is in" if len(missing) == 1 else f"seeds {', '.join(map(str, missing))} are in")
                if missing
                else "not settled: one seed has no seed variance"
            )
            continue
        verdicts = ["established"] if d.p_holm < alpha else []
        if smallest and -smallest < d.low and d.high < smallest:
            verdicts.append(f"ruled out as larger than {smallest:g}")
        q.verdict = ", ".join(verdicts) or "not settled"
    return questions


def _evidence(condition: dict, runs: list[RunRecord], seeds: list[int]) -> uncertainty.Evidence:
    chosen = {r.seed: r for r in runs if matches(r, condition) and r.seed in seeds}
    first = chosen[seeds[0]]
    groups = [[(s.task, lang) for lang in s.langs] for s in first.eval_sets.values() if not s.zero_shot]
    stats = {seed: {(t, lang): [[v, 1.0] for v in r.test_example_nll[t][lang]] for g in groups for t, lang in g} for seed, r in chosen.items()}
    ids = {(t, lang): first.test_nll_ids[t][lang] for g in groups for t, lang in g}
    for seed, r in chosen.items():
        if any(r.test_nll_ids[t][lang] != ids[(t, lang)] for t, lang in ids):
            raise ValueError(f"{r.path.name} (seed {seed}) was scored on other test examples than {first.path.name}")
    return uncertainty.evidence(stats, groups, ids, uncertainty.mean_of_values)


def describe(condition: dict) -> str:
    label = METHOD_LABELS.get(condition["method"], condition["method"])
    return label + (f" p = {float(condition['dropout']):g}" if "dropout" in condition else "")


def power(design: dict, questions: list[Question], d: uncertainty.Difference) -> float | None:
    """The chance this study's test had of establishing a true difference of the smallest
    effect of interest, with the standard error and seeds it achieved: a two-sided t test at
    alpha / m (Holm's first step over the m questions; the second's is alpha, so this is the
    lower bound)."""
    smallest = float(design.get("smallest_effect") or 0.0)
    if not smallest or d.se is None or not d.se > 0 or not len(d.seeds) > 1:
        return None
    return uncertainty.t_power(smallest, d.se, d.df, float(design.get("alpha", uncertainty.ALPHA)) / len(questions))


def frame(design: dict, questions: list[Question]) -> pd.DataFrame:
    rows = []
    for q in questions:
        d = q.result
        rows.append(
            {
                "question": q.name,
                "a": describe(q.a),
                "b": describe(q.b),
                "diff": d and d.diff,
                "ci_low": d and d.low,
                "ci_high": d and d.high,
                "p": d and d.p_value,
                "p_holm": d and d.p_holm,
                "half_width": d and d.half_width,
                "power": d and power(design, questions, d),
                "seeds": d and " ".join(map(str, d.seeds)),
                "per_seed": d and " ".join(f"{x:.4f}" for x in d.per_seed),
                "verdict": q.verdict,
            }
        )
    return pd.DataFrame(rows)


def markdown(design: dict, questions: list[Question], meta: list[tuple[str, str]]) -> str:
    lines = [
        f"# Pre-registered questions: {design['study']}",
        "",
        f"Registered {design.get('registered')} in `{design['file']}` ({design.get('page')}), before the study's first run.",
        f"Primary metric: {design.get('primary')}; lower is better, so a negative difference favours the first condition.",
        f"Holm's correction over these {len(questions)} comparisons only, at alpha = {design.get('alpha')}; "
        f"smallest effect of interest {design.get('smallest_effect')} nats. Everything else in this report is exploratory.",
        f"Power: the chance of establishing a true difference of {design.get('smallest_effect')} nats with the standard error and "
        f"seeds achieved (two-sided t at alpha / {len(questions)}, Holm's first step).",
        "",
        "| question | a - b (nats) | 95% interval | half-width | p | Holm p | power | seeds | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for q in questions:
        d = q.result
        if d is None:
            lines.append(f"| {describe(q.a)} - {describe(q.b)} | - | - | - | - | - | - | 0 | not run: no seed has every condition |")
            continue
        lines.append(
            f"| {describe(q.a)} - {describe(q.b)} | {d.diff:+.3f} | [{d.low:+.3f}, {d.high:+.3f}] | {d.half_width:.3f} | "
            f"{d.p_value:.4f} | {d.p_holm:.4f} | {_percent(power(design, questions, d))} | "
            f"{len(d.seeds)} ({', '.join(map(str, d.seeds))}) | {q.verdict} |"
        )
    lines += ["", *(f"- {k}: {v}" for k, v in meta), ""]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def curves_frame(design: dict, runs: list[RunRecord]) -> pd.DataFrame:
    """Validation target NLL at each validation step, per run of the design's conditions."""
    conditions = {describe(c): c for q in design["family"] for c in (q["a"], q["b"])}
    rows = []
    for name, condition in conditions.items():
        for r in runs:
            if matches(r, condition) and r.training is not None:
                rows += [
                    {"condition": name, "seed": r.seed, "step": step, "validation_nll": nll}
                    for step, _, nll in r.training.validations
                    if nll is not None
                ]
    return pd.DataFrame(rows, columns=["condition", "seed", "step", "validation_nll"])


def plot_curves(data: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """curves.svg and curves.png: each condition's mean validation NLL over its seeds by
    step, with the band from the lowest to the highest seed."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context({"svg.hashsalt": "flix", "svg.fonttype": "none"}):
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        for name, part in data.groupby("condition", sort=True):
            stats = part.groupby("step")["validation_nll"].agg(["mean", "min", "max", "count"])
            seeds = part["seed"].nunique()
            line = ax.plot(stats.index, stats["mean"], marker="o", label=f"{name} ({seeds} seed{'' if seeds == 1 else 's'})")[0]
            ax.fill_between(stats.index, stats["min"], stats["max"], color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation target NLL (nats per token)")
        ax.set_title(title, fontsize=10)
        if len(data):
            ax.legend(fontsize=8)
        written = []
        for suffix, kwargs in (("svg", {"metadata": {"Date": None}}), ("png", {"dpi": 120})):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=suffix, bbox_inches="tight", **kwargs)
            written.append(atomic_write_bytes(out_dir / f"curves.{suffix}", buffer.getvalue()))
    return written


def write(design: dict, runs: list[RunRecord], out_dir: Path, meta: list[tuple[str, str]]) -> list[Path]:
    """preregistered.md / .csv and the learning curves (curves.svg, .png, .csv)."""
    questions = analyse(design, runs)
    curves = curves_frame(design, runs)
    return [
        atomic_write_text(out_dir / "preregistered.md", markdown(design, questions, meta)),
        atomic_write_text(out_dir / "preregistered.csv", frame(design, questions).to_csv(index=False, float_format="%.4f")),
        atomic_write_text(out_dir / "curves.csv", curves.to_csv(index=False, float_format="%.4f")),
        *plot_curves(curves, out_dir, f"{design['study']}: validation NLL by step (mean over seeds, band: lowest to highest seed)"),
    ]
