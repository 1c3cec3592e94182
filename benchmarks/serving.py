"""`python -m benchmarks.serving`: a trained FLix adapter served by llama-server (flix.serve)
beside flix's own model, on real test prompts: agreement (teacher-forced log-probabilities
and greedy outputs, per feature combination) and throughput (mixed-combination traffic:
llama-server, flix's generate, one merged model per combination).

Needs `make serve-setup`, a `python -m flix serve export` folder of the adapter and a GGUF
base (`python -m flix serve base`); docs/serving.md has the commands and the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", type=Path, help="the FLix adapter folder (a run's best_adapter/)")
    p.add_argument("export", type=Path, help="its `flix serve export` folder")
    p.add_argument("--base", type=Path, action="append", required=True, help="a GGUF base (repeatable: each is measured)")
    p.add_argument("--model", default="gemma3_270m", help="the base model flix loads (default gemma3_270m)")
    p.add_argument("--data", type=Path, help="XTREME-UP root (default $FLIX_DATA_ROOT)")
    p.add_argument("--examples", type=int, default=48, help="test examples per trained combination for greedy agreement (default 48)")
    p.add_argument("--forced", type=int, default=8, help="of them, teacher-forced per combination (default 8; 0: greedy only)")
    p.add_argument("--n-probs", type=int, default=20, help="server log-probabilities per position (default 20)")
    p.add_argument("--throughput", type=int, default=0, help="mixed-combination requests to time (default 0: agreement only)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request when timing (default 16)")
    p.add_argument("--parallel", type=int, default=4, help="server slots and concurrent clients; flix's batch size (default 4)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and llama-server (default 2)")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    p.add_argument("--flix-cache", type=Path, help="keep flix's greedy outputs in this JSON file (reused when it exists)")
    p.add_argument("--only-flix", action="store_true", help="only flix's side: its greedy outputs (into --flix-cache) and --margins, no server")
    p.add_argument("--no-agreement", action="store_true", help="skip the agreement: only --throughput, its requests drawn from the --examples sample")
    p.add_argument("--margins", action="store_true", help="record flix's smallest top-two log-probability margin along each greedy output")
    args = p.parse_args(argv)
    from benchmarks.serving_run import run  # torch and the models load only now

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
