"""The README's Python examples run as written; its first run succeeds from a clone with
nothing beside it; every shell command in it and in docs/ names targets, options and
config keys that exist; every link points at a file that does."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


def shell_lines(page: Path) -> list[list[str]]:
    """The commands of a page's bash blocks as tokens, comments and [optional] brackets dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    lines = [re.sub(r"\s#.*", "", line).strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line.replace("[", "").replace("]", "")) for line in lines if line and not line.startswith("#")]


COMMANDS = [(page.relative_to(REPO), tokens) for page in PAGES for tokens in shell_lines(page)]


def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert (tmp_path / "adapter" / "flix_config.json").exists()
    assert (tmp_path / "ner-sw" / "adapter_model.safetensors").exists()
    assert namespace["out"].shape[0] == 1


def test_readme_trainer_example_runs(tmp_path, monkeypatch):
    import torch

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "FLixDataCollator" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert len(namespace["manifest"]["adapters"]) == 4 and (tmp_path / "trained-adapter" / "flix_config.json").exists()
    assert (tmp_path / "trainer-out" / "checkpoint-4" / "model.safetensors").exists()
    assert "eval_loss" in namespace["metrics"]
    assert torch.equal(namespace["out"], namespace["peft_out"]), "the exported adapters generate what FLix generates"


def test_readme_lean_loss_trainer_equals_the_models_own_loss(tmp_path, monkeypatch):
    import torch

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (trainer_block,) = [b for b in blocks if "FLixDataCollator" in b]
    (lean_block,) = [b for b in blocks if "LeanTrainer" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(trainer_block, str(README), "exec"), namespace)
    exec(compile(lean_block, str(README), "exec"), namespace)
    model, collator = namespace["model"], namespace["collator"]
    model.eval()  # no feature dropout: both losses see the same adapters
    batch = collator([namespace["data"][0], namespace["data"][1]])
    args = namespace["TrainingArguments"]("lean-out", report_to=[], use_cpu=True)
    lean = namespace["LeanTrainer"](model=model, args=args, data_collator=collator)
    with torch.no_grad():
        assert lean.compute_loss(model, dict(batch)).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


@pytest.mark.parametrize("page,tokens", COMMANDS, ids=[" ".join(t)[:60] for _, t in COMMANDS])
def test_documented_commands_exist(page, tokens, capsys):
    """make targets dry-run; flix options (`flix X` or `python -m flix X`) appear in the
    command's --help; python -m flix.train overrides compose; anything else (`. .venv/bin/activate`) is listed here."""
    if tokens[0] == "make":
        out = subprocess.run(["make", "-n", *tokens[1:]], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, f"{page}: {' '.join(tokens)}: {out.stderr}"
    elif tokens[:3] == ["python", "-m", "flix.train"]:
        from flix.pipeline.run_config import compose

        overrides = [t.split(",")[0] for t in tokens[3:] if t not in ("-m", "--help")]  # a sweep: its first values
        compose(overrides)
    elif tokens[0] == "flix" or tokens[:3] == ["python", "-m", "flix"]:
        from flix.cli import main

        args = tokens[1:] if tokens[0] == "flix" else tokens[3:]
        with pytest.raises(SystemExit) as done:
            main([*args, "--help"])
        usage = capsys.readouterr().out
        assert done.value.code == 0 and usage
        for option in (t.split("=")[0] for t in args if t.startswith("--")):
            assert option in usage, f"{page}: {' '.join(tokens)}: no {option} in its --help"
    else:
        assert tokens == [".", ".venv/bin/activate"], f"{page}: {' '.join(tokens)}: not checked; add a rule here"


def test_links_point_at_files():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)}: broken link {target}"


def test_the_code_names_only_documents_that_exist():
    """A docstring's pointer to a repository document (docs/x.md, DESIGN.md) leads somewhere;
    lower-case names are files the code writes (runs.md)."""
    for path in sorted((REPO / "flix").rglob("*.py")):
        for name in re.findall(r"[\w./-]*/[\w.-]+\.md\b|\b[A-Z][A-Z_]+\.md\b", path.read_text()):
            assert (REPO / name).exists(), f"{path.relative_to(REPO)}: {name} is not in the repository"  # before: DESIGN.md §5


@pytest.mark.slow
def test_first_run_works_from_a_clone_with_nothing_beside_it(tmp_path):
    """The README's first run, as written, with FLIX_DATA_ROOT unset: the smoke scale reads
    the sample in tests/data/."""
    line = next(t for t in shell_lines(README) if t[:3] == ["python", "-m", "flix.train"])
    env = {k: v for k, v in os.environ.items() if k != "FLIX_DATA_ROOT"} | {"FLIX_RUNS": str(tmp_path)}
    out = subprocess.run([sys.executable, *line[1:]], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (results,) = tmp_path.glob("smoke/study_a/*/results.json")
    assert set(json.loads(results.read_text())["test"]) == {"ner", "semantic_parsing", "qa_in_lang", "qa_cross_lang"}
