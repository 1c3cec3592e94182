"""Runs in a child process whose sys.path starts with llama.cpp's source tree (its
`conversion` package and `gguf-py`), so llama.cpp's own converters do the GGUF work:
`python gguf_child.py LLAMA_CPP_SRC JOBS.json`, each job one of

- {"kind": "check", "base": DIR}: is the base's architecture one llama.cpp converts;
- {"kind": "lora", "peft": DIR, "base": DIR, "out": FILE}: convert_lora_to_gguf.py on a
  peft adapter (run in this process, so a folder of features costs one start-up);
- {"kind": "float_base", "model": DIR, "out": FILE}: a float32 GGUF of a Hugging Face model
  with a byte vocabulary (flix's tiny test models: ByT5 ids, pad 0, eos 1, unk 2, bytes 3-258);
- {"kind": "dequantise", "gguf": FILE, "out": FILE}: the same GGUF, every tensor in float32.

A failure prints one line `error: ...` on stdout and exits 1. Not imported by flix.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

logging.basicConfig(level=logging.WARNING)  # the converters' own basicConfig then changes nothing


def model_class(base: Path):
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    hparams = ModelBase.load_hparams(base, False)
    arch = get_model_architecture(hparams, ModelType.TEXT)
    try:
        return get_model_class(arch), hparams
    except NotImplementedError:
        raise SystemExit(
            f"error: architecture {arch} (from {base / 'config.json'}) is not one llama.cpp converts; llama-server cannot serve it"
        ) from None


def lora(job: dict) -> None:
    script = Path(job["src"]) / "convert_lora_to_gguf.py"
    sys.argv = [str(script), "--base", job["base"], "--outfile", job["out"], "--outtype", "f32", job["peft"]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        if stop.code:
            raise SystemExit(f"error: convert_lora_to_gguf.py failed on {job['peft']} (exit {stop.code})") from None


def float_base(job: dict) -> None:
    import gguf

    cls, hparams = model_class(Path(job["model"]))
    vocab = hparams["vocab_size"]

    class ByteVocab(cls):  # the converter's model with a byte vocabulary instead of a tokenizer file
        model_arch = cls.model_arch

        def set_vocab(self):
            tokens = ["<pad>", "</s>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
            tokens += [f"<extra_id_{i}>" for i in range(vocab - len(tokens))]
            # bytes as NORMAL tokens whose text is "<0xAB>": llama-server then never holds a token back
            # as an incomplete UTF-8 sequence (which would leave its probabilities out of a reply);
            # this GGUF is for requests made of token ids, as flix's tests make them
            types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.USER_DEFINED] * (vocab - 259)
            writer = self.gguf_writer
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores([0.0] * vocab)
            writer.add_token_types(types)
            writer.add_pad_token_id(0)
            writer.add_eos_token_id(1)
            writer.add_unk_token_id(2)
            writer.add_bos_token_id(1)
            writer.add_add_bos_token(False)
            writer.add_add_eos_token(False)

    tokenizer_json = Path(job["model"]) / "tokenizer.json"  # some converters count the vocabulary there
    tokenizer_json.write_text(json.dumps({"model": {"vocab": {str(i): i for i in range(vocab)}}, "added_tokens": []}))
    model = ByteVocab(Path(job["model"]), gguf.LlamaFileType.ALL_F32, Path(job["out"]), eager=True, hparams=hparams)
    model.write()


def dequantise(job: dict) -> None:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(job["gguf"])
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(job["out"], arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = gguf.LlamaFileType.ALL_F32 if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        writer.add_tensor(tensor.name, data.reshape([int(n) for n in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> int:
    src, jobs = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    sys.path[:1] = [src, str(Path(src) / "gguf-py")]  # llama.cpp's packages, not this folder's modules
    for job in jobs:
        job["src"] = src
        try:
            if job["kind"] == "check":
                model_class(Path(job["base"]))
            else:
                {"lora": lora, "float_base": float_base, "dequantise": dequantise}[job["kind"]](job)
        except SystemExit as stop:
            print(stop.code if isinstance(stop.code, str) else f"error: job {job} failed", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
