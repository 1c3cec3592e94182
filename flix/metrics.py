"""XTREME-UP's official metrics, on a 0-100 scale, and the `flix score` command.

The numbers must equal those of XTREME-UP's own scorer (google-research/xtreme-up,
`evaluation/metrics.py`) so that ours compare with the paper's and the published
baselines; where that scorer has a quirk (smoothing, empty answers) we keep it.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from statistics import fmean

Metric = Callable[[Sequence[str], Sequence[str]], float]

SPAN_DELIMITER = " $$ "  # NER targets read "PER: Ada $$ LOC: Lagos"
SMOOTHING = 1e-13  # the official span F1 adds it to every denominator
PUNCTUATION = frozenset(string.punctuation)  # ASCII only, as in the SQuAD script
ARTICLES = re.compile(r"\b(a|an|the)\b")


def _spans(sequence: str) -> Counter[tuple[str, str]]:
    """The multiset of (label, entity) in a NER string; items need exactly one ':' to count."""
    items = (item.split(":") for item in sequence.split(SPAN_DELIMITER))
    return Counter((parts[0].strip(), parts[1].strip()) for parts in items if len(parts) == 2)


def span_f1(targets: Sequence[str], predictions: Sequence[str]) -> float:
    """NER: micro F1 over spans, a gold span matching at most one predicted copy of it."""
    tp = fp = fn = 0
    for target, prediction in zip(targets, predictions, strict=True):
        gold, pred = _spans(target), _spans(prediction)
        hits = (gold & pred).total()
        tp, fp, fn = tp + hits, fp + pred.total() - hits, fn + gold.total() - hits
    # The smoothing makes "no spans anywhere" score 0 instead of dividing by zero.
    precision = tp / (tp + fp + SMOOTHING)
    recall = tp / (tp + fn + SMOOTHING)
    return 100 * (2.0 * ((precision * recall) / (precision + recall + SMOOTHING)))


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, then the articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def _token_f1(target: str, prediction: str) -> float:
    """Token-overlap F1; 0 without overlap, so two empty answers score 0 too, as officially."""
    gold, pred = target.split(), prediction.split()
    same = (Counter(gold) & Counter(pred)).total()
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_f1(targets: Sequence[str], predictions: Sequence[str]) -> float:
    """QA: mean SQuAD token F1 of the normalised answers."""
    pairs = zip(targets, predictions, strict=True)
    return 100 * fmean(_token_f1(normalize_answer(t), normalize_answer(p)) for t, p in pairs)


def sequence_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> float:
    """Semantic parsing: exact match, whitespace included (the official code strips nothing)."""
    return 100 * fmean(t == p for t, p in zip(targets, predictions, strict=True))


def chrf(targets: Sequence[str], predictions: Sequence[str]) -> float:
    """Translation: sacrebleu's corpus chrF with its defaults, one reference per sentence."""
    import sacrebleu  # only translation needs it

    return sacrebleu.corpus_chrf(list(predictions), [list(targets)]).score


METRICS: dict[str, Metric] = {
    "span_f1": span_f1,
    "f1": squad_f1,
    "sequence_accuracy": sequence_accuracy,
    "chrf": chrf,
}
TASK_METRIC = {
    "ner": "span_f1",
    "qa_in_lang": "f1",
    "qa_cross_lang": "f1",
    "semantic_parsing": "sequence_accuracy",
    "translation": "chrf",
}


def score(task: str, targets: Sequence[str], predictions: Sequence[str], metric: str | None = None) -> float:
    """Score one dataset with its task's official metric, or with `metric` if given."""
    if task not in TASK_METRIC:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASK_METRIC)}")
    metric = metric or TASK_METRIC[task]
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions: they must pair up 1:1")
    if not targets:
        raise ValueError("no examples to score")
    return float(METRICS[metric](targets, predictions))


# --- per-example statistics: what bootstrap intervals resample ----------------------------
#
# Every metric here is a function of a sum over examples: span F1 of (tp, fp, fn) counts,
# QA F1 and sequence accuracy of (value, 1), chrF of sacrebleu's character n-gram counts.
# So a test set is summarised by one row of numbers per example, any resample of the
# examples by the sum of its rows, and `score_from_stats` gives exactly `score` on it.


def example_stats(task: str, targets: Sequence[str], predictions: Sequence[str]) -> list[list[float]]:
    """One row of additive statistics per example, for the task's official metric."""
    metric = TASK_METRIC[task]
    pairs = list(zip(targets, predictions, strict=True))
    if metric == "span_f1":
        rows = []
        for target, prediction in pairs:
            gold, pred = _spans(target), _spans(prediction)
            hits = (gold & pred).total()
            rows.append([hits, pred.total() - hits, gold.total() - hits])
        return rows
    if metric == "f1":
        return [[_token_f1(normalize_answer(t), normalize_answer(p)), 1] for t, p in pairs]
    if metric == "sequence_accuracy":
        return [[float(t == p), 1] for t, p in pairs]
    return [list(row) for row in _chrf_metric()._extract_corpus_statistics([p for _, p in pairs], [[t for t, _ in pairs]])]


def score_from_stats(task: str, totals: Sequence[float]) -> float:
    """The task's official score from statistics summed over (a resample of) examples."""
    metric = TASK_METRIC[task]
    if metric == "span_f1":
        tp, fp, fn = totals
        precision, recall = tp / (tp + fp + SMOOTHING), tp / (tp + fn + SMOOTHING)
        return 100 * (2.0 * ((precision * recall) / (precision + recall + SMOOTHING)))
    if metric in ("f1", "sequence_accuracy"):
        value, count = totals
        return 100 * value / count
    return _chrf_metric()._compute_score_from_stats([int(round(x)) for x in totals]).score


def _chrf_metric():
    from sacrebleu.metrics import CHRF

    return CHRF()


def average(scores: Mapping[str, float]) -> float:
    """Unweighted mean over languages (or tasks), as the paper reports; never a silent NaN."""
    if not scores:
        raise ValueError("nothing to average: no scores given")
    missing = [name for name, value in scores.items() if math.isnan(value)]
    if missing:
        raise ValueError(f"NaN score for {', '.join(missing)}: rescore them before averaging")
    return fmean(scores.values())


class BadInput(ValueError):
    """A predictions file the scorer cannot read; the message says where and what to do."""


def read_pairs(path: Path) -> tuple[list[str], list[str]]:
    """Targets and predictions of a JSONL file of {"target": str, "prediction": str} lines."""
    fix = 'make each line a JSON object {"target": "...", "prediction": "..."} of strings'
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror}); check the path") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data[:4096]:  # UTF-32 too
        raise BadInput(f"{path}: UTF-16 or UTF-32 text (a byte-order mark or NUL bytes), not UTF-8; save the file as UTF-8")
    lines = data.splitlines()
    targets, predictions = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():  # blank lines are skipped, as by the official reader
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where}: bad JSON ({e.msg}, column {e.colno}); {fix}") from None
        except UnicodeDecodeError:
            raise BadInput(f"{where}: not UTF-8 text; save the file as UTF-8") from None
        except RecursionError:
            raise BadInput(f"{where}: JSON nested too deeply; {fix}") from None
        if not isinstance(row, dict):
            raise BadInput(f"{where}: a JSON {type(row).__name__}, not an object; {fix}")
        for key in ("target", "prediction"):
            if key not in row:
                raise BadInput(f"{where}: no {key!r} key; {fix}")
            if not isinstance(row[key], str):
                raise BadInput(f"{where}: {key!r} is {type(row[key]).__name__}; {fix}")
        targets.append(row["target"])
        predictions.append(row["prediction"])
    if not targets:
        raise BadInput(f"{path}: no lines to score; {fix}")
    return targets, predictions


def main(argv: list[str] | None = None) -> int:
    """`flix score --task TASK FILE.jsonl`: print a summary, then a JSON line for scripts."""
    parser = argparse.ArgumentParser(prog="flix score", description="Score predictions with XTREME-UP's official metrics.")
    parser.add_argument("file", type=Path, help='JSONL of {"target": ..., "prediction": ...}')
    parser.add_argument("--task", required=True, choices=TASK_METRIC, help="sets the metric")
    parser.add_argument("--metric", choices=METRICS, help="override the task's metric")
    args = parser.parse_args(argv)
    try:
        targets, predictions = read_pairs(args.file)
    except BadInput as e:
        print(f"flix score: {e}", file=sys.stderr)
        return 2
    metric = args.metric or TASK_METRIC[args.task]
    if metric == "span_f1":  # a target with no "LABEL: entity" item holds no span: it scores nothing
        unparsed = sum(1 for t in targets if t.strip() and not _spans(t))
        expected = f'the NER format "LABEL: entity{SPAN_DELIMITER}LABEL: entity", e.g. "PER: Ada{SPAN_DELIMITER}LOC: Lagos"'
        if not any(_spans(t) for t in targets):
            print(f"flix score: {args.file}: no target holds a span in {expected}; span F1 would be 0.00 whatever the predictions", file=sys.stderr)
            return 2
        if unparsed:
            print(f"flix score: warning: {unparsed} of {len(targets)} targets in {args.file} hold no span in {expected}", file=sys.stderr)
    value = score(args.task, targets, predictions, metric)
    print(f"{args.task} {metric} = {value:.2f} over {len(targets)} pairs in {args.file}")
    n, file = len(targets), str(args.file)
    print(json.dumps({"metric": metric, "score": value, "task": args.task, "n": n, "file": file}))
    return 0
