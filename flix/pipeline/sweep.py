"""A plain Hydra sweep (`python -m flix.train -m ...`) ends with one summary line and
exits 1 when any of its runs failed (each failed run wrote failed.json and the sweep went
on). Registered in conf/train.yaml `hydra.callbacks`; works for every launcher, since it
reads what the runs wrote rather than the launcher's return values."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from flix.record import FAILED, RESULTS


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        started = getattr(self, "started", 0.0)

        def written(name: str) -> list[Path]:  # by this sweep's runs
            return sorted(p.parent for p in root.rglob(name) if p.stat().st_mtime >= started)

        finished, failed = written(RESULTS), [d for d in written(FAILED) if not (d / RESULTS).exists()]
        print(f"[flix sweep] {len(finished)} run(s) finished now, {len(failed)} failed in {time.time() - started:.0f}s under {root}", file=sys.stderr)
        for run_dir in failed:
            print(f"[flix sweep] FAILED {run_dir} (see its failed.json)", file=sys.stderr)
        if failed:
            sys.exit(1)
