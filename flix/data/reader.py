"""Read XTREME-UP jsonl files (official release or the mini copy) into Examples.

Layout: `{root}/{task}/{split}/{name}.jsonl`, `name` being the language code, or
`en2{lang}` for translation. Every line is checked, so a bad file fails here with
its path and line rather than later as a wrong score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from flix.data.examples import TASKS, Example

SPLITS = ("train", "validation", "test")

# task -> the input fields copied into Example.inputs (every task also needs `target`).
INPUT_FIELDS = {
    "ner": ("text",),
    "qa_in_lang": ("question", "title", "context"),
    "qa_cross_lang": ("question", "title", "context"),
    "semantic_parsing": ("input",),
    "translation": ("input",),
}
TRANSLATION_PREFIX = "en2"
NER_LABELS = ("DATE", "LOC", "ORG", "PER")  # MasakhaNER's, the XTREME-UP NER task's

GET_DATA = (
    "Get a small real copy with `flix data mini --dest DIR` (or the whole release with "
    "`flix data download --dest DIR`), then set FLIX_DATA_ROOT to the directory it prints "
    "(or pass data.root=... / --root). The repository's own sample, tests/data/xtreme_up_sample, "
    "is enough for tests and scale=smoke."
)
FIX_FILE = "Fix the file, or download the data again (flix data download)."


class DataError(ValueError):
    """Bad or missing data; the message says which file/line, what is wrong and what to do."""


class UsageError(DataError):
    """A data root, file or option given is not there or not usable: the user's to fix
    before anything runs (`flix data` exits 2; 1 for a bad line, archive or download)."""


class _BadLine(Exception):
    """A problem with one line; the reader adds the file and line number."""


def resolve_root(root: str | Path | None) -> Path:
    """The data root from `root`, else FLIX_DATA_ROOT; fail early with how to get it."""
    source = "the given root"
    if root is None or str(root) == "":
        root, source = os.environ.get("FLIX_DATA_ROOT") or None, "FLIX_DATA_ROOT"
    if root is None:
        raise UsageError(f"No XTREME-UP data root given and FLIX_DATA_ROOT is not set. {GET_DATA}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UsageError(f"XTREME-UP data root {path} ({source}) is not a directory. {GET_DATA}")
    if not has_layout(path):
        inner = [child for child in sorted(path.iterdir()) if child.is_dir() and has_layout(child)]
        hint = f"Did you mean {inner[0]}? " if inner else ""
        raise UsageError(
            f"XTREME-UP data root {path} ({source}) holds no {{task}}/{{split}}/*.jsonl files (e.g. ner/train/sw.jsonl). {hint}{GET_DATA}"
        )
    return path


def has_layout(path: Path) -> bool:
    """Whether `path` holds at least one `{task}/{split}/*.jsonl` file."""
    return any(next((path / task / split).glob("*.jsonl"), None) is not None for task in TASKS for split in SPLITS if (path / task / split).is_dir())


def _check_names(task: str, split: str) -> None:
    if task not in TASKS:
        raise UsageError(f"Unknown task {task!r}; XTREME-UP tasks here are: {', '.join(TASKS)}.")
    if split not in SPLITS:
        raise UsageError(f"Unknown split {split!r}; splits are: {', '.join(SPLITS)}.")


def file_name(task: str, lang: str) -> str:
    """File stem of a dataset: the language, or `en2{lang}` for translation."""
    return f"{TRANSLATION_PREFIX}{lang}" if task == "translation" else lang


def dataset_path(root: str | Path, task: str, split: str, lang: str) -> Path:
    """Where one task/split/language file lives under `root`."""
    _check_names(task, split)
    return Path(root).expanduser() / task / split / f"{file_name(task, lang)}.jsonl"


def lang_of(task: str, stem: str) -> str | None:
    """Language of a file stem; None for translation files that are not English-to-X."""
    if task != "translation":
        return stem
    return stem[len(TRANSLATION_PREFIX) :] if stem.startswith(TRANSLATION_PREFIX) else None


def data_files(root: str | Path | None) -> list[tuple[str, str, str, Path]]:
    """Every readable file as (task, split, file stem, path), in a stable order."""
    base = resolve_root(root)
    found = []
    for task in TASKS:
        for split in SPLITS:
            for path in sorted((base / task / split).glob("*.jsonl")):
                if lang_of(task, path.stem) is not None:
                    found.append((task, split, path.stem, path))
    return found


def file_problem(path: Path) -> str | None:
    """What makes a data file unreadable, found before training (the reader would find it
    only when it reaches the file, after training for a test file): not a file (a folder,
    a dangling link), or a line that is not UTF-8. None if it reads."""
    if not path.is_file():
        what = "a dangling link" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
        return f"{path}: {what}, not a data file; put the jsonl file there"
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"{path}:{line}: not UTF-8 (byte {data[err.start]:#04x}); re-encode the file as UTF-8"
    return None


def available(root: str | Path | None) -> dict[str, dict[str, list[str]]]:
    """{task: {split: sorted languages}} of the files under `root`."""
    out: dict[str, dict[str, list[str]]] = {}
    for task, split, stem, _ in data_files(root):
        out.setdefault(task, {}).setdefault(split, []).append(lang_of(task, stem))
    return {t: {s: sorted(langs) for s, langs in splits.items()} for t, splits in out.items()}


def _missing_file_error(root: Path, task: str, split: str, path: Path) -> DataError:
    langs = available(root).get(task, {}).get(split, [])
    if langs:
        return UsageError(f"No such data file: {path}. {task}/{split} has: {', '.join(langs)}.")
    return UsageError(f"No such data file: {path}; {root} has no {task}/{split} files. {GET_DATA}")


def _string(obj: dict, key: str) -> str:
    value = obj.get(key)
    if value is None:
        raise _BadLine(f"missing field {key!r}")
    if not isinstance(value, str):
        raise _BadLine(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _is_boundary(data: bytes, offset: int) -> bool:
    """UTF-8 character boundary: not inside a multi-byte character."""
    return offset == len(data) or (data[offset] & 0xC0) != 0x80


def _span(data: bytes, span: object, index: int) -> tuple[str, str]:
    """(label, entity) of one checked span."""
    if not isinstance(span, dict):
        raise _BadLine(f"spans[{index}] must be an object")
    start, limit, label = span.get("start_byte"), span.get("limit_byte"), span.get("label")
    for key, value in (("start_byte", start), ("limit_byte", limit)):
        if type(value) is not int:
            raise _BadLine(f"spans[{index}].{key} must be an integer, got {value!r}")
    if not 0 <= start < limit <= len(data):
        raise _BadLine(f"spans[{index}] bytes [{start}, {limit}) out of range for a text of {len(data)} UTF-8 bytes")
    for key, value in (("start_byte", start), ("limit_byte", limit)):
        if not _is_boundary(data, value):
            raise _BadLine(f"spans[{index}].{key}={value} is inside a UTF-8 character")
    if label not in NER_LABELS:
        raise _BadLine(f"spans[{index}].label must be one of {', '.join(NER_LABELS)}, got {label!r}")
    return label, data[start:limit].decode("utf-8")


def _ner_target(text: str, spans: object) -> str:
    if not isinstance(spans, list):
        raise _BadLine("field 'spans' must be a list")
    data = text.encode("utf-8")
    pairs = [_span(data, span, i) for i, span in enumerate(spans)]
    return " $$ ".join(f"{label}: {entity}" for label, entity in pairs)


def ner_target(text: str, spans: list[dict]) -> str:
    """The official NER target ("LABEL: entity $$ ...", span order) from byte-offset spans."""
    try:
        return _ner_target(text, spans)
    except _BadLine as err:
        raise DataError(f"Bad NER spans: {err}.") from None


def _example(obj: object, task: str, lang: str, fallback_id: str) -> Example:
    if not isinstance(obj, dict):
        raise _BadLine(f"expected a JSON object, got {type(obj).__name__}")
    inputs = {key: _string(obj, key) for key in INPUT_FIELDS[task]}
    if task == "ner":
        if "spans" not in obj:
            raise _BadLine("missing field 'spans'")
        target = _ner_target(inputs["text"], obj["spans"])  # the spans are the annotation
        if "target" in obj and _string(obj, "target") != target:
            raise _BadLine(f"field 'target' {obj['target'][:80]!r} does not match its spans ({target[:80]!r})")
    else:
        target = _string(obj, "target")
    raw_id = obj.get("example_id", obj.get("id"))
    return Example(task, lang, fallback_id if raw_id is None else str(raw_id), inputs, target)


def iter_file(
    path: Path,
    task: str,
    lang: str,
    limit: int | None = None,
    on_error: Callable[[DataError], None] | None = None,
) -> Iterator[Example]:
    """Examples of one file; bad lines raise, or go to `on_error` and are skipped."""
    count = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            try:
                yield _example(json.loads(line), task, lang, f"{path.name}:{number}")
            except (_BadLine, ValueError, RecursionError) as err:  # ValueError: bad JSON or UTF-8
                reason = "JSON nested too deeply" if isinstance(err, RecursionError) else err
                error = DataError(f"{path}:{number}: {reason}. {FIX_FILE}")
                if on_error is None:
                    raise error from None
                on_error(error)
                continue
            count += 1


def iter_dataset(root: str | Path | None, task: str, split: str, lang: str, limit: int | None = None) -> Iterator[Example]:
    """Lazily read one task/split/language file (root: a data root; None: FLIX_DATA_ROOT)."""
    return iter_resolved(resolve_root(root), task, split, lang, limit)


def iter_resolved(root: Path, task: str, split: str, lang: str, limit: int | None = None) -> Iterator[Example]:
    """iter_dataset under a root resolve_root already returned (a run resolves it once)."""
    path = dataset_path(root, task, split, lang)
    if not path.is_file():
        raise _missing_file_error(root, task, split, path)
    return iter_file(path, task, lang, limit)


def read_dataset(root: str | Path | None, task: str, split: str, lang: str, limit: int | None = None) -> list[Example]:
    """All (or the first `limit`) examples of one task/split/language file."""
    return list(iter_dataset(root, task, split, lang, limit))
