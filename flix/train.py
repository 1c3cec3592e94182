"""One run from the command line: train -> validate every N steps -> keep the best adapter -> test.

    python -m flix.train method=flix mixture=study_a scale=smoke logger=none

Hydra composes conf/train.yaml with the overrides; the recipe is flix.pipeline.run. Torch and
transformers load only when a run starts, so `--help` and override errors are immediate.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from flix.pipeline.run_config import CONF, GROUPS, choices, override_problems  # also registers the config_hash resolver


def usage() -> str:
    """--help without composing (Hydra's own help composes every group: seconds): the groups
    and their options from conf/, and conf/train.yaml's own settings."""
    from omegaconf import OmegaConf

    own = OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml"), resolve=False)  # as written: ${...} stays
    settings = OmegaConf.create({key: value for key, value in own.items() if key not in ("defaults", "hydra")})
    return "\n".join(
        [
            "usage: python -m flix.train [group=option ...] [key=value ...]   (-m key=a,b: a sweep)",
            "  --cfg job prints the composed config; --hydra-help lists Hydra's own options.",
            "",
            "== Configuration groups (conf/) ==",
            *[f"{group}: {', '.join(choices(group))}" for group in GROUPS],
            "",
            "== Settings (conf/train.yaml; scale.*, model.*, data.*, ... come with the groups) ==",
            OmegaConf.to_yaml(settings).rstrip(),
        ]
    )


def stop_once(_signum, _frame) -> None:
    """The first Ctrl-C stops the run; later ones are ignored while it exits. A terminal's Ctrl-C
    reaches the whole process group and `flix study` forwards it too, so a run gets two: the
    second would otherwise land in torch's exit hooks as a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


MIN_FREE = 64 << 10  # bytes: less and Hydra's own first files (.hydra/*.yaml, ~16 KiB) may fail, with a traceback


def full_disk(args: list[str]) -> str | None:
    """A line if the disk the run folder goes to (hydra.run.dir / hydra.sweep.dir, else
    $FLIX_RUNS or runs) has less than MIN_FREE free: said before Hydra writes anything."""
    given = [a.partition("=")[2] for a in args if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    folder = Path(given[-1] if given else os.environ.get("FLIX_RUNS") or "runs").absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        disk = os.statvfs(folder)
    except OSError:
        return None
    free = disk.f_bavail * disk.f_frsize
    if free >= MIN_FREE:
        return None
    return f"no space left on device under {folder} ({free // 1024} KiB free): free space on that disk and run the command again"


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from flix.pipeline.run import hydra_job

    return hydra_job(cfg)


if __name__ == "__main__":
    if sys.argv[1:] in (["--help"], ["-h"]):
        print(usage())
        sys.exit(0)
    # Before Hydra, whose message can be a traceback, and which makes the run folder that a
    # refused run would leave behind. --cfg, --info and the like only print: no data needed.
    runs = all(arg in ("-m", "--multirun") for arg in sys.argv[1:] if arg.startswith("-"))
    if problems := override_problems(sys.argv[1:], data=runs):
        from flix.pipeline.tracking import say_once  # under torchrun: one line, not one a process

        say_once("flix.train: error: " + "\n  ".join(problems))
        sys.exit(2)
    if full := full_disk(sys.argv[1:]):
        from flix.pipeline.tracking import say_once

        say_once(f"flix.train: error: {full}")
        sys.exit(1)
    signal.signal(signal.SIGINT, stop_once)
    try:
        main()
    except KeyboardInterrupt:  # the run's files are whole (atomic writes): a line, not a traceback
        print("flix.train: stopped by Ctrl-C; the same command resumes from the last checkpoint", file=sys.stderr)
        sys.exit(130)
