"""The report's words, once: how the paper names methods and task columns.

Tables, Figure 2 and the appendix all label with these; table specs read the paper CSVs'
own headers back through them (case-insensitively: Table 5 writes "Semantic parsing").
"""

from __future__ import annotations

# method (conf/method) -> row label; also the appendix's column order
METHOD_LABELS = {
    "single": "Single",
    "compute_matched": "Compute-matched",
    "param_matched": "Param-matched",
    "flix": "FLix",
    "flix_shared": "FLix + shared parameters",
}
# method -> what it trains: (feature adapters, an always-on adapter), as conf/method/*.yaml
# defines them (tests/test_report.py checks they agree). A run's record says the same for
# itself (flix.record.RunRecord.adapters); this names the paper's methods for cells with
# no run yet, and catches a record relabelled as another method.
TRAINS = {
    "single": (False, True),
    "compute_matched": (False, True),
    "param_matched": (False, True),
    "flix": (True, False),
    "flix_shared": (True, True),
}
# task -> column label
TASK_LABELS = {
    "ner": "NER",
    "semantic_parsing": "Semantic Parsing",
    "qa_in_lang": "QA InLang",
    "qa_cross_lang": "QA CrossLang",
}


def method_of(label: str) -> str:
    return _reverse(METHOD_LABELS, label, "method")


def task_of(label: str) -> str:
    return _reverse(TASK_LABELS, label, "task")


def _reverse(labels: dict[str, str], label: str, what: str) -> str:
    found = [key for key, text in labels.items() if text.casefold() == label.strip().casefold()]
    if not found:
        raise ValueError(f"no {what} is labelled {label!r}; labels are {', '.join(labels.values())} (flix/report/labels.py)")
    return found[0]
