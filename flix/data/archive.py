"""Unpacking the XTREME-UP archive safely: each member is checked while it is extracted
into a temporary directory next to the destination (relative paths only, no links, one
top-level folder, no duplicates, a size limit against gzip bombs), and only a complete,
valid tree is renamed into place, so a failed run never leaves a half-extracted data root.
"""

from __future__ import annotations

import gzip
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from flix.data.examples import TASKS
from flix.data.reader import SPLITS, DataError, UsageError

CHUNK = 1 << 20
MAX_EXTRACT_GB = 20.0  # the release unpacks to a few GB; a gzip bomb would not stop


class BadArchive(DataError):
    """The archive is corrupt, unsafe or not XTREME-UP; nothing of it is kept."""


class TooLarge(BadArchive):
    """The archive unpacks to more than the limit: maybe a bomb, maybe a larger release."""


def _member_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """Checked path parts of a member: relative, no `..`, a plain file or directory."""
    path = PurePosixPath(member.name)
    if path.is_absolute():
        raise BadArchive(f"member {member.name!r} has an absolute path")
    if ".." in path.parts:
        raise BadArchive(f"member {member.name!r} points outside the archive")
    if not (member.isfile() or member.isdir()):
        raise BadArchive(f"member {member.name!r} is a link or special file")
    return path.parts


def _is_data_file(parts: tuple[str, ...]) -> bool:
    return len(parts) == 4 and parts[1] in TASKS and parts[2] in SPLITS and parts[3].endswith(".jsonl")


class _OverLimit(Exception):
    """The archive unpacks to more than the extraction limit (extract names the limit)."""


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, budget: int) -> int:
    """Unpack one member, counting the bytes really written (not the header's size);
    returns what is left of `budget`."""
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return budget
    path.parent.mkdir(parents=True, exist_ok=True)
    with tar.extractfile(member) as src, open(path, "wb") as out:
        while chunk := src.read(CHUNK):
            budget -= len(chunk)
            if budget < 0:
                raise _OverLimit
            out.write(chunk)
    return budget


def _check_unique(member: tarfile.TarInfo, parts: tuple[str, ...], seen: dict[tuple[str, ...], bool]) -> None:
    """Refuse a path met before (`seen`: path -> is a directory, parents included): which
    copy is the data would be a guess, and a file where a directory is would fail late."""
    for i in range(1, len(parts)):
        if not seen.setdefault(parts[:i], True):
            raise BadArchive(f"member {member.name!r} lies inside {'/'.join(parts[:i])!r}, which the archive has as a file")
    if parts in seen and not (member.isdir() and seen[parts]):
        raise BadArchive(f"member {member.name!r} appears twice (which copy is the data?)")
    seen[parts] = member.isdir()


def _extract_members(tar: tarfile.TarFile, into: Path, max_bytes: int) -> tuple[str, int]:
    """Check each member while unpacking it; returns the one top-level directory and
    what is left of `max_bytes`."""
    top, seen_data, seen = None, False, {}
    for member in tar:
        parts = _member_parts(member)
        if not parts:  # "./" itself
            continue
        if top not in (None, parts[0]) or (len(parts) == 1 and not member.isdir()):
            raise BadArchive("members are not all under one top-level directory")
        _check_unique(member, parts, seen)
        top, seen_data = parts[0], seen_data or _is_data_file(parts)
        max_bytes = _extract_member(tar, member, into.joinpath(*parts), max_bytes)
    if not seen_data:
        raise BadArchive("it holds no {task}/{split}/*.jsonl files of XTREME-UP")
    return top, max_bytes


def extract(archive: Path, into: Path, max_gb: float = MAX_EXTRACT_GB) -> Path:
    """Unpack a checked gzip tar into `into`; returns its top-level directory there.

    The gzip stream is read to its end so that its CRC and length are verified too.
    """
    try:
        with gzip.open(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            top, left = _extract_members(tar, into, int(max_gb * 1e9))
            while chunk := stream.read(CHUNK):  # what follows the tar counts too: no endless inflating
                left -= len(chunk)
                if left < 0:
                    raise _OverLimit
    except _OverLimit:
        raise TooLarge(
            f"it unpacks to more than {max_gb:g} GB (a gzip bomb, or a larger release: pass --max-extract-gb to raise the limit)"
        ) from None
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise BadArchive(f"not a valid gzip tar archive ({err})") from None
    return into / top


def install(archive: Path, dest: Path, work: Path, max_gb: float = MAX_EXTRACT_GB) -> Path:
    """Extract `archive` in a temp dir inside `work` (our folder in `dest`: a killed run's
    leftovers go with it), then rename the tree into `dest`."""
    tmp = Path(tempfile.mkdtemp(prefix="extract-", dir=work))
    try:
        tree = extract(archive, tmp, max_gb)
        final = dest / tree.name
        if final.exists() or final.is_symlink():  # not ours: find_data_root found no data in it
            raise UsageError(
                f"{final} is in the way: the archive unpacks to that name, and it holds no XTREME-UP data. Move it away, or pass another --dest."
            )
        return tree.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
