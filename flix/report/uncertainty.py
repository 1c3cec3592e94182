"""Intervals and paired tests for table cells, by bootstrap over test examples and seeds.

A cell is a mean over evaluation sets of the mean over each set's test sets (a table
column: the languages of a task, or the tasks of a language), averaged over seeds. Runs record one row of additive statistics per
test example (`flix.metrics.example_stats`), so a resample of the examples is scored
exactly as the official metric would score it (`flix.metrics.score_from_stats`).

Each bootstrap replicate draws, for every test set, its examples with replacement
(each set keeps its size) and, when there are several seeds, the seeds with
replacement. The draws depend only on the test set and the replicate, never on the
method, so two methods' replicates are paired: their difference resamples the same
examples, which is what makes a small difference on a small test set testable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from flix.metrics import score_from_stats

REPLICATES = 2000
LEVEL = 0.95

TestSet = tuple[str, str]  # (task, language)
Groups = Sequence[Sequence[TestSet]]  # evaluation sets, each a list of test sets
SeedStats = Mapping[int, Mapping[TestSet, Sequence[Sequence[float]]]]  # seed -> test set -> per-example rows


@dataclass(frozen=True)
class Estimate:
    mean: float  # the cell's value: mean over seeds of the mean over test sets
    low: float
    high: float
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Difference:
    diff: float  # a - b
    low: float
    high: float
    p_value: float  # two-sided, from the paired bootstrap

    @property
    def significant(self) -> bool:
        return not self.low <= 0.0 <= self.high


def _generator(*key: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _example_weights(test_set: TestSet, size: int, replicates: int) -> np.ndarray:
    """(replicates, size) resampling counts of a test set's examples: multinomial draws."""
    return _generator("examples", test_set, size).multinomial(size, np.full(size, 1.0 / size), size=replicates)


def _seed_draws(seeds: Sequence[int], replicates: int) -> np.ndarray:
    """(replicates, len(seeds)) positions into `seeds`; only the seeds themselves with one seed."""
    if len(seeds) == 1:
        return np.zeros((replicates, 1), dtype=int)
    return _generator("seeds", tuple(seeds)).integers(len(seeds), size=(replicates, len(seeds)))


def replicates(runs: SeedStats, groups: Groups, n: int = REPLICATES) -> np.ndarray:
    """(n,) bootstrap replicates of a cell: mean over drawn seeds of the mean over groups
    of the mean over each group's test sets."""
    seeds = sorted(runs)
    per_seed = np.zeros((n, len(seeds)))
    for group in groups:
        for test_set in group:
            rows = [np.asarray(runs[seed][test_set], dtype=float) for seed in seeds]
            sizes = {len(r) for r in rows}
            if len(sizes) != 1:
                raise ValueError(f"{test_set}: seeds scored different numbers of test examples {sorted(sizes)}")
            weights = _example_weights(test_set, sizes.pop(), n)
            for s, stats in enumerate(rows):
                totals = weights @ stats  # (n, k): each replicate's summed statistics
                per_seed[:, s] += np.array([score_from_stats(test_set[0], t) for t in totals]) / (len(group) * len(groups))
    draws = _seed_draws(seeds, n)
    return np.take_along_axis(per_seed, draws, axis=1).mean(axis=1)


def point(runs: SeedStats, groups: Groups) -> float:
    """The cell's value from the same statistics: what results.json's scores average to."""

    def score(seed, test_set):
        return score_from_stats(test_set[0], np.asarray(runs[seed][test_set], dtype=float).sum(0))

    return float(np.mean([np.mean([np.mean([score(seed, t) for t in group]) for group in groups]) for seed in runs]))


def interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(samples, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


def compare(a: np.ndarray, b: np.ndarray, diff: float) -> Difference:
    """a - b from paired replicates, with its interval and a two-sided p-value: twice the
    smaller share of replicates on either side of 0, counted as (k + 1) / (n + 1) so that
    it is never 0 (n replicates cannot show a p-value below about 2 / n)."""
    delta = a - b
    k = min(int(np.sum(delta <= 0)), int(np.sum(delta >= 0)))
    p_value = min(1.0, 2 * (k + 1) / (len(delta) + 1))
    return Difference(diff, *interval(delta), p_value)


def estimate(runs: SeedStats, groups: Groups, n: int = REPLICATES) -> Estimate:
    """The cell's value with a percentile interval at LEVEL."""
    return Estimate(point(runs, groups), *interval(replicates(runs, groups, n)), tuple(sorted(runs)))


def paired_difference(a: SeedStats, b: SeedStats, groups: Groups, n: int = REPLICATES) -> Difference:
    """a - b over the same resampled examples (and seeds, by position)."""
    return compare(replicates(a, groups, n), replicates(b, groups, n), point(a, groups) - point(b, groups))
