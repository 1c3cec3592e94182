"""A smaller copy of an XTREME-UP directory: the same layout, N lines per file.

Lines are copied verbatim and chosen by (seed, file), so a copy is reproducible and
reads exactly like the source; `counts.json` beside it records every file's size.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from tqdm import tqdm

from flix.data.reader import DataError, data_files, resolve_root


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


def subsample(root: str | Path | None, out: str | Path, per_file: int, seed: int = 0, progress: bool = True) -> dict[str, int]:
    """Copy `per_file` seeded lines of every file to `out`; returns {"task/split/name": n}."""
    if per_file < 1:
        raise DataError(f"--per-file must be at least 1, got {per_file}.")
    src, dst = resolve_root(root), Path(out).expanduser()
    _check_out(src, dst)
    counts = {}
    files = data_files(src)
    bar = tqdm(files, desc="subsample", unit="file", file=sys.stderr, disable=not progress)
    for task, split, stem, path in bar:
        key = f"{task}/{split}/{stem}"
        lines = _lines(path)
        kept = [lines[i] for i in choose(len(lines), per_file, seed, key)]
        write_atomic(dst / task / split / path.name, b"".join(kept))
        counts[key] = len(kept)
    write_atomic(dst / "counts.json", (json.dumps(counts, indent=1, sort_keys=True) + "\n").encode())
    return counts
