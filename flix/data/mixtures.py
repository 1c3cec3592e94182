"""Data mixtures: which (task, language) datasets a run trains on and is scored on.

A mixture file `conf/mixture/NAME.yaml` holds two variants of the same experiment:
`official` (the paper's Appendix B lists, for the official XTREME-UP release) and
`mini` (the documented counterpart on `xtreme_up_mini`); flix.data.mixture_files reads
them. Every Mixture is validated, so a held-out language can never leak into training
unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from flix.data import reader
from flix.data.examples import TASKS

KINDS = ("multitask", "multilingual", "joint")
VARIANTS = ("official", "mini")
ZERO_SHOT = ("unseen_combination", "unseen_language")
EVAL_SPLITS = ("validation", "test")


class MixtureError(ValueError):
    """A mixture config that is malformed or breaks a zero-shot guarantee."""


@dataclass(frozen=True)
class EvalSet:
    """One scored column: a task over some languages, optionally zero-shot."""

    name: str
    task: str
    langs: list[str]
    zero_shot: str | None = None


@dataclass(frozen=True)
class Mixture:
    """A resolved mixture variant: training datasets and evaluation sets."""

    name: str
    kind: str
    variant: str
    train: dict[str, list[str]]
    eval_sets: list[EvalSet]
    notes: str = ""

    @property
    def source(self) -> str:
        """Where this mixture comes from, for error messages."""
        return f"conf/mixture/{self.name}.yaml ({self.variant})"

    @property
    def train_datasets(self) -> list[tuple[str, str]]:
        return [(task, lang) for task, langs in self.train.items() for lang in langs]

    @property
    def tasks(self) -> list[str]:
        """Training tasks, in the paper's table order."""
        return [task for task in TASKS if task in self.train]

    @property
    def languages(self) -> list[str]:
        """Training languages, sorted (a stable order for feature parameters)."""
        return sorted({lang for langs in self.train.values() for lang in langs})

    def features(self) -> dict[str, list[str]]:
        """FLix feature vocabulary: only what training sees (unseen languages get none)."""
        return {"task": self.tasks, "lang": self.languages}

    @property
    def eval_datasets(self) -> list[tuple[str, str]]:
        """Unique (task, lang) pairs over all evaluation sets, first occurrence first."""
        pairs = [(s.task, lang) for s in self.eval_sets for lang in s.langs]
        return list(dict.fromkeys(pairs))

    @property
    def selection_sets(self) -> list[EvalSet]:
        """The validation sets whose average picks the kept checkpoint: the supervised
        evaluation sets. A mixture scored only zero-shot selects on the trained languages
        of its zero-shot tasks, never on the held-out labels it reports."""
        supervised = [s for s in self.eval_sets if not s.zero_shot]
        if supervised:
            return supervised
        tasks = [task for task in dict.fromkeys(s.task for s in self.eval_sets) if self.train.get(task)]
        if not tasks:
            raise MixtureError(
                f"{self.source}: every evaluation set is zero-shot and none of their tasks is trained: nothing to select a checkpoint on."
            )
        return [EvalSet(f"{task}_selection", task, list(self.train[task])) for task in tasks]

    @property
    def validation_datasets(self) -> list[tuple[str, str]]:
        """(task, lang) validated at every validation step: the evaluation sets' and the selection sets'."""
        pairs = self.eval_datasets + [(s.task, lang) for s in self.selection_sets for lang in s.langs]
        return list(dict.fromkeys(pairs))

    def required_files(self) -> list[tuple[str, str, str]]:
        """(task, split, lang) of every file a run reads: train splits, then eval splits."""
        needed = [(task, "train", lang) for task, lang in self.train_datasets]
        needed += [(t, "validation", lang) for t, lang in self.validation_datasets]
        needed += [(t, "test", lang) for t, lang in self.eval_datasets]
        return needed

    def check(self, root: str | Path | None) -> None:
        """Fail before training if any file is missing, listing all of them and what exists,
        or cannot be read (a folder or a dangling link in its place, a line not UTF-8)."""
        base = reader.resolve_root(root)
        have = reader.available(base)
        missing = [(task, split, lang) for task, split, lang in self.required_files() if lang not in have.get(task, {}).get(split, [])]
        if missing:
            raise reader.DataError(_missing_message(self, base, missing, have))
        paths = dict.fromkeys(reader.dataset_path(base, *needed) for needed in self.required_files())
        if problems := [p for path in paths if (p := reader.file_problem(path))]:
            raise reader.DataError("Data files that cannot be read:\n  " + "\n  ".join(problems))

    def restrict(self, max_langs_per_task: int) -> Mixture:
        """A smaller mixture (first n languages per task and per eval set), still valid.

        Zero-shot sets stay non-empty and zero-shot: a kept unseen combination whose
        other training tasks were all cut is pinned back into one of them (languages only
        ever come back to tasks that trained them, never to the task they are held out of).
        """
        if max_langs_per_task < 1:
            raise MixtureError(f"{self.source}: restrict needs max_langs_per_task >= 1.")
        n = max_langs_per_task
        train = {task: langs[:n] for task, langs in self.train.items()}
        eval_sets = [_restrict_eval(s, n, self.train, train) for s in self.eval_sets]
        notes = f"{self.notes} Restricted to the first {n} languages per task.".strip()
        restricted = replace(self, train=train, eval_sets=eval_sets, notes=notes)
        validate(restricted)
        return restricted

    def per_dataset(self) -> list[Mixture]:
        """One mixture per evaluated training dataset (the `single` baselines), named
        NAME/TASK.LANG, each scored on its own dataset only."""
        evaluated = {(s.task, lang) for s in self.eval_sets if not s.zero_shot for lang in s.langs}
        return [
            replace(self, name=f"{self.name}/{task}.{lang}", kind="multilingual", train={task: [lang]}, eval_sets=[EvalSet(task, task, [lang])])
            for task, lang in self.train_datasets
            if (task, lang) in evaluated
        ]

    def summary(self) -> str:
        """Human-readable description for logs."""
        lines = [
            f"mixture {self.name} [{self.variant}] kind={self.kind}",
            f"  train: {len(self.train_datasets)} datasets",
        ]
        lines += [f"    {task}: {' '.join(self.train[task])}" for task in self.tasks]
        lines.append(f"  eval: {len(self.eval_sets)} sets")
        for s in self.eval_sets:
            tag = f" [{s.zero_shot}]" if s.zero_shot else ""
            lines.append(f"    {s.name} ({s.task}){tag}: {' '.join(s.langs)}")
        if self.notes:
            lines.append(f"  notes: {self.notes}")
        return "\n".join(lines)


def _missing_message(mixture: Mixture, root: Path, missing: list[tuple[str, str, str]], have: dict) -> str:
    lines = [f"Mixture {mixture.source} needs {len(missing)} file(s) missing under {root}:"]
    lines += [f"  {reader.dataset_path(root, t, s, lang)}" for t, s, lang in missing]
    lines.append("Available for those tasks:")
    for task in dict.fromkeys(t for t, _, _ in missing):
        splits = have.get(task, {})
        listed = "; ".join(f"{s}: {' '.join(splits[s])}" for s in reader.SPLITS if s in splits)
        lines.append(f"  {task}: {listed or 'nothing'}")
    lines.append("Use the variant that matches the data (official or mini), or fix the mixture file.")
    return "\n".join(lines)


def _pinned_task(lang: str, task: str, original: dict) -> str:
    """First other task that trained `lang` originally (validation guarantees one)."""
    return next(t for t, langs in original.items() if t != task and lang in langs)


def _restrict_eval(s: EvalSet, n: int, original: dict, train: dict) -> EvalSet:
    """Restrict one eval set against the (already cut) training dict, mutating it to pin."""
    if s.zero_shot == "unseen_language":
        return replace(s, langs=s.langs[:n])
    if s.zero_shot == "unseen_combination":
        seen = {lang for t, langs in train.items() if t != s.task for lang in langs}
        kept = [lang for lang in s.langs if lang in seen][:n]
        if not kept:
            lang = s.langs[0]
            train[_pinned_task(lang, s.task, original)].append(lang)
            kept = [lang]
        return replace(s, langs=kept)
    kept = [lang for lang in s.langs if lang in train[s.task]][:n]
    if not kept:
        train[s.task].append(s.langs[0])
        kept = [s.langs[0]]
    return replace(s, langs=kept)


def validate(mixture: Mixture) -> None:
    """Check names, kinds and the zero-shot guarantees; errors name the file and key."""
    where = mixture.source
    if mixture.kind not in KINDS:
        raise MixtureError(f"{where}: unknown kind {mixture.kind!r}; kinds are: {', '.join(KINDS)}.")
    if not mixture.train:
        raise MixtureError(f"{where}: `train` is empty.")
    for task, langs in mixture.train.items():
        _check_langs(f"{where}: train.{task}", task, langs)
    names = [s.name for s in mixture.eval_sets]
    if len(set(names)) != len(names):
        raise MixtureError(f"{where}: eval set names repeat: {names}.")
    for i, s in enumerate(mixture.eval_sets):
        _check_eval(mixture, s, f"{where}: eval[{i}] ({s.name})")


def _check_langs(key: str, task: str, langs: list) -> None:
    if task not in TASKS:
        raise MixtureError(f"{key}: unknown task {task!r}; tasks are: {', '.join(TASKS)}.")
    if not langs:
        raise MixtureError(f"{key}: no languages.")
    bad = [lang for lang in langs if not isinstance(lang, str) or not lang]
    if bad:
        raise MixtureError(f"{key}: language codes must be non-empty strings, got {bad}.")
    if len(set(langs)) != len(langs):
        raise MixtureError(f"{key}: languages repeat: {langs}.")


def _check_eval(mixture: Mixture, s: EvalSet, key: str) -> None:
    _check_langs(key, s.task, s.langs)
    trained = set(mixture.train.get(s.task, []))
    elsewhere = {lang for t, langs in mixture.train.items() if t != s.task for lang in langs}
    if s.zero_shot is None:
        unseen = [lang for lang in s.langs if lang not in trained]
        if unseen:
            raise MixtureError(
                f"{key}: {s.task} is not trained on {unseen}; mark the set zero_shot ({' or '.join(ZERO_SHOT)}) or add them to train.{s.task}."
            )
    elif s.zero_shot == "unseen_language":
        leaked = [lang for lang in s.langs if lang in trained | elsewhere]
        if leaked:
            raise MixtureError(
                f"{key}: unseen_language languages {leaked} appear in training; remove them from every train task or make the set unseen_combination."
            )
    elif s.zero_shot == "unseen_combination":
        leaked = [lang for lang in s.langs if lang in trained]
        if leaked:
            raise MixtureError(f"{key}: unseen_combination languages {leaked} are in train.{s.task}; hold them out of that task.")
        orphans = [lang for lang in s.langs if lang not in elsewhere]
        if orphans:
            raise MixtureError(
                f"{key}: unseen_combination languages {orphans} are in no other train task, "
                "so their language feature is untrained; use zero_shot: unseen_language."
            )
    else:
        raise MixtureError(f"{key}: zero_shot must be one of {', '.join(ZERO_SHOT)} (or absent), got {s.zero_shot!r}.")
