"""Trust, round 3 (issue 24): a killed or damaged kernel build, paths and archive members
that reach outside their folder, weights of the wrong shape, damaged or odd run records in
a study and a report, bad settings, odd score files, and quiet interrupts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flix import kernels
from flix.lock import run_lock

REPO = Path(__file__).resolve().parents[1]
LOAD_KERNEL = "from flix import kernels; assert kernels.kernel() is not None; print('kernel loaded')"


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A copy of this machine's kernel build in its own TORCH_EXTENSIONS_DIR (mtimes kept, so
    it is up to date): its faults touch no other process's cache."""
    module = kernels.kernel()
    assert module is not None, "the CPU kernel should build here (g++ and ninja are in the setup)"
    built = Path(module.__file__).parent
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folder = tmp_path / "ext" / built.name
    shutil.copytree(built, folder)
    (folder / ".lock").unlink(missing_ok=True)
    return folder


def load_kernel_in_child(timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD_KERNEL], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_killed_kernel_build_does_not_block_later_runs(kernel_cache):
    # what a build killed by SIGKILL leaves: torch's marker and our lock file, no live owner
    (kernel_cache / "lock").write_text("")
    (kernel_cache / ".lock").write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00\n")
    done = load_kernel_in_child(timeout=120)  # before the fix: waited forever
    assert done.returncode == 0 and "kernel loaded" in done.stdout, done.stderr


def test_kernel_build_held_too_long_falls_back_with_one_message(kernel_cache, monkeypatch):
    monkeypatch.setattr(kernels, "BUILD_WAIT_S", 0.5)
    kernels.kernel.cache_clear()
    try:
        with run_lock(kernel_cache):  # a live builder that does not finish
            with pytest.warns(RuntimeWarning, match=f"still held by pid {os.getpid()}.*Deleting {kernel_cache}"):
                assert kernels.kernel() is None
    finally:
        kernels.kernel.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_damaged_kernel_library_is_rebuilt(kernel_cache, keep):
    library = kernel_cache / f"{kernel_cache.name}.so"
    data = library.read_bytes()
    library.write_bytes(data[: int(len(data) * keep)])  # a newer mtime: ninja sees it as up to date
    done = load_kernel_in_child()  # before the fix: Bus error (truncated) or "could not be built" (empty)
    assert done.returncode == 0 and "kernel loaded" in done.stdout, done.stderr
    assert "damaged or unfinished; rebuilding" in done.stderr
    assert library.stat().st_size > len(data) // 2
    again = load_kernel_in_child()  # stamped now: loads without a word
    assert again.returncode == 0 and "damaged" not in again.stderr, again.stderr


# -- adapters: exact shapes, a zero padding row; export confined to its output --------------

FEATURES = {"task": ["ner", "qa_in_lang"], "lang": ["sw", "yo"]}
TRAINED = [{"task": "ner", "lang": "sw"}, {"task": "qa_in_lang", "lang": "yo"}]


def saved_adapter(folder: Path, features=FEATURES) -> Path:
    """A tiny adapter with trained-looking B banks and two trained combinations."""
    import torch

    from flix import FLixConfig, get_flix_model
    from flix.base_models import load_model

    model = get_flix_model(load_model({"name": "tiny", "seed": 0})[0], FLixConfig(features=features, ranks={"task": 4, "lang": 2}))
    with torch.no_grad():
        for layer in model.flix_layers().values():
            layer.flix_B.normal_(std=0.2)[0].zero_()
    model.seen = set(map(tuple, model.flix_config.space.feature_ids(TRAINED).tolist()))
    return model.save_pretrained(folder)


def edit_weights(adapter: Path, change) -> str:
    """Rewrite one bank tensor of the adapter's safetensors with change(tensor); its key."""
    from safetensors.torch import load_file, save_file

    from flix.model import WEIGHTS_NAME

    tensors = load_file(str(adapter / WEIGHTS_NAME))
    key = sorted(k for k in tensors if k.endswith("flix_B"))[0]
    tensors[key] = change(tensors[key])
    save_file(tensors, str(adapter / WEIGHTS_NAME))
    return key


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t[1:2].clone(), r"has shape \(1, \d+\), this model needs \(\d+, \d+\)"),  # (1, d) would broadcast
        (lambda t: t[1].clone(), r"has shape \(\d+,\), this model needs"),  # (d,)
        (lambda t: t[1, 0].clone(), r"has shape \(\), this model needs"),  # a scalar
        (lambda t: t.index_fill(0, __import__("torch").tensor([0]), 0.5), "non-zero padding row 0"),
    ],
    ids=["row", "vector", "scalar", "padding"],
)
def test_wrong_weights_are_refused_naming_file_and_tensor(tmp_path, change, message):
    from flix import FLixModel
    from flix.base_models import load_model

    adapter = saved_adapter(tmp_path / "adapter")
    key = edit_weights(adapter, change)
    with pytest.raises(ValueError, match=message) as err:  # before: loaded, broadcast into every row
        FLixModel.from_pretrained(load_model({"name": "tiny"})[0], adapter)
    assert str(adapter / "flix_adapter.safetensors") in str(err.value) and key in str(err.value)


def test_export_writes_nothing_outside_its_output(tmp_path, capsys):
    from flix.pipeline.export_command import main as export_main

    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    traversal = "../../victim"  # from out/, the combination's folder task=ner,lang=../../victim is tmp_path/victim
    adapter = saved_adapter(tmp_path / "adapter", {"task": ["ner"], "lang": ["sw", traversal]})
    config = json.loads((adapter / "flix_config.json").read_text())
    config["trained_combinations"] = [{"task": "ner", "lang": traversal}]
    (adapter / "flix_config.json").write_text(json.dumps(config))
    assert export_main([str(adapter), str(tmp_path / "out" / "x"), "--model", "tiny"]) == 2  # before: replaced victim/
    assert (victim / "keep").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "victim"]
    assert "path separator" in capsys.readouterr().err


def drop_config_key(adapter):
    config = json.loads((adapter / "flix_config.json").read_text())
    del config["config"]
    (adapter / "flix_config.json").write_text(json.dumps(config))


def edit_config(adapter, **changes):
    config = json.loads((adapter / "flix_config.json").read_text())
    config["config"].update(changes)
    (adapter / "flix_config.json").write_text(json.dumps(config))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage, args, message",
    [
        (lambda a: (a / "flix_adapter.safetensors").unlink(), [], r"flix_adapter.safetensors cannot be read"),
        (lambda a: truncate(a / "flix_adapter.safetensors"), [], r"flix_adapter.safetensors cannot be read"),
        (drop_config_key, [], r"flix_config.json has no 'config' key"),
        (lambda a: edit_config(a, ranks={"task": 3, "lang": 2}), [], r"has shape \(\d+, \d+\), this model needs"),
        (lambda a: edit_config(a, features={"task": ["ner", "qa_in_lang", "mt"], "lang": ["sw", "yo"]}), [], "this model needs"),
        (lambda a: edit_config(a, ranks={"task": "4", "lang": 2}), [], "ranks and shared_rank must be whole numbers"),
        (lambda a: None, ["--features", "task=ner,lang=zz"], r"\{'lang': 'zz'\} are not in this adapter"),
        (lambda a: None, ["--features", "size=big"], r"\{'size': 'big'\} are not in this adapter .*task: ner, qa_in_lang"),
    ],
    ids=["no-weights", "truncated-weights", "no-config-key", "changed-ranks", "changed-features", "string-rank", "untrained-lang", "unknown-group"],
)
def test_export_refuses_bad_adapters_and_features_with_a_message(tmp_path, capsys, damage, args, message):
    from flix.pipeline.export_command import main as export_main

    adapter = saved_adapter(tmp_path / "adapter")
    damage(adapter)
    assert export_main([str(adapter), str(tmp_path / "out"), "--model", "tiny", *args]) == 2  # before: tracebacks, or a task-only adapter
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


# -- offline: only what PART.json lists, checked; a resume archive stays under runs/ -------------


@pytest.fixture
def parts(tmp_path) -> Path:
    """Staged parts holding a small data archive (no wheels: nothing to download)."""
    from flix.pipeline import offline

    data = tmp_path / "data"
    data.mkdir()
    (data / "counts.json").write_text("{}\n")
    offline.stage(tmp_path / "staging", data, [], [], limit_mib=60)
    return tmp_path / "staging"


def offline_run(tmp_path, parts, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flix", "offline", "run", "--parts", str(parts), "--minutes", "3", "--scale", "smoke", "--no-bench"]
    cmd += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_offline_uses_only_listed_parts_and_checks_them(tmp_path, parts):
    from flix.pipeline import offline

    part = parts / "part-1"
    (part / "evil-1.0-py3-none-any.whl").write_bytes(b"not listed")  # before: pip-installed, its code run
    assert set(offline.staged(parts)) == {offline.DATA_ARCHIVE}
    archive = part / offline.DATA_ARCHIVE
    archive.write_bytes(archive.read_bytes()[:-10])  # truncated in the copy: before, a tarfile traceback
    done = offline_run(tmp_path, parts)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{archive} is missing, truncated or changed" in done.stderr and "copy that part again" in done.stderr
    assert not (tmp_path / "work").exists()  # refused before anything was written


@pytest.mark.parametrize("name", ["runs/../site/sitecustomize.py", "/tmp/flix-trust3-absolute.py"], ids=["dotdot", "absolute"])
def test_offline_resume_refuses_members_outside_runs(tmp_path, parts, name):
    import io
    import tarfile

    evil = tmp_path / "flix-smoke.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        code = b"open('/tmp/flix-trust3-ran', 'w').write('ran')\n"
        info = tarfile.TarInfo(name)
        info.size = len(code)
        tar.addfile(info, io.BytesIO(code))
    done = offline_run(tmp_path, parts, "--resume", str(evil))
    assert done.returncode == 1 and f"holds {name!r}" in done.stderr and "refusing it" in done.stderr, done.stdout + done.stderr
    assert not (tmp_path / "work" / "site" / "sitecustomize.py").exists() and not Path("/tmp/flix-trust3-ran").exists()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(evil.read_bytes()[:20])
    done = offline_run(tmp_path, parts, "--resume", str(truncated))
    assert done.returncode == 1 and "cannot be read" in done.stderr and "Traceback" not in done.stderr, done.stderr


# -- a report and a study that a bad run cannot fool ------------------------------------------

FAST = ["scale.steps=2", "scale.eval_every=2", "scale.eval_examples=2", "scale.test_examples=2", "train.threads=1"]


def good_and_bad_runs(root: Path, edit) -> tuple[Path, Path]:
    """Two runs of the real report fixture: one as written, one changed by edit(results)."""
    from test_report import STUDY_A, write_run

    good = write_run(root, ("flix", "study_a", 0, 0.7, None), STUDY_A)
    bad = write_run(root, ("compute_matched", "study_a", 0, 0.7, None), {k: v - 10 for k, v in STUDY_A.items()})
    results = json.loads((bad / "results.json").read_text())
    edit(results)
    (bad / "results.json").write_text(json.dumps(results))
    return good, bad


def set_path(keys: str, value):
    def edit(results):
        *inner, last = keys.split(".")
        target = results
        for key in inner:
            target = target[key]
        target[last] = value

    return edit


def flix_block(features, shared_rank):
    return set_path("flix", {"features": features, "ranks": {"task": 4, "lang": 2}, "shared_rank": shared_rank})


def edited_method(results):  # a compute_matched run relabelled as FLix, its FLix block left as trained
    results["method"] = results["config"]["method"]["name"] = "flix"
    flix_block({}, 6)(results)


@pytest.mark.parametrize(
    "edit, reason",
    [
        (set_path("config.seed", "abc"), "ValueError: invalid literal for int"),
        (set_path("config.dropout", "abc"), "could not convert string to float"),
        (set_path("config.seed", [0]), "TypeError"),
        (set_path("test", {"ner": "high"}), "test is not a {task: {language: score}} object"),
        (set_path("eval_sets", []), "eval_sets is not a"),
        (set_path("config.method", {"name": "lora"}), "unknown method 'lora'"),
        (set_path("test.ner.sw", float("nan")), "test score of ner/sw is nan, not a finite number"),
        (set_path("eval_sets.ner.test", float("inf")), "eval_sets ner test is inf, not a finite number"),
        (edited_method, "method 'flix' but its FLix block has features {} and shared_rank 6"),
        (set_path("method", "flix"), "method 'flix' but its config says 'compute_matched'"),
    ],
    ids=["seed", "dropout", "seed-list", "scores", "eval-sets", "method", "nan", "infinity", "edited-method", "method-vs-config"],
)
def test_report_names_and_skips_a_run_it_cannot_read_or_trust(tmp_path, edit, reason):
    from test_report import PAPER

    from flix.report.render import render

    root = tmp_path / "smoke"
    good, bad = good_and_bad_runs(root, edit)
    summary = render(root, tmp_path / "out", "smoke", PAPER)  # before: a traceback, or nan [0.0, 0.0] in a filled cell
    assert summary["runs"] == 1 and len(summary["unreadable"]) == 1, summary["unreadable"]
    assert summary["unreadable"][0].startswith(str(bad / "results.json")) and reason in summary["unreadable"][0]
    table1 = (tmp_path / "out" / "table1.md").read_text()
    assert "nan" not in table1


def test_report_skips_a_failed_typo_run(tmp_path):
    from test_report import PAPER, STUDY_A, config_of, write_run

    from flix.record import write_failure
    from flix.report.render import render

    root = tmp_path / "smoke"
    write_run(root, ("flix", "study_a", 0, 0.7, None), STUDY_A)
    typo = root / "study_a" / "flix-dropabc"
    typo.mkdir(parents=True)
    write_failure(typo, TypeError("bad operand"), config_of("flix", "study_a", 0, "abc", None))  # what dropout=abc left
    summary = render(root, tmp_path / "out", "smoke", PAPER)  # before: ValueError from collect.py
    assert summary["runs"] == 1 and summary["unreadable"] == [f"{typo / 'failed.json'}: ValueError: could not convert string to float: 'abc'"]


def test_run_directory_named_for_another_method_is_refused(tmp_path):
    from flix.report.collect import collect

    root = tmp_path / "smoke"
    _, bad = good_and_bad_runs(root, lambda results: None)
    renamed = bad.with_name("flix-drop0.7-rankpaper-seed0-0123456789")
    bad.rename(renamed)
    results = json.loads((renamed / "results.json").read_text())
    results["method"] = results["config"]["method"]["name"] = "flix_shared"
    results["flix"] = {"features": {"task": ["ner"]}, "shared_rank": 4}
    (renamed / "results.json").write_text(json.dumps(results))
    index = collect(root, "smoke")
    assert [str(p) for p, _ in index.unreadable] == [str(renamed / "results.json")]
    assert "method 'flix_shared' in a run directory named for 'flix'" in index.unreadable[0][1]


def test_report_and_study_both_follow_symlinked_run_folders(tmp_path, data_root, monkeypatch):
    from test_report import STUDY_A, write_run

    from flix.pipeline import study
    from flix.report.collect import collect

    elsewhere = tmp_path / "disk2"
    run = write_run(elsewhere, ("flix", "study_a", 0, 0.7, None), STUDY_A)
    root = tmp_path / "runs" / "smoke"
    root.mkdir(parents=True)
    (root / "study_a").symlink_to(elsewhere / "study_a")  # a mixture folder on another disk
    (root / "loop").symlink_to(root)  # a link loop ends the walk, it does not hang it
    index = collect(root, "smoke")  # before: the linked run was invisible, a missing cell
    assert [r.path for r in index.finished] == [root / "study_a" / run.name]
    planned = study.PlannedRun(["seed=0"], root / "study_a" / run.name)
    assert planned.status == "done"  # the study reads the same record through the same link


def test_symlinked_data_root_is_the_same_run(tmp_path, data_root):
    from flix.pipeline.run_config import compose, config_hash
    from flix.record import setting

    link = tmp_path / "data"
    link.symlink_to(data_root)
    real, linked = (compose([f"data.root={root}", "logger=none"]) for root in (data_root, link))
    assert config_hash(real) == config_hash(linked)  # before: two run directories for the same data
    as_dict = [OmegaConf.to_container(c, resolve=True) for c in (real, linked)]
    assert setting(as_dict[0]) == setting(as_dict[1])  # and the report averages them


@pytest.fixture
def one_run_study(tmp_path, monkeypatch, data_root):
    from flix.pipeline import study

    monkeypatch.setenv("FLIX_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("FLIX_DATA_ROOT", str(data_root))
    (tmp_path / "one.yaml").write_text(json.dumps({"sweeps": [{"method": ["compute_matched"], "mixture": ["multitask_sw"]}]}))
    name = str(tmp_path / "one.yaml")
    (run,) = study.plan(study.load_study(name), ["scale=smoke", "logger=none", "study=one", *FAST])
    run.run_dir.mkdir(parents=True)
    return name, run


@pytest.mark.slow  # trains a smoke run through a study
def test_study_never_counts_a_damaged_run_as_complete(one_run_study, capsys):
    from flix.pipeline import study

    name, run = one_run_study
    (run.run_dir / "results.json").write_text('{"method": "compute_matched", "test": {')  # truncated
    code = study.main([name, "--logger", "none", "--no-report", *FAST])
    out, err = capsys.readouterr()
    assert "1 runs, 0 complete, 1 damaged" in out  # before: "1 runs, 1 complete" and exit 0
    (line,) = [line for line in err.splitlines() if line.startswith("[flix study]")]  # one line for the run
    assert (
        code == 1
        and f"FAILED method=compute_matched mixture=multitask_sw seed=0 -> {run.run_dir}: {run.run_dir / 'results.json'} cannot be read" in line
    )


@pytest.mark.slow  # trains a smoke run through a study
def test_study_says_when_another_process_trains_a_run(one_run_study, capsys):
    from flix.pipeline import study

    name, run = one_run_study
    with run_lock(run.run_dir):  # another process on that run (a lock is per open file)
        code = study.main([name, "--logger", "none", "--no-report", *FAST])
    out, err = capsys.readouterr()
    assert "1 being trained by another process" in out
    assert code == 0 and "FAILED" not in err, err  # before: FAILED ... no results.json, exit 1
    assert f"RUNNING ELSEWHERE method=compute_matched mixture=multitask_sw seed=0 -> {run.run_dir}: being trained by pid {os.getpid()}" in err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_adapter_and_export_files_get_the_umask_modes(tmp_path, umask):
    from flix import FLixModel
    from flix.base_models import load_model
    from flix.export import export_all

    old = os.umask(umask)
    try:
        adapter = saved_adapter(tmp_path / "adapter")
        export_all(FLixModel.from_pretrained(load_model({"name": "tiny"})[0], adapter), tmp_path / "export")
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.name != ".lock"]
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in written}
    # before: flix_adapter.safetensors and adapter_model.safetensors were 0600
    assert modes == {k: (0o777 if (tmp_path / k).is_dir() else 0o666) & ~umask for k in modes}, modes
    assert "adapter/flix_adapter.safetensors" in modes and "export/task=ner,lang=sw/adapter_model.safetensors" in modes


# -- bad settings fail before Hydra and write nothing ---------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["seed=abc"], "seed=abc: Value 'abc' of type 'str' could not be converted to Integer"),  # before: a raw numpy TypeError after a run folder
        (["dropout=abc"], "dropout=abc: Value 'abc' of type 'str' could not be converted to Float"),
        (["droput=0.5"], "droput=0.5: no such setting; did you mean dropout=0.5?"),  # before: Hydra's "+droput=0.5"
        (["train.lrr=1e-3"], "train.lrr=1e-3: no such setting; did you mean train.lr=1e-3?"),
        (["rank=0"], "rank=0: no such option; a language rank must be >= 1: rank=lang1, rank=lang2, or rank.lang=N"),
        (["-m", "seed=0,abc", "dropout=0.3,2"], "seed=abc: Value 'abc'"),  # every value of a sweep
        (["-m", "seed=0,1", "dropout=0.3,2"], "dropout=2.0: must be a number >= 0.0 and < 1.0"),
    ],
)
def test_bad_settings_are_named_before_hydra_runs(args, message):
    from flix.pipeline.run_config import override_problems

    problems = override_problems(args)
    assert any(message in p for p in problems), problems
    assert not any("lang0" in p for p in problems)  # rank=0 once suggested an option that does not exist


def test_good_settings_pass(data_root):
    from flix.pipeline.run_config import override_problems

    assert (
        override_problems(["-m", "method=flix,compute_matched", "seed=0,1", "dropout=0.0,0.5", "rank.lang=3", "+extra=1", f"data.root={data_root}"])
        == []
    )


@pytest.mark.parametrize("bad", ["seed=abc", "droput=0.5"])
def test_a_bad_setting_writes_no_run_folder(tmp_path, bad):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "flix.train", "logger=none", f"hydra.run.dir={run_dir}", bad], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.startswith("flix.train: error: ") and "Traceback" not in done.stderr, done.stderr
    assert not run_dir.exists()  # before: a run folder with a failed.json, a "run failed" footnote in reports


@pytest.mark.parametrize(
    "args, data_root, message",
    [
        (["scale=smoke", "mixture=multilingual_ner", "data.root=/nonexistent"], None, "data root /nonexistent (the given root) is not a directory"),
        (["scale=cpu"], "", "FLIX_DATA_ROOT is not set"),  # the cpu scale has no default data
    ],
)
def test_a_bad_data_root_leaves_no_run_folder(tmp_path, args, data_root, message):
    env = {k: v for k, v in os.environ.items() if k not in ("FLIX_DATA_ROOT", "FLIX_RUNS")}  # runs/ under cwd, as for a user
    if data_root is not None:
        env["FLIX_DATA_ROOT"] = data_root
    done = subprocess.run(
        [sys.executable, "-m", "flix.train", "logger=none", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.startswith("flix.train: error: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(tmp_path.iterdir()) == []  # before: runs/smoke/multilingual_ner/flix-.../failed.json, footnoted in every report


def test_a_run_refused_inside_hydra_removes_only_the_folder_hydra_made(tmp_path, monkeypatch):
    from flix.pipeline.run import remove_unstarted

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLIX_RUNS", raising=False)
    run_dir = tmp_path / "runs" / "smoke" / "study_a" / "flix-x"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "train.log").write_text("")
    kept = tmp_path / "runs" / "smoke" / "study_a" / "flix-y"
    (kept / ".hydra").mkdir(parents=True)
    (kept / ".lock").write_text("")  # a run that started once: not ours to remove
    remove_unstarted(kept)
    remove_unstarted(run_dir)
    assert not run_dir.exists() and (kept / ".lock").exists()
    remove_unstarted(run_dir.parent / "nothing")  # no folder: nothing to do
    shutil.rmtree(kept)
    (run_dir / ".hydra").mkdir(parents=True)
    remove_unstarted(run_dir)
    assert list(tmp_path.iterdir()) == []  # the empty folders above it, up to and with runs/


# -- flix score: formats it cannot read are named --------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_score_names_a_utf16_file(tmp_path, capsys, encoding):
    from flix import metrics

    path = tmp_path / "preds.jsonl"
    path.write_bytes('{"target": "PER: Ada", "prediction": "PER: Ada"}\n{"target": "", "prediction": ""}\n'.encode(encoding))
    assert metrics.main(["--task", "ner", str(path)]) == 2
    assert f"{path}: UTF-16 or UTF-32 text" in capsys.readouterr().err  # before: "line 2: bad JSON"


def test_score_refuses_ner_targets_in_another_format(tmp_path, capsys):
    from flix import metrics

    path = tmp_path / "preds.jsonl"
    rows = [{"target": "Ada (PER), Lagos (LOC)", "prediction": "PER: Ada"}, {"target": "", "prediction": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert metrics.main(["--task", "ner", str(path)]) == 2  # before: 0.00, exit 0
    assert 'no target holds a span in the NER format "LABEL: entity $$ LABEL: entity"' in capsys.readouterr().err
    rows.append({"target": "PER: Ada", "prediction": "PER: Ada"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert metrics.main(["--task", "ner", str(path)]) == 0
    assert "warning: 1 of 3 targets" in capsys.readouterr().err


# -- quiet: Ctrl-C is one line, W&B prints no banners -----------------------------------------------


def study_cmd(one_run_study, *args) -> list[str]:
    name, _ = one_run_study
    return [sys.executable, "-m", "flix", "study", name, "--no-report", *args]


@pytest.mark.slow
def test_ctrl_c_during_a_study_prints_lines_not_tracebacks(one_run_study):
    import signal
    import time

    _, run = one_run_study
    study = subprocess.Popen(
        study_cmd(one_run_study, "--logger", "none", "scale.steps=400", "scale.eval_every=200", "scale.checkpoint_every=200", "train.threads=1"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.time() + 240
    while not any(lock.stat().st_size for lock in run.run_dir.parent.glob("*/.lock")):  # a run holds its lock
        assert time.time() < deadline and study.poll() is None, "no run started"
        time.sleep(0.5)
    time.sleep(3)  # training
    os.killpg(study.pid, signal.SIGINT)  # Ctrl-C: the study and its sweep both get it (the sweep twice: forwarded)
    for _ in range(20):  # an impatient user's further Ctrl-Cs while the run exits
        time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(study.pid, signal.SIGINT)
    out = study.communicate(timeout=120)[0]
    assert study.returncode == 128 + signal.SIGINT and "Traceback" not in out, out  # before: a 58-line traceback
    assert "flix.train: stopped by Ctrl-C" in out and "[flix study] stopped by SIGINT" in out


@pytest.mark.slow
def test_wandb_study_prints_no_banners(one_run_study, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    done = subprocess.run(study_cmd(one_run_study, "--logger", "wandb", *FAST), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert not [line for line in lines if line.startswith("wandb:")], lines  # before: a dozen lines a run
    assert list(one_run_study[1].run_dir.glob("wandb/offline-run-*"))  # and the run is still logged
    (said,) = [line for line in lines if line.startswith("[flix] W&B logs offline to ")]  # but says so, once
    assert str(one_run_study[1].run_dir.name) in said and "`flix sync` uploads it and every other offline run under" in said
