"""`flix data`: check (stats), download and subsample XTREME-UP data, or make a small real copy (mini)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from flix.data import download as dl
from flix.data.reader import SPLITS, DataError, UsageError, data_files, iter_file, lang_of, resolve_root
from flix.data.subsample import scale_copy, subsample


def count_examples(root: str | Path | None, progress: bool = True) -> tuple[dict, list[DataError]]:
    """Read every file: ({task: {split: {name: valid examples}}}, every bad line's error)."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    errors: list[DataError] = []
    files = data_files(root)
    bar = tqdm(files, desc="reading", unit="file", file=sys.stderr, disable=not progress)
    for task, split, stem, path in bar:
        n = sum(1 for _ in iter_file(path, task, lang_of(task, stem), on_error=errors.append))
        counts.setdefault(task, {}).setdefault(split, {})[stem] = n
    return counts, errors


def table(counts: dict[str, dict[str, dict[str, int]]]) -> str:
    """Files and examples per task and split, for people."""
    lines = [f"{'task':<18}{'files':>7}" + "".join(f"{s:>12}" for s in SPLITS)]
    for task, splits in counts.items():
        files = sum(len(names) for names in splits.values())
        sizes = "".join(f"{sum(splits.get(s, {}).values()):>12,}" for s in SPLITS)
        lines.append(f"{task:<18}{files:>7}{sizes}")
    return "\n".join(lines)


def run_stats(args: argparse.Namespace) -> int:
    root = resolve_root(args.root)
    counts, errors = count_examples(root, progress=not args.quiet)
    for error in errors:
        print(error, file=sys.stderr)
    # a run would read nothing from these, and fail late (an empty test file after training)
    empty = [
        root / task / split / f"{stem}.jsonl"
        for task, splits in counts.items()
        for split, stems in splits.items()
        for stem, n in stems.items()
        if n == 0
    ]
    for path in empty:
        print(f"{path}: no examples. Restore the file (flix data download), or remove it.", file=sys.stderr)
    print(f"XTREME-UP data at {root}\n{table(counts)}")
    if errors:
        print(f"{len(errors)} malformed line(s), left out of the counts.", file=sys.stderr)
    if empty:
        print(f"{len(empty)} file(s) without examples.", file=sys.stderr)
    print(json.dumps(counts, sort_keys=True))
    return 1 if errors or empty else 0


def run_download(args: argparse.Namespace) -> int:
    root = dl.download(args.url, args.dest, args.sha256, progress=not args.quiet, max_extract_gb=args.max_extract_gb)
    print(f"XTREME-UP data is ready. Use it with: export FLIX_DATA_ROOT={root}  (or data.root={root})")
    print(root)
    return 0


def run_subsample(args: argparse.Namespace) -> int:
    counts = subsample(args.root, args.out, args.per_file, args.seed, progress=not args.quiet)
    print(f"wrote {sum(counts.values()):,} examples in {len(counts)} files and counts.json to {args.out}")
    return 0


def run_mini(args: argparse.Namespace) -> int:
    source = dl.local_path(args.source)
    if source is not None and source.is_dir():
        root = dl.find_data_root(source) or resolve_root(source)  # resolve_root names what is wrong
    else:
        root = dl.download(args.source, args.download_dir, progress=not args.quiet, option="--source")
    counts = scale_copy(root, args.dest, args.scale, args.seed, progress=not args.quiet)
    print(f"wrote {sum(counts.values()):,} examples in {len(counts)} files ({args.scale} scale's shape, seed {args.seed}) to {args.dest}")
    print(f"Use it with: export FLIX_DATA_ROOT={args.dest}  (or data.root={args.dest})")
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a bad value is a usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="flix data", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = top.add_subparsers(dest="command", required=True)

    stats = sub.add_parser("stats", parents=[common], help="check every file; print counts (JSON last)")
    stats.add_argument("--root", help="data root (default: $FLIX_DATA_ROOT)")
    stats.set_defaults(run=run_stats)

    get = sub.add_parser("download", parents=[common], help="fetch and unpack the XTREME-UP archive")
    get.add_argument("--dest", help=f"where to put it (default: {dl.default_dest()})")
    get.add_argument("--url", default=dl.DEFAULT_URL, help="archive URL, mirror, file:// URL or path")
    get.add_argument("--sha256", help="expected sha256 of the archive")
    get.add_argument(
        "--max-extract-gb",
        type=float,
        default=dl.MAX_EXTRACT_GB,
        help=f"refuse an archive that unpacks to more than this (default {dl.MAX_EXTRACT_GB:g} GB)",
    )
    get.set_defaults(run=run_download)

    small = sub.add_parser("subsample", parents=[common], help="a smaller copy: N seeded lines per file")
    small.add_argument("--root", help="source data root (default: $FLIX_DATA_ROOT)")
    small.add_argument("--out", required=True, help="new data root to write")
    small.add_argument("--per-file", type=positive_int, required=True, help="lines kept per file")
    small.add_argument("--seed", type=int, default=0)
    small.set_defaults(run=run_subsample)
    mini = sub.add_parser("mini", parents=[common], help="a small real copy: the files a scale's runs read, seeded lines of each")
    mini.add_argument("--dest", required=True, help="new data root to write")
    mini.add_argument(
        "--source", default=dl.DEFAULT_URL, help="the XTREME-UP archive (URL, file:// URL or path) or a data root (default: the official archive)"
    )
    mini.add_argument("--download-dir", help=f"where a downloaded archive is unpacked (default: {dl.default_dest()})")
    mini.add_argument(
        "--scale", default="cpu", help="conf/scale/ whose shape to take: languages per task, training draws, eval and test examples (default cpu)"
    )
    mini.add_argument("--seed", type=int, default=0)
    mini.set_defaults(run=run_mini)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (DataError, OSError) as err:
        print(f"flix data {args.command}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1  # 2: a root, file or value to fix first
    except KeyboardInterrupt:  # Ctrl-C is not a crash: no traceback (a download's .part stays, to resume)
        again = "; run it again to resume" if args.command in ("download", "mini") else ""
        print(f"flix data {args.command}: interrupted{again}.", file=sys.stderr)
        return 130
