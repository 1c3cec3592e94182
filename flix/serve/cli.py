"""`flix serve`: FLix served by llama.cpp's llama-server, which sums per request the
feature adapters a combination turns on (docs/serving.md).

  setup     build llama-server once into the flix cache (minutes; `make serve-setup`)
  base      a GGUF base: gemma3_270m as packaged (q4_k_m) or de-quantised (f32); tiny (f32)
  export    a saved FLix adapter as one GGUF LoRA per feature + manifest.json
  start     run llama-server over a base with an export's adapters (all at scale 0)
  request   a combination's `lora` list; with --url and --prompt, one completion
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse_features(text: str) -> dict:
    from flix.pipeline.export_command import parse_features as parse

    return parse(text) if text else {}


def export(args) -> int:
    from flix.base_models import load_model
    from flix.config import CONFIG_NAME
    from flix.model import FLixModel
    from flix.serve.client import FORMAT, MANIFEST
    from flix.serve.convert import feature_ggufs

    if not (args.adapter / CONFIG_NAME).is_file():
        return fail(f"{args.adapter / CONFIG_NAME} not found: pass a FLix adapter folder (a run's best_adapter/)")
    if args.out.exists() and not args.out.is_dir():
        return fail(f"{args.out} is a file, not a folder: pass a folder for the GGUF adapters")
    model = FLixModel.from_pretrained(load_model({"name": args.model})[0], args.adapter)
    adapters = feature_ggufs(model, args.out)
    space = model.flix_config.space
    manifest = {
        "format": FORMAT,
        "model": args.model,
        "alpha": model.flix_config.alpha,
        "active_rank": space.active_rank,
        "groups": list(space.features),
        "adapters": adapters,
        "trained_combinations": model.trained_combinations,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(adapters)} GGUF LoRA adapter(s) (one per feature) and {args.out / MANIFEST}")
    return 0


def base(args) -> int:
    from flix.serve.convert import base_gguf

    dtype = args.dtype or ("q4_k_m" if args.model == "gemma3_270m" else "f32")
    print(f"wrote {base_gguf(args.model, args.out, dtype)}")
    return 0


def setup(args) -> int:
    from flix.serve.llama_cpp import build

    build(args.jobs)
    return 0


def start(args) -> int:
    from flix.serve.server import command

    argv = command(args.base, args.export, port=args.port, threads=args.threads, parallel=args.parallel, ctx=args.ctx)
    print(" ".join(argv), flush=True)
    if not args.print_only:
        os.execv(argv[0], argv)
    return 0


def request(args) -> int:
    from flix.serve.client import complete, lora_list, read_manifest

    lora = lora_list(read_manifest(args.export), args.features)
    if not args.url:
        print(json.dumps({"lora": lora}))
        return 0
    if args.prompt is None:
        return fail("--url needs --prompt: the text to complete")
    reply = complete(args.url, args.prompt, lora, n_predict=args.n_predict)
    print(json.dumps({"features": args.features, "lora": lora, "content": reply["content"]}, ensure_ascii=False))
    return 0


def fail(message: str) -> int:
    print(f"flix serve: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flix serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup", help="build llama-server into the flix cache (once; minutes)")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: the CPU count)")
    p = sub.add_parser("base", help="write a GGUF base model")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--model", default="gemma3_270m", help="gemma3_270m (default) or tiny")
    p.add_argument(
        "--dtype", choices=["q4_k_m", "f32"], help="q4_k_m: the packaged file (gemma's default); f32: every tensor de-quantised (tiny's only)"
    )
    p = sub.add_parser("export", help="a FLix adapter as one GGUF LoRA per feature + manifest.json")
    p.add_argument("adapter", type=Path, help="a FLix adapter folder (save_pretrained; a run's best_adapter/)")
    p.add_argument("out", type=Path, help="folder for <group>=<feature>.gguf files and manifest.json")
    p.add_argument(
        "--model", required=True, help="the base model the adapter was trained on: a conf/model name (tiny, gemma3_270m), a hub id or a folder"
    )
    p = sub.add_parser("start", help="run llama-server with an export's adapters, all at scale 0")
    p.add_argument("export", type=Path, help="the folder `flix serve export` wrote")
    p.add_argument("--base", type=Path, required=True, help="the GGUF base (flix serve base)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--threads", type=int, help="CPU threads (default: llama-server's)")
    p.add_argument("--parallel", type=int, default=1, help="request slots (-np)")
    p.add_argument("--ctx", type=int, default=4096, help="context size, shared by the slots")
    p.add_argument("--print-only", action="store_true", help="print the command line, do not run it")
    p = sub.add_parser("request", help="a combination's lora list, or one completion with --url")
    p.add_argument("export", type=Path, help="the folder `flix serve export` wrote (its manifest.json)")
    p.add_argument("--features", type=parse_features, default={}, help="group=value[,group=value...], e.g. task=ner,lang=sw")
    p.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080")
    p.add_argument("--prompt", help="text to complete (greedy)")
    p.add_argument("--n-predict", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        return {"setup": setup, "base": base, "export": export, "start": start, "request": request}[args.command](args)
    except ValueError as error:
        return fail(str(error))


if __name__ == "__main__":
    sys.exit(main())
