"""Mixing rates over datasets, a stateless, resumable batch sampler, and the fixed
random samples of validation and test files that runs are scored on.

A batch is a pure function of (seed, step): resuming at step k draws exactly the
batches an uninterrupted run draws, with no iterator state to save. Examples are drawn
with replacement (dataset by its mixing rate, then an example uniformly inside it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np

from flix.data.examples import Example
from flix.data.reader import iter_resolved

STRATEGIES = ("proportional", "temperature")

# Default: examples-proportional mixing with a cap (T5, Raffel et al. 2020). A dataset
# counts as at most DEFAULT_CAP examples, about the size of one low-resource XTREME-UP
# training file: big files (MTOP, TyDi ar, translation) cannot drown the small
# under-represented-language datasets the paper is about, and datasets below the cap
# keep their natural proportion instead of being oversampled into memorisation.
DEFAULT_CAP = 5000


def mixing_rates(
    sizes: Mapping[Hashable, int],
    strategy: str = "proportional",
    cap: int | None = DEFAULT_CAP,
    temperature: float = 1.0,
) -> dict[Hashable, float]:
    """Sampling probability per dataset; sums to 1.

    proportional: rate ∝ min(size, cap) (no cap when `cap` is None).
    temperature:  rate ∝ min(size, cap) ** (1 / temperature); T=1 is proportional,
                  large T tends to uniform.
    """
    if not sizes:
        raise ValueError("mixing_rates needs at least one dataset.")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown mixing strategy {strategy!r}; strategies: {', '.join(STRATEGIES)}.")
    if cap is not None and cap < 1:
        raise ValueError(f"cap must be a positive number of examples or None, got {cap}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    empty = [key for key, size in sizes.items() if size <= 0]
    if empty:
        raise ValueError(f"Datasets without examples cannot be mixed: {empty}.")
    counts = np.array([min(size, cap) if cap is not None else size for size in sizes.values()], float)
    weights = counts ** (1.0 / temperature) if strategy == "temperature" else counts
    rates = weights / weights.sum()
    return dict(zip(sizes, rates.tolist(), strict=True))


class MixtureSampler:
    """Batches drawn from several datasets by mixing rate, addressable by step."""

    def __init__(
        self,
        datasets: Mapping[tuple[str, str], list[Example]],
        batch_size: int,
        seed: int = 0,
        strategy: str = "proportional",
        cap: int | None = DEFAULT_CAP,
        temperature: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.keys = list(datasets)
        self.datasets = [list(datasets[key]) for key in self.keys]
        self.batch_size = batch_size
        self.seed = seed
        sizes = {key: len(examples) for key, examples in zip(self.keys, self.datasets, strict=True)}
        self.rates = mixing_rates(sizes, strategy, cap, temperature)
        self._p = np.array([self.rates[key] for key in self.keys])
        self._sizes = np.array([len(examples) for examples in self.datasets])

    def _rng(self, step: int) -> np.random.Generator:
        """A generator that depends only on (seed, step)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        return np.random.default_rng([self.seed, step])

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> list[Example]:
        """The global batch of `step`, or this rank's contiguous shard of it."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by world_size {world_size}; shards must be equal for data parallelism.")
        rng = self._rng(step)
        which = rng.choice(len(self.keys), size=self.batch_size, p=self._p)
        index = (rng.random(self.batch_size) * self._sizes[which]).astype(np.int64)
        shard = self.batch_size // world_size
        lo, hi = rank * shard, (rank + 1) * shard
        return [self.datasets[d][i] for d, i in zip(which[lo:hi], index[lo:hi], strict=True)]


def eval_sample(examples: Sequence[Example], n: int | None, task: str, split: str, lang: str) -> list[Example]:
    """A fixed random sample of `n` examples of one validation or test file (all of it
    when `n` is None or not smaller), kept in file order.

    The draw depends only on (task, split, language, file size): every run, method and
    seed is scored on the same examples, and they are spread over the file rather than
    its first lines (files list consecutive sentences of one article together).
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 1:
        raise ValueError(f"{task}/{split}/{lang}: a sample needs n >= 1 examples, got {n}.")
    key = hashlib.sha256(repr(("eval_sample", task, split, lang, len(examples))).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    keep = np.sort(rng.choice(len(examples), size=n, replace=False))
    return [examples[i] for i in keep]


def read_split(root: Path, datasets: list[tuple[str, str]], split: str, limit: int | None = None) -> dict:
    """{(task, lang): examples} of one split under a resolved data root; with `limit`, each
    file's fixed random sample of that many examples (`eval_sample`: the same for every run)."""
    return {(task, lang): eval_sample(list(iter_resolved(root, task, split, lang)), limit, task, split, lang) for task, lang in datasets}
