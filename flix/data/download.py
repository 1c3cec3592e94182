"""Download and unpack the official XTREME-UP archive, safely and resumably.

The archive is large, so a partial download (`.part`) is resumed with an HTTP Range
request; flix.data.archive checks and unpacks it. All of this happens
in a folder of its own in the destination (marked as made here), so no file of the
user's is ever read as the archive, replaced or deleted.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from flix.data.archive import MAX_EXTRACT_GB, BadArchive, TooLarge, install
from flix.data.reader import DataError, UsageError, has_layout

DEFAULT_URL = "https://storage.googleapis.com/xtreme-up/xtreme-up-v1.1.jsonl.tgz"
CHUNK = 1 << 20
TIMEOUT_S = 60
WORKDIR = ".flix-download"  # in dest: the archive while it downloads; removed once unpacked
OWNER = "made-by-flix"  # in WORKDIR: says the folder (and so what is in it) is ours to remove
# what to do when the archive cannot be had; {option}: the command's flag for another source
# (`flix data download --url`, `flix data mini --source`)
MIRROR = "Check the URL and your connection, or pass {option} a mirror or a local copy of the archive."


def default_dest() -> Path:
    """`$XDG_CACHE_HOME/flix/data`, else `~/.cache/flix/data`."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "flix" / "data"


def find_data_root(dest: Path) -> Path | None:
    """The extracted data root in `dest` (dest itself or one visible child), if any."""
    if not dest.is_dir():
        return None
    if has_layout(dest):
        return dest
    children = (c for c in sorted(dest.iterdir()) if c.is_dir() and not c.name.startswith("."))
    return next((c for c in children if has_layout(c)), None)


def local_path(url: str) -> Path | None:
    """The file a `url` names when it is a plain path or a file:// URL, else None."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return None if "://" in url else Path(url).expanduser()


def archive_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    return name or "xtreme-up.tgz"


def _open(url: str, offset: int):
    headers = {"User-Agent": "flix-data-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def _resume_offset(response, offset: int) -> int:
    """Where the response body starts: `offset` if the server honoured Range, else 0."""
    if offset and response.status == 206:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return offset
    return 0


def _already_complete(err: urllib.error.HTTPError, offset: int) -> bool:
    """A 416 for `bytes=offset-` whose total size is `offset`: the .part is whole."""
    content_range = err.headers.get("Content-Range", "") if err.headers else ""
    match = re.match(r"bytes \*/(\d+)", content_range)
    return err.code == 416 and match is not None and int(match.group(1)) == offset


def fetch(url: str, target: Path, progress: bool = True, option: str = "--url") -> Path:
    """Download `url` to `target`, resuming `target.part`; restarts if Range is ignored.
    `option` names the flag that gives another source, in the errors."""
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset)
    except urllib.error.HTTPError as err:
        if offset and _already_complete(err, offset):
            return part.replace(target)
        raise DataError(f"Download of {url} failed: HTTP {err.code} {err.reason}. {MIRROR.format(option=option)}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"Cannot reach {url}: {err}. {MIRROR.format(option=option)}") from None
    with response:
        start = _resume_offset(response, offset)
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else None
        written = _copy_body(response, part, start, total, progress)
    if total is not None and written < total:
        raise DataError(f"Download of {url} stopped at {written} of {total} bytes; run again to resume.")
    return part.replace(target)


def _copy_body(response, part: Path, start: int, total: int | None, progress: bool) -> int:
    """Append (or, from 0, rewrite) the body into `part`; returns the bytes now in it."""
    written = start
    bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=part.name, file=sys.stderr, disable=not progress)
    with open(part, "ab" if start else "wb") as out, bar:
        try:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        except OSError as err:
            raise DataError(f"Download interrupted at byte {written} ({err}); run again to resume.") from None
    return written


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def workdir(dest: Path) -> Path:
    """dest/.flix-download, made here (and marked so) or by an earlier run: the only
    place anything is written before the data is complete. An unmarked folder of that
    name with anything in it is the user's, and is left alone."""
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"--dest {dest} is a file, not a directory; pass another --dest.")
    work = dest / WORKDIR
    ours = (work / OWNER).is_file() or (work.is_dir() and not any(work.iterdir()))  # empty: nothing to lose
    if work.is_symlink() or (work.exists() and not ours):
        raise UsageError(f"{work} exists and was not made by flix data download; move it away, or pass another --dest.")
    work.mkdir(parents=True, exist_ok=True)
    (work / OWNER).write_text("Made by flix data download for the archive while it downloads and unpacks; removed once the data is in place.\n")
    return work


def _check_sha256(archive: Path, sha256: str | None) -> None:
    if sha256 and sha256_of(archive).lower() != sha256.strip().lower():
        raise BadArchive(f"its sha256 is not {sha256}")


def download(
    url: str = DEFAULT_URL,
    dest: str | Path | None = None,
    sha256: str | None = None,
    progress: bool = True,
    max_extract_gb: float = MAX_EXTRACT_GB,
    option: str = "--url",
) -> Path:
    """Make XTREME-UP available under `dest`; returns its data root (holding `ner/`, ...).

    A no-op when `dest` already holds the data. A local path or file:// URL is read in
    place; anything else is fetched with urllib into dest/.flix-download/ (a folder of
    its own: no file of the user's in `dest` is read, replaced or deleted) and removed
    once unpacked. An archive over the extraction limit is kept there, for a run with a
    larger `max_extract_gb`. A download that fails before any byte arrives leaves no
    folder (a partial one stays, to resume). `option`: the caller's flag for another source.
    """
    dest = Path(dest).expanduser() if dest else default_dest()
    present = find_data_root(dest)
    if present is not None:
        return present
    source = local_path(url)
    if source is not None and not source.is_file():
        raise UsageError(f"Archive {source} does not exist. {MIRROR.format(option=option)}")
    if not max_extract_gb > 0:
        raise UsageError(f"--max-extract-gb must be positive, got {max_extract_gb:g}.")
    made_dest = not dest.exists()
    work = workdir(dest)
    archive = source or work / archive_name(url)
    if source is None and not archive.exists():
        try:
            fetch(url, archive, progress, option)
        except BaseException:  # Ctrl-C too
            if not any(p.name != OWNER for p in work.iterdir()):  # no .part to resume: leave no folder
                shutil.rmtree(work)
                if made_dest and not any(dest.iterdir()):
                    dest.rmdir()
            raise
    if progress:
        print(f"Checking and unpacking {archive} ...", file=sys.stderr)
    keep = source is None  # a sound download stays for the next run, whatever stops this one
    try:
        _check_sha256(archive, sha256)
        root = install(archive, dest, work, max_extract_gb)
        keep = False
    except BadArchive as err:
        keep = keep and isinstance(err, TooLarge)  # only too large: a larger limit needs no new download
        raise _refusal(err, url, source, archive, keep) from None
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return root


def _refusal(err: BadArchive, url: str, source: Path | None, archive: Path, kept: bool) -> BadArchive:
    if source is not None:
        return type(err)(f"Refusing archive {source}: {err}. Nothing was extracted.")
    if kept:
        return TooLarge(f"Refusing {url}: {err}. The download stays at {archive} for that; delete {archive.parent} if you do not want it.")
    return BadArchive(f"Refusing {url}: {err}. The download was removed; run again to fetch it anew.")
