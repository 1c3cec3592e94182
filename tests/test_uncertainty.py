"""Intervals and paired tests over per-example statistics and seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flix import metrics
from flix.report.uncertainty import average, difference, estimate, evidence, holm, mean_of_values, t_power, t_quantile, t_two_sided_p

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
    per_seed = [np.mean([100 * np.mean([r[0] for r in seed[s]]) for s in SETS]) for seed in a.values()]
    cell = evidence(a, GROUPS, n=500)
    est = estimate(cell)
    assert est.mean == pytest.approx(np.mean(per_seed)) and cell.values == pytest.approx(per_seed)
    assert est.low < est.mean < est.high and est.seeds == (0, 1)
    assert estimate(evidence(a, GROUPS, n=500)) == est  # deterministic


def test_seed_spread_widens_the_interval_beyond_the_example_noise():
    """Two seeds 20 points apart on the same examples: the old bootstrap's seed part was
    about [lower seed, higher seed]; a t(1) part is far wider, as 2 seeds warrant."""
    low = {SETS[0]: coin(0.3, 200, 1), SETS[1]: coin(0.3, 200, 2)}
    high = {SETS[0]: coin(0.5, 200, 1), SETS[1]: coin(0.5, 200, 2)}
    two = estimate(evidence(runs(low, high), GROUPS, n=1000))
    one = estimate(evidence(runs(low), GROUPS, n=1000))
    assert two.high - two.low > 3 * (one.high - one.low)
    assert two.low < 30 and two.high > 50  # covers both seeds' values and beyond


@pytest.mark.parametrize("k", [2, 3])
def test_interval_covers_the_true_mean_at_nominal_rate_with_few_seeds(k):
    """Simulated studies: each seed's accuracy is the true 50 plus a training effect
    (sd 5 points), all seeds scored on one test sample of 100 examples. The old interval
    covered the true mean ~48% (k=2) and ~72% (k=3) of the time; this one >= ~90%."""
    rng = np.random.default_rng(0)
    covered, trials = 0, 200
    for trial in range(trials):
        latent = rng.random(100)  # example difficulty: the test sample is drawn once per study
        per_seed = {}
        for seed in range(k):
            p = np.clip(0.5 + rng.normal(0, 0.05), 0, 1)
            per_seed[seed] = {SETS[0]: accuracy_rows((latent < p).astype(int).tolist())}
        est = estimate(evidence(per_seed, [SETS[:1]], ids={SETS[0]: [f"{trial}-{i}" for i in range(100)]}, n=400))
        covered += est.low <= 50.0 <= est.high
    assert covered / trials >= 0.9


def test_paired_difference_sees_a_consistent_gain_and_not_noise():
    base = {SETS[0]: coin(0.4, 80, 1), SETS[1]: coin(0.4, 80, 2)}
    better = {s: [max(h, c) for h, c in zip(hits, coin(0.15, 80, 9 + i))] for i, (s, hits) in enumerate(base.items())}
    same = difference(evidence(runs(base), GROUPS, n=500), evidence(runs(base), GROUPS, n=500))
    assert (same.diff, same.low, same.high, same.p_value, same.significant) == (0.0, 0.0, 0.0, 1.0, False)
    gain = difference(evidence(runs(better), GROUPS, n=1000), evidence(runs(base), GROUPS, n=1000))
    assert gain.diff > 0 and gain.significant and gain.p_value < 0.01
    # an unrelated model with the same accuracy: a difference inside the noise
    other = {SETS[0]: coin(0.4, 80, 21), SETS[1]: coin(0.4, 80, 22)}
    noise = difference(evidence(runs(other), GROUPS, n=1000), evidence(runs(base), GROUPS, n=1000))
    assert not noise.significant and noise.p_value > 0.05


def test_a_difference_read_the_other_way_round_is_its_mirror():
    """Table 2 shows FLix - compute-matched and the dropout-modes table compute-matched -
    FLix: the same comparison must give the same p and the mirrored interval."""
    a = evidence(runs({SETS[0]: coin(0.5, 60, 1)}, {SETS[0]: coin(0.6, 60, 2)}, {SETS[0]: coin(0.4, 60, 3)}), [SETS[:1]], n=1000)
    b = evidence(runs({SETS[0]: coin(0.45, 60, 4)}, {SETS[0]: coin(0.5, 60, 5)}, {SETS[0]: coin(0.5, 60, 6)}), [SETS[:1]], n=1000)
    ab, ba = difference(a, b), difference(b, a)
    assert ba.diff == pytest.approx(-ab.diff) and ba.per_seed == pytest.approx([-d for d in ab.per_seed])
    assert (ba.low, ba.high) == pytest.approx((-ab.high, -ab.low)) and ba.p_value == ab.p_value


def test_a_certain_gain_has_p_zero_and_the_t_quantiles_are_right():
    base = {SETS[0]: [0] * 60, SETS[1]: [0] * 60}
    perfect = {SETS[0]: [1] * 60, SETS[1]: [1] * 60}
    gain = difference(evidence(runs(perfect), GROUPS, n=500), evidence(runs(base), GROUPS, n=500))
    assert gain.p_value == 0.0 and gain.p_text() == "p < 0.0001" and gain.low == gain.high == 100.0
    for df, quantile in [(1, 12.7062), (2, 4.3027), (9, 2.2622), (30, 2.0423), (math.inf, 1.9600)]:  # printed tables
        assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
        assert t_two_sided_p(t_quantile(0.975, df), df) == pytest.approx(0.05, abs=1e-9)
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5) and t_two_sided_p(0.0, 7) == 1.0


@pytest.mark.parametrize("k", [3, pytest.param(10, marks=pytest.mark.slow)])  # 10 seeds: the design's, in the whole suite
def test_paired_differences_cover_and_reject_at_the_nominal_rates_under_no_difference(k):
    """Simulated paired studies with no true difference: every example's NLL is its
    difficulty plus noise, each seed adds a training effect (sd 0.05 nats) to each
    condition, both conditions are scored on the study's one test sample. The 95% interval
    must cover 0 and p < 0.05 must occur at most at the nominal rates (the old p reused one
    set of seed draws for every comparison). The test is conservative: the seed-by-example
    noise is in both variance parts (0.25% false positives at k = 3 here, about 2.5% at
    k = 10; docs/evidence.md)."""
    rng = np.random.default_rng(1)
    trials, rejected, covered = 400, 0, 0
    for trial in range(trials):
        difficulty = rng.gamma(2.0, 0.5, size=120)
        ids = {SETS[0]: [f"{trial}-{i}" for i in range(120)]}
        sides = []
        for _ in range(2):
            per_seed = {s: {SETS[0]: [[d + rng.normal(0, 0.3) + shift, 1.0] for d in difficulty]} for s, shift in enumerate(rng.normal(0, 0.05, k))}
            sides.append(evidence(per_seed, [SETS[:1]], ids=ids, scorer=mean_of_values, n=300))
        d = difference(*sides)
        rejected += d.p_value < 0.05
        covered += d.low <= 0.0 <= d.high
    assert rejected / trials <= 0.073  # binomial(400, 0.05): 97.5% of draws below 0.073
    assert covered / trials == pytest.approx(1 - rejected / trials)  # the interval and the test agree


@pytest.mark.parametrize("df", [1, 2, 9, math.inf])
def test_power_is_the_tests_rejection_rate_at_a_true_difference(df):
    """t_power against a simulation of the test it describes: the estimate a true effect
    plus se times a t draw (a normal over the root of a chi-square's mean), rejected when
    past the critical value. No difference: the test's size, alpha itself."""
    rng = np.random.default_rng(7)
    n = 400_000
    for effect, alpha in ((0.0, 0.05), (0.1, 0.05), (0.15, 0.025)):
        se = 0.04
        spread = 1.0 if math.isinf(df) else np.sqrt(rng.chisquare(df, n) / df)
        t = (rng.standard_normal(n) + effect / se) / spread
        simulated = float(np.mean(np.abs(t) > t_quantile(1 - alpha / 2, df)))
        assert t_power(effect, se, df, alpha) == pytest.approx(simulated, abs=0.004), (effect, alpha)
    assert t_power(0.0, 0.04, df) == pytest.approx(0.05, abs=1e-6)
    assert t_power(0.05, 0.04, df) < t_power(0.1, 0.04, df) < t_power(0.1, 0.02, df)  # larger effects, smaller errors


def test_differences_pair_by_seed_and_refuse_other_examples():
    a = evidence(runs({SETS[0]: coin(0.5, 50, 1)}, {SETS[0]: coin(0.5, 50, 2)}), [SETS[:1]], n=200)
    b = evidence(runs({SETS[0]: coin(0.4, 50, 3)}), [SETS[:1]], n=200)  # seed 0 only
    d = difference(a, b)
    assert d.seeds == (0,) and d.per_seed == pytest.approx((a.values[0] - b.values[0],))
    ids = {SETS[0]: [f"x{i}" for i in range(50)]}
    moved = evidence(runs({SETS[0]: coin(0.4, 50, 3)}), [SETS[:1]], ids=ids, n=200)
    with pytest.raises(ValueError, match="different test examples"):
        difference(a, moved)
    later = evidence({5: {SETS[0]: accuracy_rows(coin(0.4, 50, 3))}}, [SETS[:1]], n=200)
    with pytest.raises(ValueError, match="no seed in common"):
        difference(a, later)


def test_holm_adjusts_step_down_and_keeps_order():
    diffs = [
        difference(evidence(runs({SETS[0]: coin(p, 80, i)}), [SETS[:1]], n=400), evidence(runs({SETS[0]: coin(0.4, 80, 99)}), [SETS[:1]], n=400))
        for i, p in enumerate((0.9, 0.45, 0.7))
    ]
    holm(diffs)
    raw = [d.p_value for d in diffs]
    order = np.argsort(raw)
    expected = np.maximum.accumulate([min(1.0, (3 - r) * raw[i]) for r, i in enumerate(order)])
    assert [diffs[i].p_holm for i in order] == pytest.approx(list(expected))
    assert all(d.p_holm >= d.p_value for d in diffs)


def test_works_on_the_real_metrics_statistics():
    """NER span counts: the point equals flix.metrics' own score of the same pairs."""
    targets = ["PER: Ada $$ LOC: Lagos", "ORG: UN", "", "LOC: Accra"] * 5
    predictions = ["PER: Ada", "ORG: UN", "PER: Bo", "LOC: Accra $$ LOC: Tema"] * 5
    rows = metrics.example_stats("ner", targets, predictions)
    est = estimate(evidence({0: {("ner", "ha"): rows}}, [[("ner", "ha")]], n=300))
    assert est.mean == pytest.approx(metrics.score("ner", targets, predictions))
    assert est.low <= est.mean <= est.high


def test_nll_rows_average_per_example_values():
    values = [1.0, 2.0, 4.0, 5.0]
    est = estimate(evidence({0: {("ner", "ha"): [[v, 1.0] for v in values]}}, [[("ner", "ha")]], scorer=mean_of_values, n=300))
    assert est.mean == pytest.approx(3.0) and est.low < 3.0 < est.high


def test_mismatched_test_sizes_across_seeds_are_refused():
    bad = {0: {SETS[0]: accuracy_rows([1, 0])}, 1: {SETS[0]: accuracy_rows([1, 0, 1])}}
    with pytest.raises(ValueError, match="different numbers of test examples"):
        evidence(bad, [SETS[:1]], n=10)


def test_groups_average_like_the_tables_and_rows_average_cells():
    """Evaluation sets of two and one languages: the cell is the mean of the sets' means."""
    sets = {("qa_in_lang", "sw"): coin(0.8, 30, 1), ("qa_in_lang", "bn"): coin(0.2, 30, 2)}
    stats = {0: {s: [[float(h), 1.0] for h in hits] for s, hits in sets.items()}}
    acc = {s: 100 * np.mean(h) for s, h in sets.items()}
    groups = [[("qa_in_lang", "sw"), ("qa_in_lang", "bn")], [("qa_in_lang", "sw")]]
    expected = np.mean([(acc[("qa_in_lang", "sw")] + acc[("qa_in_lang", "bn")]) / 2, acc[("qa_in_lang", "sw")]])
    est = estimate(evidence(stats, groups, n=200))
    assert est.mean == pytest.approx(expected) and est.low <= est.mean <= est.high
    both = average([evidence(stats, groups[:1], n=200), evidence(stats, groups[1:], n=200)])
    assert both.mean == pytest.approx(expected)


def test_holm_counts_a_comparison_shown_twice_once():
    """The same two sets of runs compared in two tables (or either way round) are one
    hypothesis: two hypotheses here, not three."""
    a, b, c = (evidence(runs({SETS[0]: coin(p, 80, i)}), [SETS[:1]], n=400) for i, p in enumerate((0.9, 0.45, 0.4)))
    ab, ba, cb = difference(a, b), difference(b, a), difference(c, b)
    ab.about = ba.about = frozenset({"a", "b"})
    cb.about = frozenset({"c", "b"})
    holm([ab, ba, cb])
    p_ab = max(ab.p_value, ba.p_value)
    low, high = sorted([p_ab, cb.p_value])
    first, second = min(1.0, 2 * low), max(min(1.0, 2 * low), min(1.0, high))
    expected = {p_ab: first, cb.p_value: second} if p_ab <= cb.p_value else {cb.p_value: first, p_ab: second}
    assert ab.p_holm == ba.p_holm == pytest.approx(expected[p_ab])
    assert cb.p_holm == pytest.approx(expected[cb.p_value])
