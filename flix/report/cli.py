"""`flix report`: render the paper's tables and Figure 2 from finished runs (runs nothing).

    flix report [--runs DIR] [--scale smoke|cpu|mini|paper] [--out DIR | --snapshot] [--paper DIR] [--wandb]

Default paths are relative to the repository root, as flix.pipeline.study uses them. The report
goes to an uncommitted folder (outputs/reports/<scale>) unless --snapshot asks for the
committed one (reports/<scale>), where files no render wrote (but its README) are then removed.
The paper's numbers come with the package (flix/report/paper/); --paper or FLIX_PAPER_DIR
reads another folder of the same files.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = "outputs/reports"  # git-ignored
PAPER = Path(__file__).resolve().parent / "paper"  # the paper's Tables 1-5 as CSV (its README says from where)
SNAPSHOTS = REPO / "reports"  # committed: each scale's folder has a README saying how it was made


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flix report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="runs root (default: $FLIX_RUNS or runs, then /<scale>)")
    # a plain name, not checked against conf/scale: the runs' records say their scale
    parser.add_argument("--scale", type=scale_name, help="smoke, cpu, mini or paper (default: the runs' scale with --runs, else smoke)")
    parser.add_argument("--out", type=Path, help=f"output dir (default: $FLIX_REPORTS or {DEFAULT_OUT}, then /<scale>)")
    parser.add_argument("--snapshot", action="store_true", help="write the committed snapshot reports/<scale>/ (stale files removed first)")
    parser.add_argument("--paper", type=Path, help="the paper's table CSVs (default: $FLIX_PAPER_DIR, else flix/report/paper)")
    parser.add_argument("--wandb", action="store_true", help="also log the report to W&B (offline unless WANDB_MODE=online)")
    parser.add_argument("--wandb-project", help="default: the project of conf/logger/wandb.yaml")
    return parser.parse_args(argv)


def scale_name(text: str) -> str:
    """--scale: a plain name (it becomes a folder of the default paths)."""
    if not re.fullmatch(r"\w+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a scale name (smoke, cpu, mini, paper)")
    return text


MANIFEST = ".rendered"  # what the last render wrote into its folder: the only files --snapshot may remove
# what renders wrote before the manifest (a folder without one): the report's own names
RENDERED = re.compile(r"(table\d\w*|dropout_modes\w*|appendix_[\w.-]+|cells|runs|figure2|index|preregistered|curves)\.(md|tex|csv|png|svg|html)")


def rendered_before(out: Path) -> set[str] | None:
    """The names the last render wrote into out (its manifest); None if it has none."""
    try:
        return set((out / MANIFEST).read_text(encoding="utf-8").split())
    except (OSError, ValueError):
        return None


def remove_stale(out: Path, written: list[str], before: set[str] | None) -> None:
    """After a successful render: remove what an earlier render wrote and this one did not
    (a table no longer made would stay and mislead). Only files a render wrote: the
    folder's README and anything of the user's (a thesis.tex) stay."""
    keep = {Path(p).name for p in written} | {"README.md", MANIFEST}
    for path in out.iterdir():
        ours = path.name in before if before is not None else bool(RENDERED.fullmatch(path.name))
        if ours and path.name not in keep and path.is_file() and not path.is_symlink():
            path.unlink()


def write_manifest(out: Path, written: list[str]) -> None:
    from flix.io import atomic_write_text

    atomic_write_text(out / MANIFEST, "".join(f"{name}\n" for name in sorted({Path(p).name for p in written})))


def shown(path: str | Path) -> str:
    """A path as the user would type it here: relative to the working directory when
    inside it (no machine's absolute paths in what is printed or pasted from it)."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    from flix.report.render import ReportError, infer_scale, render, summary_line  # pandas and matplotlib: not for --help

    try:
        scale = args.scale or (infer_scale(args.runs) if args.runs and args.runs.is_dir() else "smoke")
        runs = args.runs or Path(shown(REPO / os.environ.get("FLIX_RUNS", "runs") / scale))
        out = args.out or Path(shown((SNAPSHOTS if args.snapshot else REPO / os.environ.get("FLIX_REPORTS", DEFAULT_OUT)) / scale))
        paper = args.paper or Path(os.environ.get("FLIX_PAPER_DIR") or PAPER)
        before = rendered_before(out)
        summary = render(runs, out, scale, paper)
        if args.snapshot:
            remove_stale(out, summary["files"], before)
        write_manifest(out, summary["files"])
    except ReportError as error:
        print(f"flix report: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk: the last report stands whole (flix.io.WriteError names the file)
        print(f"flix report: {error}", file=sys.stderr)
        return 1
    for path in summary["files"]:
        print(f"wrote {shown(path)}")
    print(summary_line(summary))
    if args.wandb:
        from flix.report.wandb_log import log_to_wandb

        project = args.wandb_project or OmegaConf.load(REPO / "conf" / "logger" / "wandb.yaml").project
        try:
            # W&B's files sit beside the runs' (not in the report folder, which may be committed)
            logged = log_to_wandb(out, scale, project, wandb_dir=runs, files=[Path(p) for p in summary["files"]])
            print(
                f"logged the report to W&B: {len(logged)} runs (the whole render, then each table in its runs' group) under {shown(logged[0].parent)}"
            )
        except Exception as error:  # the report files stand; a tracking failure must not hide them
            print(f"flix report: W&B logging failed: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
