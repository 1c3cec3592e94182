"""The reader on the real mini XTREME-UP copy, and its errors on malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flix.data import cli
from flix.data.examples import TASKS, Example
from flix.data.reader import (
    SPLITS,
    DataError,
    available,
    data_files,
    dataset_path,
    iter_dataset,
    ner_target,
    read_dataset,
    resolve_root,
)

INPUT_KEYS = {
    "ner": {"text"},
    "qa_in_lang": {"question", "title", "context"},
    "qa_cross_lang": {"question", "title", "context"},
    "semantic_parsing": {"input"},
    "translation": {"input"},
}
GOOD_NER = {"text": "Ali yuko Nairobi", "spans": [{"start_byte": 9, "limit_byte": 16, "label": "LOC"}]}


def nested(flat: dict[str, int]) -> dict[str, dict[str, dict[str, int]]]:
    out: dict = {}
    for key, n in flat.items():
        task, split, name = key.split("/")
        out.setdefault(task, {}).setdefault(split, {})[name] = n
    return out


@pytest.fixture(scope="module")
def counts(data_root: Path) -> dict[str, int]:
    return json.loads((data_root / "counts.json").read_text())


@pytest.fixture(scope="module")
def mini(data_root: Path) -> dict[str, list[Example]]:
    """Every mini file read once through the public API: {"task/split/name": examples}."""
    out = {}
    for task, splits in available(data_root).items():
        for split, langs in splits.items():
            for lang in langs:
                name = dataset_path(data_root, task, split, lang).stem
                out[f"{task}/{split}/{name}"] = read_dataset(data_root, task, split, lang)
    return out


def test_every_file_reads_with_its_count(mini, counts):
    assert {key: len(examples) for key, examples in mini.items()} == counts


def test_examples_are_uniform(mini):
    for key, examples in mini.items():
        task, _, name = key.split("/")
        lang = name.removeprefix("en2") if task == "translation" else name
        assert all(ex.task == task and ex.lang == lang for ex in examples), key
        assert all(set(ex.inputs) == INPUT_KEYS[task] for ex in examples), key
        assert all(isinstance(ex.target, str) and ex.id for ex in examples), key
        assert len({ex.id for ex in examples}) == len(examples), f"{key}: ids repeat"


def test_available_and_paths(data_root):
    found = available(data_root)
    assert set(found) == set(TASKS)
    assert all(set(splits) == set(SPLITS) for splits in found.values())
    assert "sw" in found["translation"]["test"]
    assert dataset_path(data_root, "translation", "test", "sw") == data_root / "translation/test/en2sw.jsonl"
    assert dataset_path(data_root, "ner", "train", "sw") == data_root / "ner/train/sw.jsonl"


def test_ner_targets_rederive_from_spans(data_root, mini, tmp_path):
    """Every NER line of the mini data, with its target stripped, reads back to that target."""
    for _, split, _, path in (f for f in data_files(data_root) if f[0] == "ner"):
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(ner_target(obj["text"], obj["spans"]) == obj["target"] for obj in lines), path
        stripped = tmp_path / "ner" / split / path.name
        stripped.parent.mkdir(parents=True, exist_ok=True)
        no_target = [{k: v for k, v in obj.items() if k != "target"} for obj in lines]
        stripped.write_text("".join(json.dumps(obj) + "\n" for obj in no_target))
    for key, examples in mini.items():
        task, split, lang = key.split("/")
        if task == "ner":
            derived = read_dataset(tmp_path, task, split, lang)
            assert [ex.target for ex in derived] == [ex.target for ex in examples], key


def test_ner_target_uses_utf8_bytes_in_span_order():
    text = "Émile na Zürich"  # É and ü are two bytes each
    spans = span(10, 17, "LOC") + span(0, 6, "PER")
    assert ner_target(text, spans) == "LOC: Zürich $$ PER: Émile"
    assert ner_target(text, []) == ""


def write_lines(root: Path, task: str, name: str, lines: list[str]) -> Path:
    path = root / task / "train" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ner_line(**overrides) -> str:
    obj = {**GOOD_NER, **overrides}
    return json.dumps({k: v for k, v in obj.items() if v is not None}, ensure_ascii=False)


def span(start: int, limit: int, label: str = "LOC") -> list[dict]:
    return [{"start_byte": start, "limit_byte": limit, "label": label}]


@pytest.mark.parametrize(
    "bad, what",
    [
        ('{"text": "x", "spans": [', "Expecting"),
        ("[1, 2]", "JSON object"),
        (ner_line(text=None), "'text'"),
        (ner_line(spans=None), "'spans'"),
        (ner_line(spans=span(9, 40)), "out of range"),
        (ner_line(spans=span(5, 3)), "out of range"),
        (ner_line(spans=span(-1, 3)), "out of range"),
        (ner_line(text="Zürich ni mji", spans=span(0, 2)), "inside a UTF-8 character"),
        (ner_line(text="mji wa Zürich", spans=span(9, 14)), "inside a UTF-8 character"),
        (ner_line(spans=span(9, 16, "")), "label"),
        (ner_line(spans=span(9, 16, 3)), "label"),
        (ner_line(spans=[{"start_byte": "9", "limit_byte": 16, "label": "LOC"}]), "integer"),
        (ner_line(target=5), "'target'"),
        (ner_line(target="PER: Nairobi"), "does not match its spans"),
        (ner_line(spans=span(9, 16, "CITY")), "must be one of DATE, LOC, ORG, PER"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_ner_line_names_file_and_line(tmp_path, bad, what):
    path = write_lines(tmp_path, "ner", "sw", [ner_line(), bad])
    with pytest.raises(DataError, match=what) as err:
        read_dataset(tmp_path, "ner", "train", "sw")
    assert f"{path}:2:" in str(err.value)


@pytest.mark.parametrize("task", ["qa_in_lang", "semantic_parsing", "translation"])
def test_missing_field_in_other_tasks(tmp_path, task):
    name = "en2sw" if task == "translation" else "sw"
    path = write_lines(tmp_path, task, name, ['{"id": "a", "input": "x", "question": "q"}'])
    with pytest.raises(DataError, match="missing field") as err:
        read_dataset(tmp_path, task, "train", "sw")
    assert f"{path}:1:" in str(err.value)


def test_invalid_utf8_names_line(tmp_path):
    path = write_lines(tmp_path, "semantic_parsing", "en", ['{"input": "a", "target": "b"}'])
    path.write_bytes(path.read_bytes() + b'{"input": "\xff", "target": "b"}\n')
    with pytest.raises(DataError, match=f"{path}:2:"):
        read_dataset(tmp_path, "semantic_parsing", "train", "en")


def test_ids_fallback_target_derivation_and_limit(tmp_path):
    write_lines(tmp_path, "ner", "sw", [ner_line(), "", ner_line(spans=[])])
    examples = read_dataset(tmp_path, "ner", "train", "sw")
    assert [(ex.id, ex.target) for ex in examples] == [("sw.jsonl:1", "LOC: Nairobi"), ("sw.jsonl:3", "")]
    assert read_dataset(tmp_path, "ner", "train", "sw", limit=1) == examples[:1]
    assert next(iter_dataset(tmp_path, "ner", "train", "sw")) == examples[0]


def test_stats_flags_empty_files(tmp_path, capsys):
    from flix.data import cli

    write_lines(tmp_path, "ner", "sw", [ner_line()])
    empty = tmp_path / "ner" / "test" / "sw.jsonl"
    empty.parent.mkdir(parents=True)
    empty.write_text("\n")
    assert cli.main(["stats", "--root", str(tmp_path), "-q"]) == 1
    assert f"{empty}: no examples" in capsys.readouterr().err


@pytest.mark.needs_mini  # the message lists the mini copy's NER languages
def test_missing_file_lists_existing_languages(data_root):
    with pytest.raises(DataError, match="No such data file") as err:
        read_dataset(data_root, "ner", "train", "xx")
    assert str(data_root / "ner/train/xx.jsonl") in str(err.value)
    assert "am, bbj, bm" in str(err.value)
    with pytest.raises(DataError, match="Unknown task"):
        read_dataset(data_root, "nerd", "train", "sw")


def test_missing_root_says_how_to_get_data(monkeypatch, tmp_path):
    monkeypatch.delenv("FLIX_DATA_ROOT", raising=False)
    for root in (None, tmp_path / "nowhere", tmp_path):
        with pytest.raises(DataError) as err:
            resolve_root(root)
        message = str(err.value)
        assert "flix data download --dest" in message and "FLIX_DATA_ROOT" in message
        assert "flix data mini --dest" in message and "tests/data/xtreme_up_sample" in message  # a route that needs no ../shared


def test_root_from_env(monkeypatch, data_root):
    monkeypatch.setenv("FLIX_DATA_ROOT", str(data_root))
    assert resolve_root(None) == data_root
    assert len(read_dataset(None, "qa_in_lang", "test", "sw", limit=3)) == 3


def test_stats_cli_last_line_is_counts(data_root, counts, capsys):
    assert cli.main(["stats", "--root", str(data_root), "-q"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == nested(counts)


def test_stats_cli_fails_on_malformed_file(tmp_path, capsys):
    write_lines(tmp_path, "ner", "sw", [ner_line(), ner_line()])
    bad = write_lines(tmp_path, "ner", "ha", [ner_line(), "{oops", ner_line(spans=span(0, 99))])
    assert cli.main(["stats", "--root", str(tmp_path), "-q"]) == 1
    out, err = capsys.readouterr()
    assert f"{bad}:2:" in err and f"{bad}:3:" in err
    assert json.loads(out.strip().splitlines()[-1]) == {"ner": {"train": {"ha": 1, "sw": 2}}}
