"""`flix data download` offline: a tiny archive built here, served on loopback only."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flix.data import cli
from flix.data.download import BadArchive, default_dest, download, workdir
from flix.data.reader import available, read_dataset

TOP = "xtreme_up_v1.1"
NAME = "xtreme-up-v1.1.jsonl.tgz"
FILES = {
    "ner/train/sw.jsonl": [{"text": "Ali yuko Nairobi", "spans": [], "target": ""}],
    "ner/test/sw.jsonl": [{"text": "Nairobi", "spans": [{"start_byte": 0, "limit_byte": 7, "label": "LOC"}]}],
    "translation/validation/en2yo.jsonl": [{"id": "t0", "input": "Hello", "target": "Báwo"}],
}


def tgz(members: list[tuple[str, bytes | None]]) -> bytes:
    """A gzip tar of (name, content) members; content None makes a symlink, a name
    ending in / a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif content is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def good_members() -> list[tuple[str, bytes]]:
    return [(f"{TOP}/{path}", "".join(json.dumps(line) + "\n" for line in lines).encode()) for path, lines in FILES.items()]


@pytest.fixture(scope="module")
def archive() -> bytes:
    # Padded with incompressible bytes so that "half the archive" is a real partial download.
    return tgz(good_members() + [(f"{TOP}/README", hashlib.sha512(b"x").digest() * 400)])


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; honours `Range: bytes=N-` unless `server.honour_range` is off."""

    def do_GET(self) -> None:
        body = self.server.files.get(self.path)
        self.server.ranges.append(self.headers.get("Range"))
        if body is None:
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and self.server.honour_range:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(archive):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.ranges, httpd.honour_range = {f"/{NAME}": archive}, [], True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/{NAME}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def assert_data_root(root: Path, dest: Path) -> None:
    assert root == dest / TOP
    expected = {"ner": {"test": ["sw"], "train": ["sw"]}, "translation": {"validation": ["yo"]}}
    assert available(root) == expected
    assert read_dataset(root, "ner", "test", "sw")[0].target == "LOC: Nairobi"
    assert sorted(p.name for p in dest.iterdir()) == [TOP], "no archive, .part or temp dir left"


def test_download_extracts_and_second_call_is_a_noop(server, tmp_path):
    dest = tmp_path / "data"
    assert_data_root(download(server.url, dest, progress=False), dest)
    assert server.ranges == [None]
    assert download(server.url, dest, progress=False) == dest / TOP
    assert len(server.ranges) == 1


def test_partial_download_is_resumed(server, archive, tmp_path):
    dest = tmp_path / "data"
    half = len(archive) // 2
    (workdir(dest) / f"{NAME}.part").write_bytes(archive[:half])  # as an interrupted run leaves it
    assert_data_root(download(server.url, dest, progress=False), dest)
    assert server.ranges == [f"bytes={half}-"]


def test_restarts_when_server_ignores_range(server, tmp_path):
    server.honour_range = False
    dest = tmp_path / "data"
    (workdir(dest) / f"{NAME}.part").write_bytes(b"stale bytes from another file")
    assert_data_root(download(server.url, dest, progress=False), dest)
    assert server.ranges == ["bytes=29-"]


def test_local_path_and_file_url(archive, tmp_path):
    local = tmp_path / NAME
    local.write_bytes(archive)
    for url, dest in ((str(local), tmp_path / "a"), (local.as_uri(), tmp_path / "b")):
        assert_data_root(download(url, dest, progress=False), dest)
    assert local.read_bytes() == archive, "a local archive is read in place, not moved"


def test_sha256_is_checked(archive, tmp_path):
    local = tmp_path / NAME
    local.write_bytes(archive)
    with pytest.raises(BadArchive, match="sha256"):
        download(str(local), tmp_path / "a", sha256="0" * 64, progress=False)
    digest = hashlib.sha256(archive).hexdigest()
    assert_data_root(download(str(local), tmp_path / "b", sha256=digest, progress=False), tmp_path / "b")


def flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


BAD_ARCHIVES = {
    "dotdot": lambda a: tgz(good_members() + [(f"{TOP}/../../evil.jsonl", b"{}\n")]),
    "absolute": lambda a: tgz(good_members() + [("/tmp/flix-evil.jsonl", b"{}\n")]),
    "symlink": lambda a: tgz(good_members() + [(f"{TOP}/ner/train/ha.jsonl", None)]),
    "two_tops": lambda a: tgz(good_members() + [("other/ner/train/sw.jsonl", b"{}\n")]),
    "no_layout": lambda a: tgz([(f"{TOP}/README", b"hello")]),
    "truncated": lambda a: a[: len(a) * 3 // 4],
    "flipped_byte": flipped,
    "not_gzip": lambda a: b"plain text, not an archive",
    "duplicate": lambda a: tgz(good_members() + [(f"{TOP}/ner/train/sw.jsonl", b'{"other": "copy"}\n')]),
}


@pytest.mark.parametrize("kind", BAD_ARCHIVES)
def test_bad_archive_is_refused_and_leaves_nothing(kind, archive, tmp_path):
    local = tmp_path / NAME
    local.write_bytes(BAD_ARCHIVES[kind](archive))
    dest = tmp_path / "data"
    with pytest.raises(BadArchive, match="Refusing"):
        download(str(local), dest, progress=False)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil.jsonl").exists()
    assert not Path("/tmp/flix-evil.jsonl").exists()


def test_users_file_with_the_archives_name_is_never_touched(server, tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    mine = dest / NAME  # the URL's last segment: the old code used it as the archive, then deleted it
    mine.write_bytes(b"my own file")
    root = download(server.url, dest, progress=False)
    assert mine.read_bytes() == b"my own file"
    assert sorted(p.name for p in dest.iterdir()) == sorted([TOP, NAME]) and root == dest / TOP


def test_extraction_has_a_size_limit(tmp_path):
    bomb = tmp_path / NAME
    bomb.write_bytes(tgz(good_members() + [(f"{TOP}/ner/train/zz.jsonl", b"0" * 3_000_000)]))  # 3 MB of one byte: a tiny .tgz
    assert bomb.stat().st_size < 100_000
    dest = tmp_path / "data"
    with pytest.raises(BadArchive, match=r"more than 0.002 GB .*--max-extract-gb"):
        download(str(bomb), dest, progress=False, max_extract_gb=0.002)
    assert list(dest.iterdir()) == []
    assert download(str(bomb), dest, progress=False, max_extract_gb=0.01) == dest / TOP


def test_bad_download_is_removed(server, archive, tmp_path):
    server.files[f"/{NAME}"] = flipped(archive)
    dest = tmp_path / "data"
    with pytest.raises(BadArchive, match="run again"):
        download(server.url, dest, progress=False)
    assert list(dest.iterdir()) == []


def test_a_failed_download_leaves_no_folder_and_names_the_commands_flag(server, tmp_path, capsys):
    unreachable = server.url.replace(NAME, "missing.tgz")  # HTTP 404: not a byte arrives
    dest = tmp_path / "data"
    assert cli.main(["download", "--dest", str(dest), "--url", unreachable, "-q"]) == 1
    assert "or pass --url a mirror" in capsys.readouterr().err
    assert not dest.exists()  # before: an empty data/.flix-download
    (tmp_path / "mine").mkdir()  # a folder of the user's stays, without our work folder
    assert cli.main(["download", "--dest", str(tmp_path / "mine"), "--url", unreachable, "-q"]) == 1
    assert list((tmp_path / "mine").iterdir()) == []
    capsys.readouterr()
    argv = ["mini", "--source", unreachable, "--download-dir", str(tmp_path / "dl"), "--dest", str(tmp_path / "small"), "-q"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "or pass --source a mirror" in err and "--url" not in err  # before: --url, which flix data mini does not have
    assert not (tmp_path / "dl").exists() and not (tmp_path / "small").exists()


def test_cli_prints_root_last(archive, tmp_path, capsys):
    local = tmp_path / NAME
    local.write_bytes(archive)
    dest = tmp_path / "data"
    missing = str(tmp_path / "missing.tgz")
    assert cli.main(["download", "--dest", str(dest), "--url", str(local), "-q"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(dest / TOP) and "FLIX_DATA_ROOT" in out[-2]
    assert cli.main(["download", "--dest", str(dest), "--url", missing, "-q"]) == 0, "present: no-op"
    assert cli.main(["download", "--dest", str(tmp_path / "x"), "--url", missing, "-q"]) == 2, "a usage error"
    assert "does not exist" in capsys.readouterr().err


def test_default_dest_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_dest() == tmp_path / "flix" / "data"


# --- flix data mini: a small real copy in a scale's shape, from the archive or a data root ---

SAMPLE = Path(__file__).resolve().parent / "data" / "xtreme_up_sample"


def sample_archive() -> bytes:
    """The real sample in tests/data/, packed as the official archive is (one top folder)."""
    files = sorted(SAMPLE.rglob("*.jsonl"))
    return tgz([(f"{TOP}/{p.relative_to(SAMPLE)}", p.read_bytes()) for p in files])


def mixtures_cut_to(n: int):
    from flix.data.mixture_files import load_mixture_by_name, mixture_names

    return [load_mixture_by_name(name, "mini").restrict(n) for name in mixture_names()]


def test_mini_from_an_archive_holds_what_the_scale_reads(server, tmp_path, capsys):
    server.files[f"/{NAME}"] = sample_archive()
    dest, work = tmp_path / "small", tmp_path / "download"
    assert cli.main(["mini", "--source", server.url, "--download-dir", str(work), "--dest", str(dest), "--scale", "smoke", "-q"]) == 0
    assert f"export FLIX_DATA_ROOT={dest}" in capsys.readouterr().out
    assert (work / TOP / "ner" / "train" / "am.jsonl").is_file(), "the archive is unpacked in --download-dir"
    for mixture in mixtures_cut_to(2):
        mixture.check(dest)  # every file each smoke-scale mixture reads
    counts = json.loads((dest / "counts.json").read_text())
    # smoke evaluates 4 examples per language; it draws 96 for training, more than the sample's 16
    assert counts["ner/validation/am"] == counts["ner/test/am"] == 4 and counts["ner/train/am"] == 16
    assert (dest / "ner/test/am.jsonl").read_bytes().splitlines()[0] in (SAMPLE / "ner/test/am.jsonl").read_bytes().splitlines()


def test_mini_from_a_data_root_is_deterministic_and_seeded(tmp_path):
    argv = ["mini", "--source", str(SAMPLE), "--scale", "smoke", "-q"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert cli.main([*argv, "--dest", str(tmp_path / name), "--seed", seed]) == 0
    same = [(tmp_path / name / "qa_in_lang/test/ar.jsonl").read_bytes() for name in "abc"]
    assert same[0] == same[1] != same[2]


def test_mini_refuses_a_source_without_the_scales_files(tmp_path, capsys):
    dest = tmp_path / "small"
    assert cli.main(["mini", "--source", str(SAMPLE), "--dest", str(dest), "-q"]) == 2  # the cpu scale reads 4 languages per task
    err = capsys.readouterr().err
    assert "lacks" in err and str(SAMPLE / "ner" / "train" / "bbj.jsonl") in err and "Traceback" not in err
    assert not dest.exists(), "nothing written"


@pytest.mark.needs_mini
def test_mini_of_the_mini_copy_has_the_cpu_scales_shape(data_root, tmp_path):
    dest = tmp_path / "small"
    assert cli.main(["mini", "--source", str(data_root), "--dest", str(dest), "-q"]) == 0
    for mixture in mixtures_cut_to(4):  # conf/scale/cpu.yaml: 4 languages per task
        mixture.check(dest)
    counts = json.loads((dest / "counts.json").read_text())
    assert counts["ner/train/am"] == 48 * 16 and counts["ner/validation/am"] == 24 and counts["ner/test/am"] == 48
    assert "ner/train/yo" not in counts, "languages no cpu-scale run reads are left out"
