"""`python -m benchmarks.sharded_memory`: memory per process of data parallelism
(train.parallel=ddp: every process holds the whole base and banks) against sharding
(train.parallel=fsdp: FSDP2, each process holds 1/N), N processes on the CPU (gloo).

Each case is a `torchrun --nproc_per_node N` of this module's worker: it builds the
pipeline's Trainer (flix.pipeline.trainer) on --model, trains --steps steps on the
smoke mixture, and reports per process: the bytes of parameters (frozen base + banks),
bank gradients as the optimizer gets them (the largest step) and optimizer moments it
holds after the last step (a DTensor counts
its local shard), its peak resident memory (VmHWM: includes loading the full base,
which every process does before sharding) and its resident memory after training
(VmRSS). Figures go to stdout (one table) and to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharded_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,gemma3_270m", help="conf/model names, comma-separated (default tiny,gemma3_270m)")
    p.add_argument("--nproc", type=int, default=2, help="processes per case (default 2)")
    p.add_argument("--steps", type=int, default=2, help="training steps per case (default 2)")
    p.add_argument("--batch", type=int, default=4, help="global batch (default 4; micro-batches of 1)")
    p.add_argument("--out", type=Path, default=Path("reports/bench/sharded_memory.json"), help="JSON report")
    p.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)  # one case, under torchrun
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from flix.pipeline import distributed
    from flix.pipeline.run_config import compose, load_mixture_for
    from flix.pipeline.trainer import Trainer

    rank_world = distributed.setup()
    torch.set_num_threads(1)
    cfg = compose(
        [
            "scale=smoke",
            f"model={args.model}",
            "logger=none",
            "mixture=multitask_sw",
            "dropout=0.0",
            f"train.parallel={args.worker}",
            f"scale.batch_size={args.batch}",
            "scale.micro_batch_size=1",
            "scale.max_prompt_tokens=64",
            "scale.max_target_tokens=8",
            "train.threads=1",
        ]
    )
    trainer = Trainer.from_config(cfg, load_mixture_for(cfg), Path("/tmp/flix-sharded-memory"), rank_world)

    def held(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        t = t.coalesce().values() if t.is_sparse else t
        return t.numel() * t.element_size()

    grad_bytes = []
    step_ = trainer.optimizer.step

    def step(*a, **k):  # the bank gradients as the optimizer gets them (freed right after)
        grad_bytes.append(sum(held(p.grad) for p in trainer.optimizer.param_groups[0]["params"] if p.grad is not None))
        return step_(*a, **k)

    trainer.optimizer.step = step
    for i in range(args.steps):
        trainer.train_step(i)

    params = sum(held(p) for p in trainer.model.parameters())
    optimizer = sum(held(v) for state in trainer.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    figures = {
        "rank": rank_world[0],
        "params_mib": params / MIB,
        "optimizer_mib": optimizer / MIB,
        "bank_grad_mib": max(grad_bytes) / MIB,
        "peak_rss_gib": _status_kib("VmHWM:") / 2**20,
        "rss_after_gib": _status_kib("VmRSS:") / 2**20,
    }
    everyone = [None] * rank_world[1]
    dist.all_gather_object(everyone, figures)
    if rank_world[0] == 0:
        print("FIGURES " + json.dumps(everyone), flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    from flix.io import atomic_write_json

    report, env = [], {**os.environ, "OMP_NUM_THREADS": "1"}
    print(
        f"{'model':<13} {'parallel':<8} {'rank':>4} {'params MiB':>10} {'grads MiB':>9} {'optim MiB':>9} {'peak RSS GiB':>12} {'RSS after GiB':>13}"
    )
    for model in args.models.split(","):
        for parallel in ("ddp", "fsdp"):
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.nproc}",
                "-m",
                "benchmarks.sharded_memory",
            ]
            command += ["--worker", parallel, "--model", model, "--steps", str(args.steps), "--batch", str(args.batch)]
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("FIGURES ")), None)
            if done.returncode or line is None:
                print(f"{model} {parallel}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            for f in json.loads(line[len("FIGURES ") :]):
                report.append({"model": model, "parallel": parallel, "processes": args.nproc, "steps": args.steps, **f})
                print(
                    f"{model:<13} {parallel:<8} {f['rank']:>4} {f['params_mib']:>10.2f} {f['bank_grad_mib']:>9.3f} "
                    f"{f['optimizer_mib']:>9.3f} {f['peak_rss_gib']:>12.3f} {f['rss_after_gib']:>13.3f}",
                    flush=True,
                )
    atomic_write_json(args.out, {"cases": report})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
