"""FLix served by llama.cpp's llama-server: one GGUF LoRA per feature over a GGUF base,
and per request the `lora` list that turns on a combination's features (docs/serving.md).

`flix.serve.cli` (`flix serve`), `client` (manifest -> request), `convert` (GGUF files by
llama.cpp's converters, `gguf_child` in a child process), `server` (start and stop
llama-server), `llama_cpp` (its source and build, cached).
"""
