"""llama-server with a FLix export's adapters: the command line, and a context manager
that starts it on this machine's loopback, waits until it answers, and stops it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from flix.serve.client import read_manifest, server_args
from flix.serve.llama_cpp import server_binary


def command(
    base: str | Path,
    export: str | Path,
    port: int = 8080,
    threads: int | None = None,
    parallel: int = 1,
    ctx: int = 4096,
    binary=None,
    exact: bool = False,
) -> list[str]:
    """llama-server over a GGUF base with every feature adapter loaded at scale 0; exact:
    its KV cache in float32 and no flash attention (by default the cache is float16, which
    rounds keys and values: about 1e-3 in log-probabilities)."""
    binary = binary or server_binary()
    if binary is None:
        raise ValueError("llama-server is not built: run `make serve-setup` (or `python -m flix serve setup`), or set FLIX_LLAMA_SERVER")
    args = [str(binary), "-m", str(base), *server_args(read_manifest(export), export)]
    # --poll 0: threads sleep rather than spin between tasks (spinning threads on a shared
    # CPU made each request of a tiny model take seconds here)
    # --cache-ram 0: no host-memory prompt cache, which restores a prompt's saved state whatever
    # adapters computed it (measured: another combination's keys and values, 0.5-0.8 off in
    # log-probabilities); each slot still reuses its own prefix, cleared when the adapters change
    args += ["--host", "127.0.0.1", "--port", str(port), "-c", str(ctx), "-np", str(parallel), "--no-webui", "--poll", "0", "--cache-ram", "0"]
    args += ["-ctk", "f32", "-ctv", "f32", "-fa", "off"] if exact else []
    return args + (["-t", str(threads), "-tb", str(threads)] if threads else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`with LlamaServer(base, export) as url:` a running server at url (loopback), stopped
    on exit; its output goes to log (a file), shown in the error if it fails to start."""

    def __init__(self, base, export, log: str | Path | None = None, timeout: float = 300.0, **options):
        self.port = options.pop("port", None) or free_port()
        self.args = command(base, export, port=self.port, **options)
        self.log, self.timeout, self.process = log, timeout, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = Path(self.log).read_text()[-2000:] if self.log else ""
                raise RuntimeError(f"llama-server exited with {self.process.returncode} while starting: {' '.join(self.args)}\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                    if json.loads(reply.read()).get("status") == "ok":
                        return self.url
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"llama-server did not answer /health within {self.timeout:.0f} s: {' '.join(self.args)}")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
