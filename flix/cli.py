"""`flix` command line: each subcommand lives with the module that does the work."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, help); each module exposes main(argv) -> int
COMMANDS = {
    "study": ("flix.pipeline.study", "run a study (experiments/NAME.yaml: sweeps of runs), then render its tables"),
    "score": ("flix.metrics", "score predictions with XTREME-UP's official metrics"),
    "data": ("flix.data.cli", "read, check, download and subsample XTREME-UP data"),
    "bench": ("flix.pipeline.bench_command", "expected time of one run here (run); a checkout's speed benchmarks (adapters, model, layer, loss)"),
    "report": ("flix.report.cli", "render Tables 1-5 and Figure 2 from finished runs"),
    "sync": ("flix.pipeline.sync", "upload offline W&B runs (a whole study's) with one wandb sync"),
    "records": ("flix.record", "copy runs' records (results, predictions, logs; no weights) to another folder"),
    "compare": ("flix.record.compare", "compare two runs roots: the same runs with the same results, predictions and tables"),
    "launch": ("flix.pipeline.launch", "torchrun (its arguments) with one line when a process fails, not its failure summary"),
    "offline": ("flix.pipeline.offline", "stage parts for a GPU machine without network, and run there"),
    "export": ("flix.pipeline.export_command", "write a FLix adapter as peft LoRA adapters, one per trained feature combination"),
    "serve": (
        "flix.serve.cli",
        "serve a FLix adapter with llama.cpp's llama-server: build it, export one GGUF LoRA per feature, request combinations",
    ),
}


def usage() -> str:
    lines = ["usage: flix COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `flix COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flix: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
