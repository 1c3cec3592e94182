"""Data-layer faults of the fault-injection review, one test each, named after the
fault: `flix data download`, the reader behind `flix data stats`, and `flix score`, run
for real on small files written here (archives and the loopback server: test_download)."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from test_download import NAME, TOP, Handler, good_members, tgz

from flix import metrics
from flix.data import cli
from flix.data.download import WORKDIR, BadArchive, download
from flix.data.reader import data_files, iter_file

DEEP = "[" * 100_000 + "]" * 100_000  # far past Python's recursion limit
BOMB = [(f"{TOP}/ner/train/zz.jsonl", b"0" * 3_000_000)]  # 3 MB of one byte: a tiny .tgz


@pytest.fixture
def serve():
    """serve(body) -> (server, URL of `body` on loopback); server.ranges logs the requests."""
    started = []

    def start(body: bytes):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.files, httpd.ranges, httpd.honour_range = {f"/{NAME}": body}, [], True
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        started.append(httpd)
        return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/{NAME}"

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def flix_data(capsys, *argv: str) -> tuple[int, str]:
    """`flix data ARGV` in process: (exit code, stderr)."""
    code = cli.main([*argv, "-q"])
    return code, capsys.readouterr().err


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def ner(text: str = "Ali yuko Nairobi", spans: list | None = None, target: str | None = None) -> str:
    spans = [{"start_byte": 9, "limit_byte": 16, "label": "LOC"}] if spans is None else spans
    return json.dumps({"text": text, "spans": spans, **({} if target is None else {"target": target})})


def test_download_never_deletes_or_overwrites_a_file_it_did_not_create(serve, tmp_path, capsys):
    server, url = serve(tgz(good_members()))
    dest = tmp_path / "data"
    theirs = dest / WORKDIR / NAME  # the download's own name, in a folder the user made
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"my own file")
    mine = dest / NAME  # the URL's last segment, beside the data
    mine.write_bytes(b"mine too")
    code, err = flix_data(capsys, "download", "--dest", str(dest), "--url", url)
    assert code == 2 and f"{theirs.parent} exists and was not made by flix data download" in err
    assert "move it away, or pass another --dest" in err
    assert theirs.read_bytes() == b"my own file" and server.ranges == [], "neither read as the archive nor deleted"

    theirs.parent.rename(tmp_path / "moved")
    assert flix_data(capsys, "download", "--dest", str(dest), "--url", url)[0] == 0
    assert mine.read_bytes() == b"mine too" and sorted(p.name for p in dest.iterdir()) == sorted([NAME, TOP])

    other = tmp_path / "other"
    write(other / TOP, ["my notes"])  # a file where the archive's tree would go
    code, err = flix_data(capsys, "download", "--dest", str(other), "--url", url)
    assert code == 2 and f"{other / TOP} is in the way" in err and "Move it away, or pass another --dest" in err
    assert (other / TOP).read_text() == "my notes\n"
    (other / TOP).rename(tmp_path / "notes")
    assert flix_data(capsys, "download", "--dest", str(other), "--url", url)[0] == 0
    assert len(server.ranges) == 2, "the download kept from the refused run is unpacked, not fetched again"


def test_gzip_bomb_is_refused_while_extracting(serve, tmp_path, capsys):
    bomb = tmp_path / NAME
    bomb.write_bytes(tgz(good_members() + BOMB))
    dest = tmp_path / "data"
    code, err = flix_data(capsys, "download", "--dest", str(dest), "--url", str(bomb), "--max-extract-gb", "0.002")
    assert code == 1 and f"Refusing archive {bomb}: it unpacks to more than 0.002 GB" in err and "--max-extract-gb" in err
    assert list(dest.iterdir()) == [], "nothing half-extracted stays"

    trailer = tmp_path / "trailer.tgz"  # the bytes after the tar's end inflate too
    trailer.write_bytes(gzip.compress(gzip.decompress(tgz(good_members())) + bytes(3_000_000)))
    code, err = flix_data(capsys, "download", "--dest", str(dest), "--url", str(trailer), "--max-extract-gb", "0.002")
    assert code == 1 and "more than 0.002 GB" in err and list(dest.iterdir()) == []

    server, url = serve(bomb.read_bytes())
    code, err = flix_data(capsys, "download", "--dest", str(dest), "--url", url, "--max-extract-gb", "0.002")
    assert code == 1 and f"The download stays at {dest / WORKDIR / NAME}" in err
    code, err = flix_data(capsys, "download", "--dest", str(dest), "--url", url, "--max-extract-gb", "0.01")
    assert code == 0 and server.ranges == [None], "a larger limit unpacks the kept download"

    code, err = flix_data(capsys, "download", "--dest", str(tmp_path / "d"), "--url", str(bomb), "--max-extract-gb", "0")
    assert code == 2 and "--max-extract-gb must be positive" in err


@pytest.mark.parametrize(
    "extra",
    [
        [(f"{TOP}/ner/train/sw.jsonl", b"{}\n")],  # the same file twice
        [(f"{TOP}/ner/train/sw.jsonl/", None)],  # a file, then a directory of its name
        [(f"{TOP}/ner/train/sw.jsonl/x.jsonl", b"{}\n")],  # a file inside a file
        [(f"{TOP}/ner/train", b"{}\n")],  # a file where a directory is
    ],
)
def test_duplicate_member_is_refused(extra, tmp_path):
    local = tmp_path / NAME
    local.write_bytes(tgz(good_members() + extra))
    dest = tmp_path / "data"
    with pytest.raises(BadArchive, match=re.escape(f"Refusing archive {local}: member {extra[0][0].rstrip('/')!r}")) as err:
        download(str(local), dest, progress=False)
    assert "appears twice" in str(err.value) or "which the archive has as a file" in str(err.value)
    assert list(dest.iterdir()) == []


@pytest.mark.needs_mini  # counts every NER line of the real mini copy
def test_ner_target_disagreeing_with_spans_is_refused(data_root, tmp_path, capsys):
    path = write(
        tmp_path / "ner" / "train" / "sw.jsonl",
        [ner(target="LOC: Nairobi"), ner(target="PER: Nairobi"), ner(spans=[{"start_byte": 9, "limit_byte": 16, "label": "CITY"}])],
    )
    code, err = flix_data(capsys, "stats", "--root", str(tmp_path))
    assert code == 1
    assert f"{path}:2: field 'target' 'PER: Nairobi' does not match its spans ('LOC: Nairobi')" in err
    assert f"{path}:3: spans[0].label must be one of DATE, LOC, ORG, PER, got 'CITY'" in err

    errors, n = [], 0  # refusing is safe: every NER line of the real data agrees
    for task, _, _, ner_file in data_files(data_root):
        if task == "ner":
            n += sum(1 for _ in iter_file(ner_file, task, ner_file.stem, on_error=errors.append))
    counts = json.loads((data_root / "counts.json").read_text())
    assert errors == [] and n == sum(v for k, v in counts.items() if k.startswith("ner/")) > 60_000


def test_deeply_nested_json_is_a_clear_error(tmp_path, capsys):
    path = write(tmp_path / "ner" / "validation" / "sw.jsonl", [ner(), DEEP])
    code, err = flix_data(capsys, "stats", "--root", str(tmp_path))
    assert code == 1 and f"{path}:2: JSON nested too deeply" in err and "Traceback" not in err

    predictions = write(tmp_path / "predictions.jsonl", [json.dumps({"target": "a", "prediction": "a"}), DEEP])
    assert metrics.main(["--task", "ner", str(predictions)]) == 2
    assert f"{predictions}:2: JSON nested too deeply" in capsys.readouterr().err


def test_empty_validation_or_test_file_fails_stats(tmp_path, capsys):
    write(tmp_path / "ner" / "train" / "sw.jsonl", [ner()])
    validation = write(tmp_path / "ner" / "validation" / "sw.jsonl", [])  # 0 bytes
    test = write(tmp_path / "ner" / "test" / "sw.jsonl", ["", "  "])  # blank lines only
    code, err = flix_data(capsys, "stats", "--root", str(tmp_path))
    assert code == 1 and "2 file(s) without examples" in err
    assert f"{validation}: no examples" in err and f"{test}: no examples" in err


def test_user_errors_exit_2_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FLIX_DATA_ROOT", raising=False)
    afile = write(tmp_path / "afile", ["x"])
    runs = {
        "stats --root": ["stats", "--root", str(tmp_path / "missing")],
        "stats without a root": ["stats"],
        "download --url": ["download", "--dest", str(tmp_path / "d"), "--url", str(tmp_path / "missing.tgz")],
        "download --dest": ["download", "--dest", str(afile), "--url", str(afile)],
        "subsample --root": ["subsample", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--per-file", "3"],
    }
    for what, argv in runs.items():
        code, err = flix_data(capsys, *argv)
        assert (code, err.count("\n")) == (2, 1), f"{what}: {code} {err}"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["subsample", "--out", str(tmp_path / "o"), "--per-file", "0"])
    assert exit_.value.code == 2 and "--per-file: must be at least 1, got 0" in capsys.readouterr().err
    assert metrics.main(["--task", "ner", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no FLIX_DATA_ROOT
    proc = subprocess.run([sys.executable, "-m", "flix", "data", "stats", "-q"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("flix data stats: error: No XTREME-UP data root given")
