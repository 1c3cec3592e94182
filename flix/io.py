"""Atomic writes: a killed process never leaves a half-written file or directory, and
`recover` finds the newest complete copy a crash left behind.

Files and directories get the modes the user's umask gives (0644/0755 under umask 022),
not mkstemp's private 0600/0700, so a group or a web server can read results.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

COMPLETE = ".complete"  # written last into an atomic_dir's temp folder: its contents are whole
TMP_SUFFIX, OLD_SUFFIX = ".tmp", ".old"
LEFTOVER = re.compile(r"^\.(.+?)\.(?:[a-z0-9_]{8}\.tmp|old)$")  # .NAME.<mkstemp random>.tmp, .NAME.old


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """A write that failed, named: its message is one line that names the path and what to do
    (commands print it alone, without a traceback)."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_error(path: Path, err: OSError) -> OSError:
    """The OSError to raise: it names the path, and says so when the disk is full."""
    if isinstance(err, WriteError):
        return err
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(err.errno, f"no space left on device while writing {path}: free space on that disk and run the command again")
    return WriteError(err.errno, f"could not write {path}: {err.strerror or err}")


def disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        raise write_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp directory that replaces `path` only if the block succeeds.

    Replacing takes two renames (path -> .path.old, temp -> path); a crash between them
    leaves no `path`, but `recover(path)` brings back the newest complete copy."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    except OSError as err:
        raise write_error(path, err) from err
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _umask_modes(tmp)
        (tmp / COMPLETE).touch()
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise
    old = path.with_name(f".{path.name}{OLD_SUFFIX}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' file format, written by Python's own file calls (fsynced): a full disk is an
    OSError for `atomic_dir` to name, not safetensors' SafetensorError without a path."""
    from safetensors.torch import save

    data = save(tensors, metadata)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _umask_modes(folder: Path) -> None:
    """The modes a plain open() or mkdir would give: some writers (safetensors) make 0600 files."""
    mask = _umask()
    for path in folder.rglob("*"):
        full = 0o777 if path.is_dir() or path.stat().st_mode & 0o100 else 0o666
        os.chmod(path, full & ~mask)


def recover(path: str | Path) -> Path | None:
    """After a crash: make `path` the newest complete copy of an atomic_dir and remove
    every leftover temp. Call it only while holding the run's lock (another process's
    temp folder would look like a leftover). Returns `path` if a complete copy exists."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    temps = sorted(path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"))
    old = path.with_name(f".{path.name}{OLD_SUFFIX}")
    # Leftovers are from the last crash (every start recovers), so a complete temp is the
    # newest copy, then `path`, then .old (path -> .old is the first of the two renames).
    complete = [t for t in temps if t.is_dir() and (t / COMPLETE).exists()]
    newest = max(complete, key=lambda t: (t / COMPLETE).stat().st_mtime, default=None)
    if newest is not None:
        if path.exists():
            shutil.rmtree(path)
        os.replace(newest, path)
    elif not path.exists() and old.is_dir():
        os.replace(old, path)
    for leftover in [*temps, old]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.exists():
            leftover.unlink(missing_ok=True)
    return path if path.exists() else None


def recover_tree(root: str | Path) -> None:
    """After a crash, under `root`: every atomic_dir back to its newest complete copy, and
    the temp files of killed atomic writes removed. Call it only while holding the run's
    lock (another process's temps would look like leftovers)."""
    root = Path(root)
    if not root.is_dir():
        return
    for leftover in sorted(root.rglob(".*")):
        match = LEFTOVER.match(leftover.name)
        if match is None or not leftover.exists():
            continue
        if leftover.is_dir():
            recover(leftover.with_name(match.group(1)))
        elif leftover.name.endswith(TMP_SUFFIX):
            leftover.unlink(missing_ok=True)


def open_regular(path: str | Path):
    """`path` opened for reading if it is a regular file and not a symlink; else OSError
    naming it (a record's link to /etc/hostname, /dev/zero or a FIFO is not read, and a
    FIFO is not waited on: O_NONBLOCK)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(err.errno, f"{path} is a symlink; records are regular files") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file (a device, FIFO or folder); records are regular files")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular_text(path: str | Path, errors: str = "strict") -> str:
    """A regular file's text (UTF-8); OSError for anything else (`open_regular`)."""
    with open_regular(path) as f:
        return f.read().decode("utf-8", errors=errors)


def cache_dir() -> Path:
    """Where flix keeps what it makes once per machine (converted models, the kernels'
    source copies): $FLIX_CACHE, else $XDG_CACHE_HOME/flix, else ~/.cache/flix."""
    if os.environ.get("FLIX_CACHE"):
        return Path(os.environ["FLIX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flix"
