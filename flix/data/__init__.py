"""XTREME-UP data: reading, mixtures, prompt formatting, batching."""

from flix.data.examples import TASKS, Example

__all__ = ["TASKS", "Example"]
