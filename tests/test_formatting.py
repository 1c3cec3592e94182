"""Prompts name the task and language; QA truncation keeps the answer in training."""

from __future__ import annotations

import pytest

from flix.data import reader
from flix.data.examples import TASKS, Example
from flix.data.formatting import (
    LANGUAGE_NAMES,
    TARGET_MAX_TOKENS,
    TASK_NAMES,
    format_prompt,
    truncate_context,
)
from flix.data.mixture_files import load_mixture_by_name, mixture_names
from flix.data.mixtures import VARIANTS

CUES = {
    "ner": "\nEntities:",
    "semantic_parsing": "\nParse:",
    "qa_in_lang": "\nAnswer:",
    "qa_cross_lang": "\nAnswer:",
    "translation": "\nSwahili:",
}
LANGS = {
    "ner": "sw",
    "semantic_parsing": "de",
    "qa_in_lang": "sw",
    "qa_cross_lang": "ja",
    "translation": "sw",
}


@pytest.mark.parametrize("task", TASKS)
def test_prompt_names_task_and_language(task, data_root):
    lang = LANGS[task]
    example = reader.read_dataset(data_root, task, "validation", lang, limit=1)[0]
    prompt = format_prompt(example)
    assert prompt.startswith("Task: ")
    assert TASK_NAMES[task] in prompt and LANGUAGE_NAMES[lang] in prompt
    assert prompt.endswith(CUES[task].replace("Swahili", LANGUAGE_NAMES[lang]))
    assert prompt == format_prompt(example)
    assert example.target not in prompt.split("\n")[0]


def test_translation_says_from_english():
    ex = Example("translation", "sw", "1", {"input": "Good morning."}, "Habari za asubuhi.")
    assert "Translate from English to Swahili" in format_prompt(ex)
    assert format_prompt(ex).endswith("English: Good morning.\nSwahili:")


def test_qa_keeps_xtreme_up_layout():
    ex = Example("qa_in_lang", "sw", "1", {"question": "Q?", "title": "T", "context": "C c"}, "c")
    assert "\nquestion: Q? title: T context: C c\nAnswer:" in format_prompt(ex)


def test_truncate_context():
    context = "a" * 500 + " ANSWER " + "b" * 500
    assert truncate_context(context, "ANSWER", None, train=True) == context
    assert truncate_context("short", "x", 100, train=False) == "short"
    kept = truncate_context(context, "ANSWER", 100, train=True)
    assert len(kept) == 100 and "ANSWER" in kept
    assert truncate_context(context, "ANSWER", 100, train=False) == context[:100]
    assert truncate_context(context, "missing", 100, train=True) == context[:100]
    at_end = "x" * 300 + "END"
    assert truncate_context(at_end, "END", 50, train=True) == at_end[-50:]
    assert "Answer" in truncate_context(context.replace("ANSWER", "Answer"), "ANSWER", 60, train=True)


@pytest.mark.needs_mini  # reads 50 training examples per file
def test_training_truncation_keeps_real_answers(data_root):
    examples = reader.read_dataset(data_root, "qa_in_lang", "train", "fi", limit=50)
    examples += reader.read_dataset(data_root, "qa_cross_lang", "train", "ru", limit=50)
    long = [e for e in examples if len(e.inputs["context"]) > 300 and e.target in e.inputs["context"]]
    assert long
    for e in long:
        train_prompt = format_prompt(e, max_context_chars=300, train=True)
        eval_prompt = format_prompt(e, max_context_chars=300, train=False)
        assert e.target in train_prompt.split(" context: ", 1)[1]
        assert e.inputs["context"][:300] + "\nAnswer:" in eval_prompt


def test_every_language_has_a_name(data_root):
    codes = {lang for splits in reader.available(data_root).values() for s in splits.values() for lang in s}
    for name in mixture_names():
        keys = {"task": "ner", "lang": "sw"} if name == "single" else {}
        for variant in VARIANTS:
            m = load_mixture_by_name(name, variant, **keys)
            codes |= set(m.languages) | {lang for s in m.eval_sets for lang in s.langs}
    assert codes <= set(LANGUAGE_NAMES), codes - set(LANGUAGE_NAMES)


def test_limits_cover_every_task():
    assert set(TARGET_MAX_TOKENS) == set(TASKS) == set(TASK_NAMES)


def test_unknown_task_fails():
    with pytest.raises(ValueError, match="No prompt format"):
        format_prompt(Example("pos", "sw", "1", {"text": "x"}, ""))
