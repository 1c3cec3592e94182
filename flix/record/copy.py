"""Copying run records (`flix records`, a study's restore) as input, not trusted files:
regular files only (a symlink, device or FIFO in a record refuses that record, named), each
record built in a temp folder beside its destination and moved in whole with results.json
last (a copy killed half-way is never a complete run), and no link in the destination
followed (a link there is replaced, never written through).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import sys
from pathlib import Path

from flix.io import disk_full, open_regular, write_error
from flix.record.write import FAILED, RESULTS

# A run's record: what a report, a re-score or a reader needs, and nothing heavy (no
# weights, no checkpoints). Committed under reports/<scale>/runs/ for real runs.
RECORD = (RESULTS, FAILED, "train.log", "predictions", "tables", ".hydra/overrides.yaml")
TMP = ".tmp"


def _say(line: str) -> None:
    print(f"flix records: {line}", file=sys.stderr)


def find_runs(runs_root: Path, skip: Path | None = None) -> list[Path]:
    """Folders under runs_root holding results.json or failed.json, without following links
    or entering hidden folders (temp copies) or `skip` (a destination inside the runs)."""
    found, skip_real = [], skip and os.path.realpath(skip)
    for folder, dirs, files in os.walk(runs_root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(folder, d)) != skip_real)
        if RESULTS in files or FAILED in files:
            found.append(Path(folder))
    return found


def record_files(run_dir: Path) -> list[str]:
    """The record's files, relative to run_dir; ValueError naming the first entry that is
    not a regular file or a real folder."""
    found = []
    for name in RECORD:
        source = run_dir / name
        try:
            mode = os.lstat(source).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode):
            found.append(name)
        elif stat.S_ISDIR(mode):
            for folder, dirs, files in os.walk(source):
                for entry in sorted(dirs + files):
                    mode = os.lstat(os.path.join(folder, entry)).st_mode
                    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                        raise ValueError(f"{Path(folder) / entry} is not a regular file (a symlink, device or FIFO)")
                    if stat.S_ISREG(mode):
                        found.append(str(Path(folder, entry).relative_to(run_dir)))
        else:
            raise ValueError(f"{source} is not a regular file (a symlink, device or FIFO)")
    return found


def copy_run(run_dir: Path, target: Path) -> None:
    """One run's record into target: built beside it, then moved in, results.json last. A
    write that fails (a full disk) is a flix.io.WriteError naming the file, target untouched."""
    files = record_files(run_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f".{target.name}.*{TMP}"):  # of a copy killed before
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{TMP}"
        tmp.mkdir()  # not mkdtemp's 0700: the record moves in with the modes the umask gives
    except OSError as err:
        raise write_error(target, err) from err
    try:
        for name in files:
            with open_regular(run_dir / name) as source:  # a source that is not a regular file: its own error
                try:
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    with open(tmp / name, "wb") as copy:
                        shutil.copyfileobj(source, copy)
                    shutil.copystat(run_dir / name, tmp / name, follow_symlinks=False)
                except OSError as err:
                    raise write_error(target / name, err) from err
        _move_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_in(tmp: Path, target: Path) -> None:
    """Replace target's record by tmp's: the whole folder if target is new; else each
    record entry (a link there is moved aside, not followed), the old results.json out
    first and the new one in last, the old record's entries the new one lacks removed."""
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    if target.is_symlink() or not target.is_dir():
        raise ValueError(f"{target} is a symlink or not a folder; records go into real folders")
    trash = tmp / TMP
    _aside(target / RESULTS, trash / RESULTS)  # from here on a kill leaves no complete run
    for name in [n for n in RECORD if n != RESULTS] + [RESULTS]:  # the new results.json in last
        if (target / name).parent.is_symlink():
            raise ValueError(f"{(target / name).parent} is a symlink; records go into real folders")
        _aside(target / name, trash / name)
        if os.path.lexists(tmp / name):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, target / name)


def _aside(path: Path, trash: Path) -> None:
    """Move path (a file, a folder or a link: the link itself) out of the way."""
    if os.path.lexists(path):
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, trash)


def copy_records(runs_root: Path, dest: Path, say=_say) -> list[Path]:
    """Copy the record of every run under `runs_root` (a folder with results.json or
    failed.json) to the same relative folder under `dest`; returns the copied run folders.
    A record that is not regular files, or a destination through a link, is named and skipped;
    a full disk stops the copy (flix.io.WriteError naming the file; what was there stays whole)."""
    runs_root, dest = Path(runs_root), Path(dest)
    copied = []
    for run_dir in find_runs(runs_root, skip=dest):
        relative = run_dir.relative_to(runs_root)
        target = dest / relative
        linked = [dest / Path(*relative.parts[: i + 1]) for i in range(len(relative.parts))]
        try:
            if any(p.is_symlink() for p in linked):
                raise ValueError(f"{next(p for p in linked if p.is_symlink())} is a symlink; records go into real folders")
            replaced = (target / RESULTS).exists() or (target / FAILED).exists()
            copy_run(run_dir, target)
        except (OSError, ValueError) as err:
            if disk_full(err):  # every later record would fail the same way: the caller says it once
                raise
            say(f"{run_dir} not copied: {err}")
            continue
        if replaced:
            say(f"{target}: the record there was replaced by {run_dir}'s")
        copied.append(target)
    return copied
