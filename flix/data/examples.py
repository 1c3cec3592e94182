"""The one example type that flows from the reader to the model."""

from __future__ import annotations

from dataclasses import dataclass, field

# XTREME-UP tasks this project uses, in the order the paper's tables list them.
TASKS = ("ner", "semantic_parsing", "qa_in_lang", "qa_cross_lang", "translation")


@dataclass(frozen=True)
class Example:
    """One XTREME-UP example.

    task:   one of TASKS.
    lang:   language code; for translation the target language (`en2sw` -> `sw`).
    id:     the example's id in its file (or `file:line` when the file has none).
    inputs: the task's input fields (`text`; `question`/`title`/`context`; `input`).
    target: the reference output string.
    """

    task: str
    lang: str
    id: str
    inputs: dict = field(hash=False, compare=True)
    target: str = ""

    @property
    def dataset(self) -> tuple[str, str]:
        return (self.task, self.lang)

    @property
    def features(self) -> dict[str, str]:
        """The FLix features of this example."""
        return {"task": self.task, "lang": self.lang}
