"""Subsampling the real mini copy: deterministic, verbatim, same layout, never in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flix.data import cli
from flix.data.reader import DataError, data_files, read_dataset
from flix.data.subsample import subsample


@pytest.fixture(scope="module")
def small(data_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    subsample(data_root, out, per_file=3, seed=7, progress=False)
    return out


def test_same_layout_and_counts(data_root, small):
    source = {key[:3] for key in data_files(data_root)}
    assert {key[:3] for key in data_files(small)} == source
    counts = json.loads((small / "counts.json").read_text())
    assert counts == {f"{t}/{s}/{n}": 3 for t, s, n in source}
    assert len(read_dataset(small, "translation", "test", "sw")) == 3


def test_lines_are_verbatim_and_in_file_order(data_root, small):
    for task, split, _, path in data_files(small)[::20]:
        source = (data_root / task / split / path.name).read_bytes().splitlines()
        positions = [source.index(line) for line in path.read_bytes().splitlines()]
        assert positions == sorted(positions), path


def test_deterministic_in_seed(data_root, small, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    subsample(data_root, again, per_file=3, seed=7, progress=False)
    subsample(data_root, other, per_file=3, seed=8, progress=False)
    name = "ner/train/sw.jsonl"
    assert (again / name).read_bytes() == (small / name).read_bytes()
    assert (other / name).read_bytes() != (small / name).read_bytes()


def test_short_files_are_kept_whole(small, tmp_path):
    counts = subsample(small, tmp_path / "out", per_file=10, seed=0, progress=False)
    assert set(counts.values()) == {3}
    name = "qa_in_lang/test/sw.jsonl"
    assert (tmp_path / "out" / name).read_bytes() == (small / name).read_bytes()


def test_refuses_to_write_into_source(small):
    before = (small / "counts.json").read_bytes()
    for out in (small, small / "ner"):
        with pytest.raises(DataError, match="source root"):
            subsample(small, out, per_file=1, seed=0, progress=False)
    assert (small / "counts.json").read_bytes() == before
    assert not (small / "ner" / "ner").exists()


def test_cli(small, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["subsample", "--root", str(small), "--out", str(out), "--per-file", "2", "--seed", "1", "-q"]
    assert cli.main(argv) == 0
    assert set(json.loads((out / "counts.json").read_text()).values()) == {2}
    assert "wrote" in capsys.readouterr().out
