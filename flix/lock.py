"""One process per run directory: an OS file lock on RUN_DIR/.lock, taken before any write.

The OS releases the lock when its holder dies (even by SIGKILL), so a stale lock file
from a dead process is simply taken over; the pid, host and start time written into it
are only there to name the holder in the message a second process gets.
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory."""


def holder(run_dir: Path, settle: float = 2.0) -> str:
    """Who the lock file names. A holder writes its name just after taking the lock, so an
    empty file is read again for up to `settle` seconds before calling it unknown."""
    deadline = time.monotonic() + settle
    while True:
        try:
            text = (Path(run_dir) / LOCK).read_text().strip()
        except OSError:
            text = ""
        if text or time.monotonic() > deadline:
            return text or "an unknown process"
        time.sleep(0.05)


def busy(run_dir: str | Path) -> str | None:
    """Who holds RUN_DIR/.lock while a live process does, else None. It probes with a shared
    lock, dropped at once: a run starting in that instant would find the directory busy."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder(run_dir)
    finally:
        os.close(fd)
    return None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def run_lock(run_dir: str | Path, wait: bool = False, timeout: float | None = None):
    """Hold RUN_DIR/.lock for the block. Busy: wait for it (`wait`; at most `timeout`
    seconds when given) or raise RunLocked naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            if not wait:
                raise RunLocked(
                    f"{run_dir} is being run by {holder(run_dir)}: wait for it to finish, stop it, or pass wait=true to wait here"
                ) from None
            print(f"[flix] waiting for {run_dir}, held by {holder(run_dir)}", flush=True)
            deadline = time.monotonic() + (math.inf if timeout is None else timeout)
            while not _try_lock(fd):
                if time.monotonic() > deadline:
                    raise RunLocked(f"{run_dir} is still held by {holder(run_dir)} after {timeout:.0f} s")
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
