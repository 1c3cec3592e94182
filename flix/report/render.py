"""render(): finished runs -> Tables 1-5, appendices, Figure 2, the runs table and index.html. Runs nothing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

from flix.io import WriteError, atomic_write_text, write_error
from flix.report import figure, preregistered
from flix.report.appendix import build_appendices
from flix.report.collect import collect
from flix.report.formats import Page, cells_csv, write_appendix, write_table
from flix.report.html import html_page
from flix.report.runs import runs_frame, write_runs
from flix.report.tables import build_all


class ReportError(RuntimeError):
    """Nothing to report: no runs dir, no results, or an ambiguous scale."""


def infer_scale(runs_dir: str | Path) -> str:
    """The one scale of the finished runs under runs_dir (for --runs without --scale)."""
    scales = sorted({r.scale for r in collect(runs_dir).finished if r.scale})
    if len(scales) != 1:
        found = ", ".join(scales) or "none"
        raise ReportError(f"cannot tell the scale of the runs under {runs_dir} (found: {found}); pass --scale")
    return scales[0]


HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
TEMP = re.compile(r"\.render\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.\w+\.tmp")  # .render.HOST.PID.<random>.tmp
MOVING = ".moving"  # in a render's temp folder once all its files are written: they are moving in


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finish_killed_renders(out_dir: Path) -> None:
    """What renders killed on this host left in out_dir: a folder killed while its files moved
    in (only SIGKILL: the moves defer other signals) finishes moving, so the report is one
    render's, not two mixed; one killed before is removed (the last report stood whole)."""
    temps = (
        sorted(out_dir.glob(".render.*.tmp"), key=lambda t: (t / MOVING).stat().st_mtime if (t / MOVING).exists() else 0) if out_dir.is_dir() else []
    )
    for tmp in temps:  # oldest first: a later render's files are moved in after an earlier one's
        match = TEMP.fullmatch(tmp.name)
        if match is None or match["host"] != HOST or _alive(int(match["pid"])) or not tmp.is_dir():
            continue  # another render's, still running (or on another host)
        if (tmp / MOVING).exists():
            _move_in([p for p in sorted(tmp.iterdir()) if p.name != MOVING], out_dir)
        shutil.rmtree(tmp, ignore_errors=True)


def _move_in(files: list[Path], out_dir: Path) -> None:
    """Rename files into out_dir with Ctrl-C, SIGTERM and SIGHUP held until the last has moved
    (in the main thread; a signal arriving meanwhile is raised again once they have)."""
    pending: list[int] = []
    held = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is not None:  # None: a handler Python cannot put back
                held[signum] = signal.signal(signum, lambda number, _frame: pending.append(number))
    try:
        for path in files:
            os.replace(path, out_dir / path.name)
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in pending:
            signal.raise_signal(signum)


def render(runs_dir: str | Path, out_dir: str | Path, scale: str | None, paper_dir: str | Path) -> dict:
    """Write every report file into out_dir; return a summary (cells filled/missing, files).
    scale None: the runs' one scale. A full disk is an OSError naming the file (flix.io.WriteError)."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    finish_killed_renders(out_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"runs dir {runs_dir} does not exist: train first (python -m flix.train) or pass --runs")
    scale = scale or infer_scale(runs_dir)
    index = collect(runs_dir, scale)
    if not index.finished:
        failed = [r for r in index.runs if r.failure]
        detail = f" ({len(failed)} failed run(s), e.g. {failed[0].path}: {failed[0].failure})" if failed else ""
        other = f"; {len(index.skipped)} run(s) of other scales skipped" if index.skipped else ""
        raise ReportError(f"no results.json for scale {scale} under {runs_dir}{detail}{other}")
    page = Page(scale, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    tables = build_all(index, paper_dir)
    appendices = build_appendices(index)
    frame = figure.figure_data(*tables[:2])  # Tables 1 and 2
    runs = runs_frame(index.finished)  # reads every run's predictions and log: once
    # Every file is written into a hidden temp folder first, then moved in: a render killed
    # or out of space leaves the last report whole, not old and new files mixed.
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".render.{HOST}.{os.getpid()}.", suffix=".tmp"))
    except OSError as err:
        raise write_error(out_dir, err) from err
    try:
        files = [p for t in tables for p in write_table(t, page, tmp)]
        files.append(atomic_write_text(tmp / "cells.csv", cells_csv(tables)))
        files += [p for a in appendices for p in write_appendix(a, page, tmp)]
        pictures = figure.plot(frame, tmp, scale)
        files += pictures + [figure.write_csv(frame, tmp)]
        files += write_runs(runs, index.finished, page, tmp)
        design = preregistered.load_design(scale)  # a pre-registered study of this scale: its own questions and curves
        if design is not None:
            files += preregistered.write(design, index.finished, tmp, page.meta(index.finished))
        files.append(atomic_write_text(tmp / "index.html", html_page(page, index.finished, tables, (frame, pictures[0]), appendices, runs)))
        (tmp / MOVING).touch()
        _move_in(files, out_dir)
    except OSError as err:  # a full disk: named as the report's file, not the temp folder's
        raise WriteError(err.errno, str(write_error(out_dir, err)).replace(str(tmp), str(out_dir))) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = [out_dir / path.name for path in files]
    filled = int(frame["change"].notna().sum())
    return {
        "scale": scale,
        "runs_dir": str(runs_dir),
        "out_dir": str(out_dir),
        "runs": len(index.finished),
        "failed": sum(r.failure is not None for r in index.runs),
        "skipped_other_scales": len(index.skipped),
        "unreadable": [f"{path}: {reason}" for path, reason in index.unreadable],
        "duplicates": [f"{copy}: a copy of {kept} (the same setting and seed), counted once" for copy, kept in index.duplicates],
        "tables": {t.name: dict(zip(("filled", "missing"), t.counts())) for t in tables},
        "figure2": {"filled": filled, "missing": len(frame) - filled},
        "appendices": [a.mixture for a in appendices],
        "files": [str(p) for p in files],
    }


def summary_line(summary: dict) -> str:
    cells = "; ".join(
        f"{name} {c['filled']} filled/{c['missing']} missing" for name, c in {**summary["tables"], "figure2": summary["figure2"]}.items()
    )
    skipped = f", {summary['skipped_other_scales']} of other scales skipped" if summary["skipped_other_scales"] else ""
    unreadable = summary.get("unreadable") or []
    broken = f", {len(unreadable)} unreadable results.json skipped ({unreadable[0]})" if unreadable else ""
    copies = summary.get("duplicates") or []
    twice = f", {len(copies)} copies of runs counted once ({copies[0]})" if copies else ""
    return f"report ({summary['scale']}, {summary['runs']} runs, {summary['failed']} failed{skipped}{broken}{twice}): {cells}"
