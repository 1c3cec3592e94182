"""One run from the command line: train -> validate every N steps -> keep the best adapter -> test.

    python -m flix.train method=flix mixture=study_a scale=smoke logger=none

Hydra composes conf/train.yaml with the overrides; the recipe is flix.pipeline.run. Torch and
transformers load only when a run starts, so `--help` and override errors are immediate.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from flix.pipeline.run_config import override_problems  # also registers the config_hash resolver


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from flix.pipeline.run import hydra_job

    return hydra_job(cfg)


if __name__ == "__main__":
    if problems := override_problems(sys.argv[1:]):  # before Hydra, whose message can be a traceback
        print("flix.train: error: " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except KeyboardInterrupt:  # the run's files are whole (atomic writes): a line, not a traceback
        print("flix.train: stopped by Ctrl-C; the same command resumes from the last checkpoint", file=sys.stderr)
        sys.exit(130)
