"""llama.cpp's source and its `llama-server`, built once per machine under the flix cache
(`flix serve setup`, `make serve-setup`).

The source is the llama.cpp tree vendored in one pinned PyPI source distribution,
llama-cpp-python (MIT, like llama.cpp itself, whose own MIT LICENSE ships in the tree),
fetched with pip and checked against its sha256. It is built with cmake, CPU only, no
network at build time (no curl, no OpenSSL, no prebuilt web UI download). The build lives
in <cache>/llama.cpp/<sdist>/ and is reused while its flags stay the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from flix.io import atomic_write_text, cache_dir

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = "llama_cpp_python-0.3.36/vendor/llama.cpp"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # tuned to this CPU: the build is per machine, in its cache
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the build tries to download the web UI
    "-DBUILD_SHARED_LIBS=OFF",
]
STAMP = "flix-build.json"
SERVER_ENV = "FLIX_LLAMA_SERVER"  # a llama-server binary built elsewhere


def home() -> Path:
    """<cache>/llama.cpp/<sdist name>: src/ (the llama.cpp tree), build/ (cmake's)."""
    return cache_dir() / "llama.cpp" / SDIST.replace("==", "-")


def source_dir() -> Path:
    """The llama.cpp tree (its convert_*_to_gguf.py scripts, gguf-py); fetched if missing."""
    src = home() / "src"
    if not (src / "convert_lora_to_gguf.py").is_file():
        fetch_source()
    return src


def server_binary() -> Path | None:
    """The built llama-server ($FLIX_LLAMA_SERVER first), or None when there is none."""
    if os.environ.get(SERVER_ENV):
        path = Path(os.environ[SERVER_ENV])
        return path if path.is_file() else None
    path = home() / "build" / "bin" / "llama-server"
    stamp = home() / "build" / STAMP
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("flags") == CMAKE_FLAGS:
        return path
    return None


def fetch_source() -> Path:
    """Download the pinned sdist with pip, check its sha256, unpack its llama.cpp tree."""
    import hashlib

    target = home() / "src"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp]
        subprocess.run(pip, check=True)
        archive = Path(tmp) / SDIST_FILE
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{SDIST_FILE}: sha256 {digest}, expected {SDIST_SHA256}: the registry served another file; not building it")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name == VENDORED or m.name.startswith(VENDORED + "/")]
            tar.extractall(tmp, members=members, filter="data")
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / VENDORED, target)
    return target


def build(jobs: int | None = None, log=print) -> Path:
    """llama-server from the cached source: configure and build (minutes), or nothing
    when the cached build has the same flags."""
    existing = server_binary()
    if existing and not os.environ.get(SERVER_ENV):
        log(f"llama-server already built: {existing}")
        return existing
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("c++") is None:
        raise RuntimeError(
            "building llama-server needs cmake and a C++ compiler: apt-get install cmake g++ (or set FLIX_LLAMA_SERVER to a built binary)"
        )
    src, build_dir = source_dir(), home() / "build"
    started = time.perf_counter()
    log(f"building llama-server from {src} into {build_dir} (minutes; later calls reuse it)")
    subprocess.run([cmake, "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL)
    jobs = jobs or os.cpu_count() or 2
    subprocess.run([cmake, "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], check=True)
    seconds = round(time.perf_counter() - started, 1)
    atomic_write_text(
        build_dir / STAMP, json.dumps({"sdist": SDIST, "sha256": SDIST_SHA256, "flags": CMAKE_FLAGS, "seconds": seconds}, indent=2) + "\n"
    )
    log(f"built {build_dir / 'bin' / 'llama-server'} in {seconds:.0f} s")
    return build_dir / "bin" / "llama-server"
