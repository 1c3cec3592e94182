"""What a run records, in one place: results.json (a finished run) and failed.json (a
failed one), both carrying the resolved config the report identifies runs by. The
pipeline writes them with the builders of `flix.record.write`; the report and the study
read them only through `flix.record.read` (`RunRecord`), never by key. This package
imports neither torch nor conf/.

results.json keys: the run's identity (method, mixture, study, scale, seed, model,
data_root (the data folder's name), variant), `eval_sets` ({name: task, langs,
zero_shot, and the validation, test, validation_nll, test_nll averages}), `validation`
and `test` ({task: {lang: score}}, the paper's metric) and `validation_nll` and
`test_nll` ({task: {lang: mean target NLL}}) of the kept checkpoint; per test example,
in the same order: `test_ids`, `test_stats` (`flix.metrics.example_stats`) and
`test_example_nll`; `selection` (what picked the checkpoint: `by` and the validation
`sets`), best_step, best_validation_average, best_validation_nll, history,
train_loss, featureless_fraction, trainable_parameters, flix (the FLixConfig),
train_seconds, time_seconds, commit, versions, config_hash and config (data.root as the
folder's name: records carry no machine's paths). failed.json: error, traceback, config.
"""

from flix.record.check import check_results
from flix.record.cli import main
from flix.record.copy import RECORD, copy_records
from flix.record.read import READ_ERRORS, Adapters, RunRecord, SetRecord, Training, identity, is_flix_results, read_failure, read_results
from flix.record.setting import UNHASHED, decisive, setting
from flix.record.write import (
    CODE_COMMIT,
    EXAMPLE_KEYS,
    FAILED,
    RESULTS,
    SCORE_KEYS,
    SELECT_BY,
    SPLITS,
    body,
    eval_set_entries,
    example_entries,
    git_commit,
    head,
    merge_datasets,
    per_language_table,
    portable,
    selection_entry,
    selection_key,
    selection_metric,
    set_averages,
    split_tables,
    summary_line,
    summary_metrics,
    tail,
    write_failure,
    write_results,
)

__all__ = [
    "CODE_COMMIT",
    "EXAMPLE_KEYS",
    "FAILED",
    "READ_ERRORS",
    "RECORD",
    "RESULTS",
    "SCORE_KEYS",
    "SELECT_BY",
    "SPLITS",
    "UNHASHED",
    "Adapters",
    "RunRecord",
    "SetRecord",
    "Training",
    "body",
    "check_results",
    "copy_records",
    "decisive",
    "eval_set_entries",
    "example_entries",
    "git_commit",
    "head",
    "identity",
    "is_flix_results",
    "main",
    "merge_datasets",
    "per_language_table",
    "portable",
    "read_failure",
    "read_results",
    "selection_entry",
    "selection_key",
    "selection_metric",
    "set_averages",
    "setting",
    "split_tables",
    "summary_line",
    "summary_metrics",
    "tail",
    "write_failure",
    "write_results",
]
