"""Instruction-style prompts that carry the task and the language in words.

Paper §4: inputs are formatted with the task and language information. Every prompt
starts with `Task: <task> in <language>.`, then the input in XTREME-UP's own layout,
then an answer cue (`Entities:`, `Parse:`, `Answer:`, `<language>:`), so the target is
the model's continuation. Prompts are pure functions of the example.
"""

from __future__ import annotations

from flix.data.examples import Example

# Every language / locale code of the paper's Appendix B and of xtreme_up_mini.
LANGUAGE_NAMES: dict[str, str] = {
    "am": "Amharic",
    "ar": "Arabic",
    "as": "Assamese",
    "bbj": "Ghomala",
    "be": "Belarusian",
    "bho": "Bhojpuri",
    "bm": "Bambara",
    "bn": "Bengali",
    "brx": "Bodo",
    "de": "German",
    "de_localized": "German (localized)",
    "ee": "Ewe",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "gbm": "Garhwali",
    "gom": "Konkani",
    "gu": "Gujarati",
    "ha": "Hausa",
    "hi": "Hindi",
    "hne": "Chhattisgarhi",
    "hu": "Hungarian",
    "id": "Indonesian",
    "ig": "Igbo",
    "ja": "Japanese",
    "kn": "Kannada",
    "ko": "Korean",
    "lg": "Luganda",
    "luo": "Luo",
    "mai": "Maithili",
    "ml": "Malayalam",
    "mni": "Manipuri",
    "mos": "Mossi",
    "mr": "Marathi",
    "mwr": "Marwari",
    "ny": "Chichewa",
    "or": "Odia",
    "pa": "Punjabi",
    "pcm": "Nigerian Pidgin",
    "ps": "Pashto",
    "pt_br": "Brazilian Portuguese",
    "ru": "Russian",
    "rw": "Kinyarwanda",
    "sa": "Sanskrit",
    "sn": "Shona",
    "sw": "Swahili",
    "ta": "Tamil",
    "te": "Telugu",
    "th": "Thai",
    "tn": "Setswana",
    "tr": "Turkish",
    "tw": "Twi",
    "ur": "Urdu",
    "wo": "Wolof",
    "xh": "Xhosa",
    "yo": "Yoruba",
    "zu": "Zulu",
}

TASK_NAMES: dict[str, str] = {
    "ner": "named entity recognition",
    "semantic_parsing": "semantic parsing",
    "qa_in_lang": "in-language question answering",
    "qa_cross_lang": "cross-lingual question answering",
    "translation": "machine translation",
}

# Default generation limits (new tokens) per task; the config may override them.
# From the mini data's training targets (characters, 99th percentile): NER 141,
# semantic parsing 151 (bracket-heavy, many tokens), QA spans 140-205 (median 11-13),
# translation 304. Limits cover ~99% at ~2.5-3 characters per token.
TARGET_MAX_TOKENS: dict[str, int] = {
    "ner": 64,
    "semantic_parsing": 96,
    "qa_in_lang": 32,
    "qa_cross_lang": 32,
    "translation": 128,
}

_INSTRUCTIONS = {
    "ner": 'List the entities as "TYPE: entity" joined by " $$ " (PER, ORG, LOC, DATE); leave it empty if there are none.',
    "semantic_parsing": "Write the MTOP logical form of the utterance.",
    "qa_in_lang": "Answer with a span copied from the context.",
    "qa_cross_lang": "The question is in {lang}, the context in English; answer with an English span copied from the context.",
}


def language_name(code: str) -> str:
    """English name of a language code; the code itself if unknown (official extras)."""
    return LANGUAGE_NAMES.get(code, code)


def truncate_context(context: str, answer: str, max_chars: int | None, train: bool) -> str:
    """Cut a long QA context to `max_chars`.

    Training keeps a window around the answer (when the context contains it), so the
    target stays answerable; evaluation keeps the head, since it must not peek at answers.
    """
    if max_chars is None or len(context) <= max_chars:
        return context
    start = _answer_start(context, answer) if train else -1
    if start < 0:
        return context[:max_chars]
    centre = start + len(answer) // 2
    begin = min(max(0, centre - max_chars // 2), len(context) - max_chars)
    return context[begin : begin + max_chars]


def _answer_start(context: str, answer: str) -> int:
    """Offset of the answer in the context (case-insensitive fallback), or -1."""
    if not answer:
        return -1
    start = context.find(answer)
    return start if start >= 0 else context.lower().find(answer.lower())


def _header(example: Example) -> str:
    lang = language_name(example.lang)
    if example.task == "translation":
        return f"Task: {TASK_NAMES['translation']}. Translate from English to {lang}."
    instruction = _INSTRUCTIONS[example.task].format(lang=lang)
    return f"Task: {TASK_NAMES[example.task]} in {lang}. {instruction}"


def _body(example: Example, max_context_chars: int | None, train: bool) -> str:
    inputs, task = example.inputs, example.task
    if task == "ner":
        return f"Text: {inputs['text']}\nEntities:"
    if task == "semantic_parsing":
        return f"Utterance: {inputs['input']}\nParse:"
    if task == "translation":
        return f"English: {inputs['input']}\n{language_name(example.lang)}:"
    context = truncate_context(inputs["context"], example.target, max_context_chars, train)
    return f"question: {inputs['question']} title: {inputs['title']} context: {context}\nAnswer:"


def format_prompt(example: Example, max_context_chars: int | None = None, train: bool = False) -> str:
    """The model input for one example: task and language in words, input, answer cue."""
    if example.task not in TASK_NAMES:
        raise ValueError(f"No prompt format for task {example.task!r}; tasks: {', '.join(TASK_NAMES)}.")
    return f"{_header(example)}\n{_body(example, max_context_chars, train)}"
