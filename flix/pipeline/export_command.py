"""`flix export ADAPTER OUT --model M`: a saved FLix adapter (a run's best_adapter/) as one
standard peft LoRA adapter per trained feature combination, with a manifest (flix.export)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_features(text: str) -> dict:
    """task=ner,lang=sw -> {"task": "ner", "lang": "sw"}."""
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    if not pairs or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise argparse.ArgumentTypeError(f"expected group=value[,group=value...], e.g. task=ner,lang=sw; got {text!r}")
    return dict(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flix export", description=__doc__)
    parser.add_argument("adapter", type=Path, help="a FLix adapter folder (save_pretrained; a run's best_adapter/)")
    parser.add_argument("out", type=Path, help="folder for one peft adapter per combination and manifest.json")
    parser.add_argument("--model", required=True, help="the base model: a conf/model name (tiny, gemma3_270m), a hub id or a local folder")
    parser.add_argument("--features", type=parse_features, action="append", help="a combination to export (repeatable); default: every trained one")
    args = parser.parse_args(argv)
    from flix.base_models import load_model  # torch and transformers load here, not for --help
    from flix.config import CONFIG_NAME
    from flix.export import MANIFEST, export_all
    from flix.model import FLixModel

    if args.out.exists() and not args.out.is_dir():  # before the model loads: export_all would fail writing
        print(f"flix export: error: {args.out} is a file, not a folder: pass a folder for the adapters (new or existing)", file=sys.stderr)
        return 2
    if not (args.adapter / CONFIG_NAME).is_file():
        print(f"flix export: error: {args.adapter / CONFIG_NAME} not found: pass a FLix adapter folder", file=sys.stderr)
        return 2
    try:
        model = FLixModel.from_pretrained(load_model({"name": args.model})[0], args.adapter)
        out = export_all(model, args.out, args.features)
    except ValueError as error:
        print(f"flix export: error: {error}", file=sys.stderr)
        return 2
    manifest = json.loads((out / MANIFEST).read_text())
    print(f"wrote {len(manifest['adapters'])} peft adapter(s) and {out / MANIFEST} (max_lora_rank {manifest['max_lora_rank']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
