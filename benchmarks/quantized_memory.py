"""Memory of the frozen base in float vs 4-bit (nf4) vs 8-bit (int8): the bytes its
parameters hold and the process's resident memory, on the tiny model and Gemma 3 270M.

Each (model, quantize) case runs in a fresh child process (peak memory only grows) that
imports torch, flix and bitsandbytes first (all cases alike), then loads the base
(`flix.base_models.load_model`, as a run does: in float, then quantized), adds a
compute-matched FLix adapter (one rank-6 bank on the default projections) and takes one
training step (forward and backward) on random tokens. Printed per case: the base's
parameter bytes (with bitsandbytes' scales; `flix.base_models.quantize.storage_bytes`)
and how many of them are in quantized layers, resident memory after loading (VmRSS, and
RssAnon: the process's own memory, without mapped files such as a safetensors checkpoint
loaded by mmap) and the peak over load and step (VmHWM, `flix.pipeline.memory.peak_rss_gib`).
Loading in float first makes the load's peak the float model's, whatever model.quantize.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = "tiny,gemma3_270m"
QUANTIZE = "none,nf4,int8"


def rss_gib(field: str = "VmRSS") -> float:
    """Resident memory now, GiB: VmRSS (all), RssAnon (the process's own) or RssFile
    (mapped files, e.g. safetensors weights loaded by mmap: page cache the kernel can drop)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20


def measure(model_name: str, quantize: str, batch: int, length: int, threads: int) -> dict:
    """One case, in this process: what the module docstring lists."""
    import gc

    import bitsandbytes  # noqa: F401  (imported in every case, so the baselines match)
    import torch

    from flix import FLixConfig, get_flix_model
    from flix.base_models import load_model
    from flix.base_models.quantize import storage_bytes
    from flix.layer import is_quantized
    from flix.pipeline.memory import peak_rss_gib

    torch.set_num_threads(threads)
    start = rss_gib()
    started = time.perf_counter()
    base, _ = load_model({"name": model_name, "quantize": quantize})
    load_s = time.perf_counter() - started
    gc.collect()
    loaded, anon = rss_gib(), rss_gib("RssAnon")
    quantized = sum(storage_bytes(m) for m in base.modules() if is_quantized(m))
    row = {"model": model_name, "quantize": quantize, "base_bytes": storage_bytes(base), "quantized_layer_bytes": quantized}
    model = get_flix_model(base, FLixConfig(shared_rank=6, alpha=16.0))  # conf/method/compute_matched.yaml's adapter
    ids = torch.randint(3, base.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    step_s = time.perf_counter() - started
    banks = {p.dtype for p in model.parameters() if p.requires_grad}
    row.update(
        rss_start_gib=start,
        rss_loaded_gib=loaded,
        rss_anon_loaded_gib=anon,
        peak_rss_gib=peak_rss_gib(),
        load_s=load_s,
        step_s=step_s,
        bank_dtypes=sorted(str(d) for d in banks),
        batch=f"{batch}x{length}",
    )
    return row


def run_case(model_name: str, quantize: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.quantized_memory", "--case", f"{model_name}:{quantize}"]
    cmd += ["--batch", str(args.batch), "--length", str(args.length), "--threads", str(args.threads)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{model_name} quantize={quantize} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict]) -> str:
    mib = 2**20
    lines = [
        f"{'model':<12} {'quantize':<8} {'base MiB':>9} {'in 4/8-bit':>10} {'RSS start':>9} {'RSS loaded':>10} {'anon':>6} {'peak RSS':>9} {'load s':>7} {'step s':>7}  banks",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:<12} {r['quantize']:<8} {r['base_bytes'] / mib:9.2f} {r['quantized_layer_bytes'] / mib:10.2f} "
            f"{r['rss_start_gib']:8.2f}G {r['rss_loaded_gib']:9.2f}G {r['rss_anon_loaded_gib']:5.2f}G {r['peak_rss_gib']:8.2f}G {r['load_s']:7.1f} {r['step_s']:7.2f}  "
            f"{','.join(d.removeprefix('torch.') for d in r['bank_dtypes'])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantized_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS, help=f"comma-separated model names (default {MODELS})")
    parser.add_argument("--quantize", default=QUANTIZE, help=f"comma-separated model.quantize values (default {QUANTIZE})")
    parser.add_argument("--batch", type=int, default=4, help="examples in the training step (default 4)")
    parser.add_argument("--length", type=int, default=64, help="tokens per example (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, help="also write the rows here as JSON")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # MODEL:QUANTIZE, in a child process
    args = parser.parse_args(argv)
    if args.case:
        model_name, quantize = args.case.split(":")
        print(json.dumps(measure(model_name, quantize, args.batch, args.length, args.threads)))
        return 0
    rows = []
    for model_name in args.models.split(","):
        for quantize in args.quantize.split(","):
            rows.append(run_case(model_name, quantize, args))
            print(f"benchmarks: {model_name} quantize={quantize} done", file=sys.stderr, flush=True)
    print(report(rows))
    if args.out:
        from flix.io import atomic_write_json

        atomic_write_json(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
