"""Intervals and paired tests for table cells, by bootstrap over test examples and seeds.

A cell is a mean over test sets (a table column: the languages of a task, or the tasks
of a language), averaged over seeds. Runs record one row of additive statistics per
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


def replicates(runs: SeedStats, test_sets: Sequence[TestSet], n: int = REPLICATES) -> np.ndarray:
    """(n,) bootstrap replicates of the cell: mean over drawn seeds of the mean over test sets."""
    seeds = sorted(runs)
    per_seed = np.zeros((n, len(seeds)))
    for test_set in test_sets:
        rows = [np.asarray(runs[seed][test_set], dtype=float) for seed in seeds]
        sizes = {len(r) for r in rows}
        if len(sizes) != 1:
            raise ValueError(f"{test_set}: seeds scored different numbers of test examples {sorted(sizes)}")
        weights = _example_weights(test_set, sizes.pop(), n)
        for s, stats in enumerate(rows):
            totals = weights @ stats  # (n, k): each replicate's summed statistics
            per_seed[:, s] += [score_from_stats(test_set[0], t) for t in totals]
    per_seed /= len(test_sets)
    draws = _seed_draws(seeds, n)
    return np.take_along_axis(per_seed, draws, axis=1).mean(axis=1)


def _point(runs: SeedStats, test_sets: Sequence[TestSet]) -> float:
    return float(np.mean([
        np.mean([score_from_stats(task, np.asarray(runs[seed][(task, lang)], dtype=float).sum(0)) for task, lang in test_sets])
        for seed in runs
    ]))


def estimate(runs: SeedStats, test_sets: Sequence[TestSet], n: int = REPLICATES) -> Estimate:
    """The cell's value with a percentile interval at LEVEL."""
    samples = replicates(runs, test_sets, n)
    low, high = np.quantile(samples, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(_point(runs, test_sets), float(low), float(high), tuple(sorted(runs)))


def paired_difference(a: SeedStats, b: SeedStats, test_sets: Sequence[TestSet], n: int = REPLICATES) -> Difference:
    """a - b over the same resampled examples (and seeds, by position), with its interval
    and a two-sided p-value: twice the smaller share of replicates on either side of 0."""
    delta = replicates(a, test_sets, n) - replicates(b, test_sets, n)
    low, high = np.quantile(delta, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    p_value = min(1.0, 2 * min(float(np.mean(delta <= 0)), float(np.mean(delta >= 0))))
    return Difference(_point(a, test_sets) - _point(b, test_sets), float(low), float(high), p_value)
