"""`flix bench adapters` runs end to end at toy size and writes the documented report."""
from __future__ import annotations

import json
import math

from flix import bench


def test_bench_adapters_writes_every_row(tmp_path, capsys):
    out = tmp_path / "bench" / "adapters.json"
    argv = ["adapters", "--out", str(out), "--repeats", "1", "--warmup", "1", "--batch", "4", "--seq", "8",
            "--threads", "1", "--features", "8,64", "--hidden", "64", "--layers", "1", "--vocab", "300", "--new-tokens", "2"]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())

    methods = [(r["method"], r["num_features"]) for r in report["rows"]]
    assert methods == [("none", 0), ("compute_matched", 1), ("flix", 8), ("flix", 64), ("peft_lora", 1)]
    assert {(r["method"], r["mode"]) for r in report["inference"]} == {
        (m, mode) for m in ("flix_mixed_inference", "peft_adapter_names", "none") for mode in ("forward", "generate")
    }
    assert all(r["num_combinations"] == 4 for r in report["inference"] if r["method"] != "none")
    times = [r["ms_per_step"] for r in report["rows"]] + [r["ms_per_batch"] for r in report["inference"]]
    assert all(math.isfinite(t) and t > 0 for t in times)

    assert set(report["targets"]) == {
        "flix_vs_compute_matched", "flix_many_vs_few_features", "mixed_inference_speedup_forward", "mixed_inference_speedup_generate"
    }
    for target in report["targets"].values():
        assert math.isfinite(target["ratio"]) and target["ratio"] > 0 and isinstance(target["pass"], bool)
    config = report["config"]
    assert (config["batch"], config["seq"], config["threads"], config["model"]["hidden_size"]) == (4, 8, 1, 64)
    assert config["torch"]

    printed = capsys.readouterr().out
    assert "flix_mixed_inference" in printed and printed.count("PASS") + printed.count("MISS") == 4
