"""Does a cpu_long run resume exactly on the real model? (exploratory, outside ner_nll's design)

Trains FLix p = 0 (seed 5's settings, shortened) twice with the study's own code: once
straight through, once killed (SIGKILL) right after its first checkpoint and resumed. Same
Gemma 3 270M, cpu kernels, packing and loss as the study; fewer steps and examples.

    python reports/cpu_long/resume-check/check.py CODE_DIR OUT_DIR   # CODE_DIR: a checkout of daca1a4
    python reports/cpu_long/resume-check/check.py --compare A.json B.json   # two saved results.json
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TIMES = {"time_seconds", "train_seconds"}  # the only fields two equal runs may differ in


def compare(a: dict, b: dict) -> None:
    """Every field of the two records but their times: identical, or what differs."""
    for key in sorted(set(a) | set(b)):
        if key not in TIMES:
            print(f"{key}: {'identical' if a.get(key) == b.get(key) else 'DIFFERENT'}")


if sys.argv[1] == "--compare":
    compare(*(json.loads(Path(f).read_text()) for f in sys.argv[2:4]))
    sys.exit()
code, out = Path(sys.argv[1]), Path(sys.argv[2])
SHORT = ["scale.steps=12", "scale.eval_every=4", "scale.checkpoint_every=4", "scale.eval_examples=4",
         "scale.test_examples=2", "scale.test_nll_examples=16"]


def cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "flix.train", "scale=cpu_long", "logger=none", "seed=5", "method=flix",
            "mixture=multilingual_ner", "dropout=0.0", *SHORT, f"hydra.run.dir={run_dir}"]


env = {**os.environ, "PYTHONUNBUFFERED": "1"}
t0 = time.time()
subprocess.run(cmd(out / "straight"), check=True, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"straight run: {time.time() - t0:.0f} s", flush=True)
killed = out / "killed"
proc = subprocess.Popen(cmd(killed), cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
state = killed / "checkpoints" / "latest" / "state.pt"
while not state.exists():
    assert proc.poll() is None, "the run ended before its first checkpoint"
    time.sleep(0.05)
time.sleep(1.0)  # the checkpoint is written atomically; let the rename land
proc.send_signal(signal.SIGKILL)
proc.wait()
assert not (killed / "results.json").exists()
subprocess.run(cmd(killed), check=True, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
a = json.loads((out / "straight" / "results.json").read_text())
b = json.loads((killed / "results.json").read_text())
print("resumed at:", [line.strip() for line in (killed / "train.log").read_text().splitlines() if "resuming" in line])
compare(a, b)
