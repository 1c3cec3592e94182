"""The report stage: paper Tables 1-5, per-language appendices and Figure 2 from finished
runs (`flix.report.render.render`; `flix report` is flix.report.cli)."""
