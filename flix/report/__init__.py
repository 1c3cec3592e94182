"""The report stage: paper Tables 1-5, per-language appendices and Figure 2 from finished runs."""

from flix.report.render import ReportError, render
from flix.report.wandb_log import log_to_wandb

__all__ = ["ReportError", "log_to_wandb", "render"]
