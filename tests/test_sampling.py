"""Mixing rates, and batches that are a pure function of (seed, step)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from flix.data.examples import Example
from flix.data.sampling import MixtureSampler, mixing_rates


def make(task: str, lang: str, n: int) -> list[Example]:
    return [Example(task, lang, f"{lang}-{i}", {"text": str(i)}, "") for i in range(n)]


DATASETS = {
    ("ner", "sw"): make("ner", "sw", 40),
    ("ner", "yo"): make("ner", "yo", 400),
    ("qa_in_lang", "bn"): make("qa_in_lang", "bn", 7),
}


def test_rates_sum_to_one_and_cap():
    sizes = {"small": 100, "big": 10_000}
    uncapped = mixing_rates(sizes, cap=None)
    assert sum(uncapped.values()) == pytest.approx(1)
    assert uncapped["small"] == pytest.approx(100 / 10_100)
    capped = mixing_rates(sizes, cap=1000)
    assert capped["small"] == pytest.approx(100 / 1100) and capped["big"] == pytest.approx(1000 / 1100)
    assert mixing_rates({"a": 5, "b": 10}) == pytest.approx({"a": 1 / 3, "b": 2 / 3})


def test_temperature():
    sizes = {"a": 100, "b": 10_000}
    assert mixing_rates(sizes, "temperature", cap=None, temperature=1) == pytest.approx(mixing_rates(sizes, cap=None))
    sqrt = mixing_rates(sizes, "temperature", cap=None, temperature=2)
    assert sqrt["a"] == pytest.approx(10 / 110)
    flat = mixing_rates(sizes, "temperature", cap=None, temperature=1000)
    assert flat["a"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "uniform"}, "strategy"),
        ({"cap": 0}, "cap"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_rate_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixing_rates({"a": 1}, **kwargs)
    with pytest.raises(ValueError, match="without examples"):
        mixing_rates({"a": 1, "b": 0})


def ids(batch: list[Example]) -> list[str]:
    return [e.id for e in batch]


def test_batches_are_a_function_of_seed_and_step():
    sampler = MixtureSampler(DATASETS, batch_size=32, seed=3)
    first = [ids(sampler.batch(step)) for step in range(10)]
    resumed = MixtureSampler(DATASETS, batch_size=32, seed=3)
    assert [ids(resumed.batch(step)) for step in range(5, 10)] == first[5:]
    assert [ids(sampler.batch(step)) for step in range(10)] == first
    assert first[0] != first[1]
    assert ids(MixtureSampler(DATASETS, batch_size=32, seed=4).batch(0)) != first[0]
    assert all(len(b) == 32 for b in first)


def test_frequencies_follow_rates():
    sampler = MixtureSampler(DATASETS, batch_size=64, seed=0, cap=100)
    counts = Counter(e.dataset for step in range(300) for e in sampler.batch(step))
    total = sum(counts.values())
    for key, rate in sampler.rates.items():
        assert counts[key] / total == pytest.approx(rate, abs=0.02)
    assert sampler.rates[("ner", "yo")] == pytest.approx(100 / 147)


def test_shards_are_disjoint_and_cover_the_batch():
    sampler = MixtureSampler(DATASETS, batch_size=24, seed=1)
    for step in (0, 7):
        shards = [sampler.batch(step, rank, 4) for rank in range(4)]
        assert all(len(s) == 6 for s in shards)
        assert [e for s in shards for e in s] == sampler.batch(step)
    with pytest.raises(ValueError, match="divisible"):
        sampler.batch(0, 0, 5)
    with pytest.raises(ValueError, match="rank"):
        sampler.batch(0, 4, 4)


def test_fast_enough():
    sampler = MixtureSampler(
        {(t, lang): make(t, lang, 1000) for t in ("ner", "qa_in_lang") for lang in "abcdefghij"},
        512,
    )
    start = time.perf_counter()
    for step in range(200):
        sampler.batch(step)
    assert time.perf_counter() - start < 2.0
