"""Bootstrap intervals and paired tests over per-example statistics."""

from __future__ import annotations

import numpy as np
import pytest

from flix import metrics
from flix.report.uncertainty import estimate, paired_difference

SETS = [("semantic_parsing", "de"), ("semantic_parsing", "fr")]
GROUPS = [SETS]  # one evaluation set of two languages


def accuracy_rows(correct: list[int]) -> list[list[float]]:
    return [[float(c), 1.0] for c in correct]


def runs(*per_seed: dict) -> dict:
    return {seed: {s: accuracy_rows(hits) for s, hits in sets.items()} for seed, sets in enumerate(per_seed)}


def coin(p: float, n: int, seed: int) -> list[int]:
    return (np.random.default_rng(seed).random(n) < p).astype(int).tolist()


def test_point_is_the_mean_over_sets_and_seeds_and_the_interval_covers_it():
    a = runs({SETS[0]: coin(0.5, 60, 1), SETS[1]: coin(0.3, 60, 2)}, {SETS[0]: coin(0.6, 60, 3), SETS[1]: coin(0.2, 60, 4)})
    expected = np.mean(
        [
            np.mean([100 * np.mean(h) for h in (s[SETS[0]], s[SETS[1]])])
            for s in ({s: [r[0] for r in rows] for s, rows in seed.items()} for seed in a.values())
        ]
    )
    est = estimate(a, GROUPS, n=500)
    assert est.mean == pytest.approx(expected)
    assert est.low < est.mean < est.high and est.seeds == (0, 1)
    assert estimate(a, GROUPS, n=500) == est  # deterministic


def test_interval_narrows_with_more_examples():
    small = runs({SETS[0]: coin(0.5, 40, 1), SETS[1]: coin(0.5, 40, 2)})
    large = runs({SETS[0]: coin(0.5, 640, 1), SETS[1]: coin(0.5, 640, 2)})
    width = lambda r: (lambda e: e.high - e.low)(estimate(r, GROUPS, n=500))  # noqa: E731
    assert width(large) < 0.5 * width(small)


def test_paired_difference_sees_a_consistent_gain_and_not_noise():
    base = {SETS[0]: coin(0.4, 80, 1), SETS[1]: coin(0.4, 80, 2)}
    better = {s: [max(h, c) for h, c in zip(hits, coin(0.15, 80, 9 + i))] for i, (s, hits) in enumerate(base.items())}
    same = paired_difference(runs(base), runs(base), GROUPS, n=500)
    assert (same.diff, same.low, same.high, same.p_value, same.significant) == (0.0, 0.0, 0.0, 1.0, False)
    gain = paired_difference(runs(better), runs(base), GROUPS, n=1000)
    assert gain.diff > 0 and gain.significant and gain.p_value < 0.01
    # an unrelated model with the same accuracy: a difference inside the noise
    other = {SETS[0]: coin(0.4, 80, 21), SETS[1]: coin(0.4, 80, 22)}
    noise = paired_difference(runs(other), runs(base), GROUPS, n=1000)
    assert not noise.significant and noise.p_value > 0.05


def test_works_on_the_real_metrics_statistics():
    """NER span counts: the point equals flix.metrics' own score of the same pairs."""
    targets = ["PER: Ada $$ LOC: Lagos", "ORG: UN", "", "LOC: Accra"] * 5
    predictions = ["PER: Ada", "ORG: UN", "PER: Bo", "LOC: Accra $$ LOC: Tema"] * 5
    rows = metrics.example_stats("ner", targets, predictions)
    est = estimate({0: {("ner", "ha"): rows}}, [[("ner", "ha")]], n=300)
    assert est.mean == pytest.approx(metrics.score("ner", targets, predictions))
    assert est.low <= est.mean <= est.high


def test_mismatched_test_sizes_across_seeds_are_refused():
    bad = {0: {SETS[0]: accuracy_rows([1, 0])}, 1: {SETS[0]: accuracy_rows([1, 0, 1])}}
    with pytest.raises(ValueError, match="different numbers of test examples"):
        estimate(bad, [SETS[:1]], n=10)


def test_groups_average_like_the_tables():
    """Evaluation sets of two and one languages: the cell is the mean of the sets' means."""
    sets = {("qa_in_lang", "sw"): coin(0.8, 30, 1), ("qa_in_lang", "bn"): coin(0.2, 30, 2)}
    stats = {0: {s: [[float(h), 1.0] for h in hits] for s, hits in sets.items()}}
    acc = {s: 100 * np.mean(h) for s, h in sets.items()}
    groups = [[("qa_in_lang", "sw"), ("qa_in_lang", "bn")], [("qa_in_lang", "sw")]]
    expected = np.mean([(acc[("qa_in_lang", "sw")] + acc[("qa_in_lang", "bn")]) / 2, acc[("qa_in_lang", "sw")]])
    est = estimate(stats, groups, n=200)
    assert est.mean == pytest.approx(expected) and est.low <= est.mean <= est.high
