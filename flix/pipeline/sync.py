"""`flix sync [FOLDER ...]`: upload offline W&B runs with one `wandb sync`.

Runs log offline by default (conf/logger/wandb.yaml), each under RUN_DIR/wandb/, and a
report's runs under the runs folder of its scale; this finds every offline run under the
folders given (default: the runs root, $FLIX_RUNS or runs/), so one command uploads a
whole study. Runs `wandb sync` already uploaded (their .synced mark) are left out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def runs_root() -> Path:
    """Where runs go: $FLIX_RUNS, else runs/ (conf/train.yaml hydra.run.dir)."""
    return Path(os.environ.get("FLIX_RUNS") or "runs")


def has_wandb_key() -> bool:
    """Whether wandb finds credentials for its server here (environment, netrc), as
    wandb.init would, without prompting or contacting the server."""
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    host = wandb_setup.singleton().settings.base_url
    return wbauth.authenticate_session(host=host, source="flix", prompt=False, update_session=False) is not None


def offline_runs(folder: Path) -> list[Path]:
    """Every offline W&B run folder under `folder` that wandb sync has not uploaded yet."""
    found = [p for p in folder.rglob("offline-run-*") if p.is_dir() and p.parent.name == "wandb"]
    return sorted(p for p in found if not any(p.glob("*.wandb.synced")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flix sync", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help=f"where to look (default: the runs root, {runs_root()}/)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and print the command; upload nothing")
    args = parser.parse_args(argv)
    if missing := [str(f) for f in args.folders if not f.is_dir()]:
        parser.error(f"no such folder: {', '.join(missing)}")
    folders = args.folders or [runs_root()]  # no runs root yet: nothing to upload
    runs = [run for folder in folders for run in offline_runs(folder)]
    if not runs:
        print(f"flix sync: no offline W&B run to upload under {', '.join(map(str, folders))}")
        return 0
    command = [sys.executable, "-m", "wandb", "sync", *map(str, runs)]
    print(f"flix sync: {len(runs)} offline W&B run(s) under {', '.join(map(str, folders))}")
    if args.dry_run:
        print(" ".join(["wandb", *command[3:]]))
        return 0
    if not has_wandb_key():  # wandb sync would ask, or fail, run by run
        print("flix sync: error: no W&B API key configured: run `wandb login` (or set WANDB_API_KEY) first", file=sys.stderr)
        return 2
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
