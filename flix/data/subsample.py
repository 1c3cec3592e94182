"""A smaller copy of an XTREME-UP directory: the same layout, N lines per file.

Lines are copied verbatim and chosen by (seed, file), so a copy is reproducible and
reads exactly like the source; `counts.json` beside it records every file's size.
`scale_copy` keeps only the files a scale's mixtures read, in that scale's shape
(`flix data mini`, and the test sample in tests/data/).
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from flix.data.mixture_files import load_mixture_by_name, mixture_names
from flix.data.reader import SPLITS, DataError, UsageError, data_files, dataset_path, lang_of, resolve_root

SCALE_DIR = Path(__file__).resolve().parents[2] / "conf" / "scale"


def choose(n_lines: int, per_file: int, seed: int, key: str) -> list[int]:
    """Indices of the kept lines, in file order; depends only on (seed, key)."""
    rng = random.Random(f"{seed}/{key}")
    return sorted(rng.sample(range(n_lines), min(per_file, n_lines)))


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary sibling and rename, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_out(src: Path, out: Path) -> None:
    src, out = src.resolve(), out.resolve()
    if out == src or src in out.parents:
        raise DataError(f"Refusing to write the subsample into the source root {src}; pick another --out.")


def _lines(path: Path) -> list[bytes]:
    with open(path, "rb") as handle:
        return [line if line.endswith(b"\n") else line + b"\n" for line in handle if line.strip()]


def subsample(
    root: str | Path | None,
    out: str | Path,
    per_file: int | Mapping[str, int | None],
    seed: int = 0,
    progress: bool = True,
    datasets: Collection[tuple[str, str]] | None = None,
) -> dict[str, int]:
    """Copy `per_file` seeded lines of every file to `out` (a mapping gives a count per
    split, None keeping the whole file); `datasets`, a set of (task, lang), keeps only
    their files. Returns {"task/split/name": n}."""
    limits = per_file if isinstance(per_file, Mapping) else dict.fromkeys(SPLITS, per_file)
    if any(n is not None and n < 1 for n in limits.values()):
        raise DataError(f"--per-file must be at least 1, got {per_file}.")
    src, dst = resolve_root(root), Path(out).expanduser()
    _check_out(src, dst)
    files = [f for f in data_files(src) if datasets is None or (f[0], lang_of(f[0], f[2])) in datasets]
    counts = {}
    bar = tqdm(files, desc="subsample", unit="file", file=sys.stderr, disable=not progress)
    for task, split, stem, path in bar:
        key = f"{task}/{split}/{stem}"
        lines = _lines(path)
        kept = [lines[i] for i in choose(len(lines), limits[split] or len(lines), seed, key)]
        write_atomic(dst / task / split / path.name, b"".join(kept))
        counts[key] = len(kept)
    write_atomic(dst / "counts.json", (json.dumps(counts, indent=1, sort_keys=True) + "\n").encode())
    return counts


def scale_files(max_langs_per_task: int | None) -> set[tuple[str, str, str]]:
    """(task, split, lang) of every file the mini variants of conf/mixture/ read when cut
    to `max_langs_per_task` languages per task, as a scale cuts them (None: all)."""
    files = set()
    for name in mixture_names():
        mixture = load_mixture_by_name(name, "mini")
        files |= set((mixture.restrict(max_langs_per_task) if max_langs_per_task else mixture).required_files())
    return files


def scale_shape(scale: str) -> tuple[int | None, dict[str, int | None]]:
    """conf/scale/SCALE.yaml's languages per task and lines per split: every training
    draw of one run (steps x batch size), its validation and its test examples."""
    path = SCALE_DIR / f"{scale}.yaml"
    if not path.is_file():
        raise DataError(f"No scale {path}; scales are: {', '.join(sorted(p.stem for p in SCALE_DIR.glob('*.yaml')))}.")
    cfg = OmegaConf.load(path).scale
    return cfg.max_langs_per_task, {"train": cfg.steps * cfg.batch_size, "validation": cfg.eval_examples, "test": cfg.test_examples}


def scale_copy(
    root: str | Path | None,
    out: str | Path,
    scale: str = "cpu",
    seed: int = 0,
    per_split: Mapping[str, int | None] | None = None,
    extra: Collection[tuple[str, str]] = (),
    progress: bool = True,
) -> dict[str, int]:
    """A copy of `root` with every split of each dataset the scale's mixtures read (and
    of the `extra` (task, lang) datasets), cut to the scale's shape or to `per_split`.
    Fails before writing anything when the source lacks a file a run would read."""
    max_langs, shape = scale_shape(scale)
    src = resolve_root(root)
    needed = scale_files(max_langs)
    missing = sorted(str(path) for task, split, lang in needed if not (path := dataset_path(src, task, split, lang)).is_file())
    if missing:
        raise UsageError(
            f"{src} lacks {len(missing)} file(s) that the {scale} scale's mixtures read: {', '.join(missing)}. "
            "Point the source at the XTREME-UP v1.1 release or its mini copy, or make a copy of your own with flix data subsample."
        )
    datasets = {(task, lang) for task, _, lang in needed} | set(extra)
    return subsample(src, out, per_split or shape, seed, progress, datasets)
