"""Intervals and paired tests for table cells: test-example noise and seed noise.

A cell is a mean over evaluation sets of the mean over each set's test sets (a table
column: the languages of a task, or the tasks of a language), averaged over seeds. Runs
record one row of additive statistics per test example (`flix.metrics.example_stats`;
for the target NLL, [nll, 1]) and the example's id, so a resample of the examples is
scored exactly as the metric would score it.

Two sources of noise, combined in every replicate:
- the test examples: each replicate draws every test set's examples with replacement.
  The draw depends only on the test set and its example ids, never on the method or the
  seed, so every run scored on those examples is resampled alike (paired).
- the seeds: with k >= 2 seeds, the spread of the per-seed values, as a t distribution
  with k - 1 degrees of freedom (s / sqrt(k) times a t draw). With one seed there is no
  seed part: the interval covers test-example noise only, and the pages say so.
With 2 or 3 seeds the t part makes intervals wide; that is what 2 or 3 seeds can say
(tests/test_uncertainty.py checks the coverage by simulation).

A paired difference a - b uses the seeds both have (seed s of a against seed s of b):
d = the mean of the per-seed differences d_s, with the variance of the seed spread,
var(d_s) / k, plus the example part, the variance of the seed-averaged difference over
the example resamples. Its interval and two-sided p come from the t distribution with
k - 1 degrees of freedom (the normal with one seed): analytic, so p-values are exact at
the decision line and no random draw is shared between comparisons
(docs/study-ner-nll.md fixed this analysis before its study ran). Marks in the pages are
Holm-corrected over every comparison of the report (`holm`).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from flix.metrics import TASK_METRIC, score_from_stats

REPLICATES = 2000
LEVEL = 0.95
ALPHA = 1 - LEVEL

TestSet = tuple[str, str]  # (task, language)
Groups = Sequence[Sequence[TestSet]]  # evaluation sets, each a list of test sets
SeedStats = Mapping[int, Mapping[TestSet, Sequence[Sequence[float]]]]  # seed -> test set -> per-example rows
Scorer = Callable[[str, Sequence[float]], float]  # (task, summed statistics) -> the score


def mean_of_values(task: str, totals):
    """Scorer of rows [value, 1]: the mean value (the target NLL)."""
    return totals[0] / totals[1]


def _scores(scorer: Scorer, task: str, totals: np.ndarray) -> np.ndarray:
    """The scores of (n, statistics) summed rows: in one array operation, except for chrF
    (sacrebleu scores one row at a time)."""
    if scorer is score_from_stats and TASK_METRIC[task] == "chrf":
        return np.array([scorer(task, t) for t in totals])
    return np.asarray(scorer(task, totals.T), dtype=float)


@dataclass(frozen=True)
class Evidence:
    """What a cell's uncertainty rests on: each seed's value, and each seed's value on
    `n` resamples of the test examples (the same resamples for every seed)."""

    seeds: tuple[int, ...]
    values: np.ndarray = field(repr=False)  # (k,)
    resampled: np.ndarray = field(repr=False)  # (n, k)
    examples: tuple = field(repr=False)  # ((test set, example ids), ...): what pairing checks

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    def replicates(self) -> np.ndarray:
        """(n,) the cell's value under both sources of noise."""
        return self.resampled.mean(axis=1) + seed_noise(self.values, len(self.resampled))


@dataclass(frozen=True)
class Estimate:
    mean: float  # the cell's value: mean over seeds of the mean over test sets
    low: float
    high: float
    seeds: tuple[int, ...]


@dataclass
class Difference:
    diff: float  # a - b, mean over the paired seeds
    low: float
    high: float
    p_value: float  # two-sided, uncorrected
    seeds: tuple[int, ...]  # the paired seeds
    per_seed: tuple[float, ...]  # a - b for each paired seed
    p_holm: float | None = None  # Holm-corrected over the report's comparisons (set by `holm`)
    about: frozenset | None = None  # what is compared, either way round (set by the report): one hypothesis
    se: float | None = None  # standard error of diff (seed and example parts)
    df: float = math.inf  # its t distribution's degrees of freedom (k - 1 seeds)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def significant(self) -> bool:
        """The uncorrected 95% interval excludes 0."""
        return not self.low <= 0.0 <= self.high

    @property
    def significant_holm(self) -> bool:
        return self.p_holm is not None and self.p_holm < ALPHA

    def p_text(self) -> str:
        return f"p = {self.p_value:.4f}" if self.p_value >= 1e-4 else "p < 0.0001"


def _generator(*key: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@functools.lru_cache(maxsize=256)
def _example_weights(test_set: TestSet, ids: tuple, replicates: int) -> np.ndarray:
    """(replicates, size) resampling counts of a test set's examples: multinomial draws
    that depend only on the test set and its examples. Cached (read-only): every cell and
    difference over one test set uses the same draws, and drawing them is most of a report."""
    size = len(ids)
    weights = _generator("examples", test_set, ids).multinomial(size, np.full(size, 1.0 / size), size=replicates)
    weights.flags.writeable = False
    return weights


def seed_noise(values: np.ndarray, n: int) -> np.ndarray:
    """(n,) draws of the seed part of a mean over k seeds: s / sqrt(k) times a t(k - 1)
    draw; zeros with one seed (nothing to estimate it from)."""
    k = len(values)
    if k < 2:
        return np.zeros(n)
    return float(np.std(values, ddof=1)) / np.sqrt(k) * _generator("seeds", k, n).standard_t(k - 1, size=n)


def evidence(
    runs: SeedStats, groups: Groups, ids: Mapping[TestSet, Sequence[str]] | None = None, scorer: Scorer = score_from_stats, n: int = REPLICATES
) -> Evidence:
    """A cell's evidence from its runs' per-example statistics. `ids`: each test set's
    example ids (every seed scored the same examples); None: identified by position."""
    seeds = sorted(runs)
    values, resampled = np.zeros(len(seeds)), np.zeros((n, len(seeds)))
    examples = []
    for group in groups:
        share = 1.0 / (len(group) * len(groups))
        for test_set in group:
            rows = [np.asarray(runs[seed][test_set], dtype=float) for seed in seeds]
            sizes = {len(r) for r in rows}
            if len(sizes) != 1:
                raise ValueError(f"{test_set}: seeds scored different numbers of test examples {sorted(sizes)}")
            size = sizes.pop()
            names = tuple(ids[test_set]) if ids is not None else tuple(range(size))
            if len(names) != size:
                raise ValueError(f"{test_set}: {len(names)} example ids for {size} examples")
            examples.append((test_set, names))
            weights = _example_weights(test_set, names, n)
            for s, stats in enumerate(rows):
                values[s] += float(_scores(scorer, test_set[0], stats.sum(0, keepdims=True))[0]) * share
                resampled[:, s] += _scores(scorer, test_set[0], weights @ stats) * share
    return Evidence(tuple(seeds), values, resampled, tuple(examples))


def average(parts: Sequence[Evidence]) -> Evidence:
    """The evidence of the plain mean of cells (a row's Avg.); they must share their seeds."""
    if len({p.seeds for p in parts}) != 1:
        raise ValueError(f"cells of different seeds cannot be averaged: {sorted({p.seeds for p in parts})}")
    return Evidence(
        parts[0].seeds,
        np.mean([p.values for p in parts], axis=0),
        np.mean([p.resampled for p in parts], axis=0),
        tuple(e for p in parts for e in p.examples),
    )


def interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(samples, [ALPHA / 2, 1 - ALPHA / 2])
    return float(low), float(high)


def estimate(cell: Evidence) -> Estimate:
    """The cell's value with a percentile interval at LEVEL."""
    return Estimate(cell.mean, *interval(cell.replicates()), cell.seeds)


def difference(a: Evidence, b: Evidence) -> Difference:
    """a - b, paired by seed and by example. ValueError when they share no seed or were
    scored on different examples (then nothing pairs them)."""
    seeds = sorted(set(a.seeds) & set(b.seeds))
    if not seeds:
        raise ValueError(f"no seed in common (seeds {list(a.seeds)} vs {list(b.seeds)})")
    if a.examples != b.examples:
        raise ValueError("scored on different test examples (ids differ); regenerate the runs on the same samples")
    ia, ib = [a.seeds.index(s) for s in seeds], [b.seeds.index(s) for s in seeds]
    per_seed = a.values[ia] - b.values[ib]
    k = len(seeds)
    examples = (a.resampled[:, ia] - b.resampled[:, ib]).mean(axis=1)  # the seed-averaged difference, examples resampled
    variance = float(np.var(examples, ddof=1)) + (float(np.var(per_seed, ddof=1)) / k if k > 1 else 0.0)
    diff, se, df = float(np.mean(per_seed)), math.sqrt(variance), k - 1 if k > 1 else math.inf
    half = t_quantile(1 - ALPHA / 2, df) * se
    p_value = t_two_sided_p(diff / se, df) if se > 0 else float(diff == 0)
    return Difference(diff, diff - half, diff + half, p_value, tuple(seeds), tuple(map(float, per_seed)), se=se, df=df)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with integer df (math.inf: the normal); exact finite
    series (Abramowitz and Stegun 26.7.3-4), no sampling."""
    t = abs(t)
    if math.isinf(df):
        return math.erfc(t / math.sqrt(2))
    df = int(df)
    theta = math.atan(t / math.sqrt(df))
    c2, total, term = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd
        for j in range(3, df, 2):  # 1 + (2/3) c^2 + (2*4)/(3*5) c^4 + ...
            term *= (j - 1) / j * c2
            total += term
        inside = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    else:
        for j in range(2, df, 2):  # 1 + (1/2) c^2 + (1*3)/(2*4) c^4 + ...
            term *= (j - 1) / j * c2
            total += term
        inside = math.sin(theta) * total
    return min(1.0, max(0.0, 1.0 - inside))


def t_quantile(q: float, df: float) -> float:
    """The q quantile (q > 0.5) of Student's t: bisection on t_two_sided_p."""
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > 2 * (1 - q):
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_p(mid, df) > 2 * (1 - q) else (low, mid)
    return (low + high) / 2


def t_power(effect: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """P(a two-sided t test at `alpha` rejects) when the true difference is `effect` and the
    estimate has standard error `se` with `df` degrees of freedom: the noncentral t's tails
    beyond the critical value, integrated over the chi-square of the variance estimate
    (Simpson's rule over w = sqrt(chi-square); deterministic, no scipy)."""
    crit, shift = t_quantile(1 - alpha / 2, df), effect / se

    def tails(scale: float) -> float:  # P(|Z + shift| > crit * scale), Z standard normal
        return 0.5 * (math.erfc((crit * scale - shift) / math.sqrt(2)) + math.erfc((crit * scale + shift) / math.sqrt(2)))

    if math.isinf(df):
        return tails(1.0)
    # w = sqrt(V), V ~ chi-square(df): density 2 w^(df-1) exp(-w^2/2) / (2^(df/2) Gamma(df/2))
    log_norm = math.log(2) - (df / 2) * math.log(2) - math.lgamma(df / 2)
    top, steps = math.sqrt(df) + 12.0, 4000
    h = top / steps
    total = 0.0
    for i in range(steps + 1):
        w = i * h
        density = math.exp(log_norm + (df - 1) * math.log(w) - w * w / 2) if w > 0 else (math.exp(log_norm) if df == 1 else 0.0)
        weight = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += weight * density * tails(w / math.sqrt(df))
    return total * h / 3


def holm(differences: Sequence[Difference]) -> None:
    """Set each difference's Holm-corrected p-value (step-down). A comparison shown twice
    (the same `about`, e.g. in Table 3 and in the dropout-modes table, or either way round)
    is one hypothesis: counted once, at the larger of its p-values, and given one p_holm."""
    groups: dict = {}
    for d in differences:
        groups.setdefault(d.about if d.about is not None else id(d), []).append(d)
    hypotheses = sorted(groups.values(), key=lambda group: max(d.p_value for d in group))
    running = 0.0
    for rank, group in enumerate(hypotheses):
        running = max(running, min(1.0, (len(hypotheses) - rank) * max(d.p_value for d in group)))
        for d in group:
            d.p_holm = running
