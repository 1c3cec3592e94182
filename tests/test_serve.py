"""FLix served by llama-server (flix.serve, docs/serving.md).

Always: the manifest -> request logic, the per-feature adapters' arithmetic (their sum is
the combination's update), the one-line refusals. Where llama.cpp's source is cached:
the GGUF conversion. Where llama-server is built (`make serve-setup`): per-request sums on
a tiny Gemma-architecture model over a float32 GGUF base agree with flix to 1e-3 in
log-probabilities (every token of the vocabulary, teacher-forced), and greedy outputs match.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flix import FLixConfig, get_flix_model
from flix.base_models import load_model
from flix.serve import client
from flix.serve.convert import SHARED, base_config_dir, features_of, file_name
from flix.serve.llama_cpp import home, server_binary

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3  # log-probabilities, float32 GGUF base (what `flix serve base --dtype f32` writes)
FEATURES = {"task": ["ner", "qa"], "lang": ["sw", "yo"]}
MANIFEST = {
    "format": client.FORMAT,
    "groups": ["task", "lang"],
    "adapters": [
        {"id": 0, "group": "task", "feature": "ner", "rank": 4, "file": "task=ner.gguf"},
        {"id": 1, "group": "task", "feature": "qa", "rank": 4, "file": "task=qa.gguf"},
        {"id": 2, "group": "lang", "feature": "sw", "rank": 2, "file": "lang=sw.gguf"},
    ],
}


def tiny_flix(shared_rank: int = 0, seed: int = 1):
    """The tiny Gemma model with FLix banks drawn at random (B too), so every feature moves the logits."""
    base, tok = load_model({"name": "tiny"})
    model = get_flix_model(base, FLixConfig(features=FEATURES, ranks={"task": 4, "lang": 2}, shared_rank=shared_rank, alpha=16.0))
    gen = torch.Generator().manual_seed(seed)
    for layer in model.flix_layers().values():
        for bank in (layer.flix_A, layer.flix_B):
            bank.data[1:] = torch.randn(bank.shape[0] - 1, bank.shape[1], generator=gen) * 0.3
    return model, tok


def test_lora_list_turns_on_the_combinations_features_and_names_every_adapter():
    assert client.lora_list(MANIFEST, {"task": "qa", "lang": "sw"}) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}, {"id": 2, "scale": 1.0}]
    # an unseen language has no adapter: the task alone, as in FLix; no features: the base
    assert client.lora_list(MANIFEST, {"task": "ner", "lang": "yo"}) == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}, {"id": 2, "scale": 0.0}]
    assert [e["scale"] for e in client.lora_list(MANIFEST, {})] == [0.0, 0.0, 0.0]
    shared = {
        **MANIFEST,
        "adapters": [{"id": 0, "group": None, "feature": SHARED, "rank": 4, "file": "shared.gguf"}, {**MANIFEST["adapters"][0], "id": 1}],
    }
    assert client.lora_list(shared, {}) == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}]
    with pytest.raises(ValueError, match=r"feature group\(s\) \['langauge'\] are not in this adapter"):
        client.lora_list(MANIFEST, {"task": "ner", "langauge": "sw"})


def test_server_args_load_every_adapter_in_id_order_at_scale_zero(tmp_path):
    args = client.server_args({**MANIFEST, "adapters": MANIFEST["adapters"][::-1]}, tmp_path)
    assert args == ["--lora", ",".join(str(tmp_path / f) for f in ("task=ner.gguf", "task=qa.gguf", "lang=sw.gguf")), "--lora-init-without-apply"]


def test_manifest_read_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"manifest.json not found: pass the folder `python -m flix serve export` wrote"):
        client.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"format 'other', expected 'flix-llama-server-1'"):
        client.read_manifest(tmp_path)


@pytest.mark.parametrize("shared_rank", [0, 4])
def test_feature_adapters_sum_to_the_combinations_update(tmp_path, shared_rank):
    """Each feature's peft adapter (what becomes its GGUF) at scale 1, summed over a
    combination's features, is FLix's update for that combination: same A, B and scale."""
    from safetensors.torch import load_file

    from flix.export import write_peft

    model, _ = tiny_flix(shared_rank)
    features = features_of(model)
    assert [(g, f) for g, f, _ in features] == [(None, SHARED)] * bool(shared_rank) + [
        ("task", "ner"),
        ("task", "qa"),
        ("lang", "sw"),
        ("lang", "yo"),
    ]
    deltas = {}
    for group, feature, rows in features:
        folder = write_peft(model, torch.tensor(rows), tmp_path / file_name(group, feature))
        config, tensors = json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")
        scale = config["lora_alpha"] / config["r"]
        key = "base_model.model.model.layers.1.mlp.up_proj.lora_{}.weight"
        deltas[(group, feature)] = scale * tensors[key.format("B")].double() @ tensors[key.format("A")].double()
    layer = model.flix_layers()["model.layers.1.mlp.up_proj"]
    for combination in ({"task": "qa", "lang": "sw"}, {"task": "ner"}):
        rows = model.flix_config.space.rows([combination])[0]
        rows = rows[rows != 0]
        want = model.flix_config.scaling * layer.flix_B[rows].double().T @ layer.flix_A[rows].double()
        got = sum(d for (g, f), d in deltas.items() if g is None or combination.get(g) == f)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_an_encoder_decoder_base_is_refused(tmp_path):
    base, _ = load_model({"name": "tiny_seq2seq"})
    with pytest.raises(
        ValueError, match=r"^the base model is T5ForConditionalGeneration, an encoder-decoder: llama-server serves causal language models only$"
    ):
        base_config_dir(base, tmp_path)


@pytest.mark.slow  # a child process that loads torch and the model: make test-all
def test_serve_export_refuses_an_encoder_decoder_in_one_line(tmp_path):
    base, _ = load_model({"name": "tiny_seq2seq"})
    adapter = tmp_path / "adapter"
    get_flix_model(base, FLixConfig(features=FEATURES, ranks={"task": 4, "lang": 2})).save_pretrained(adapter)
    done = subprocess.run(
        [sys.executable, "-m", "flix", "serve", "export", str(adapter), str(tmp_path / "out"), "--model", "tiny_seq2seq"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "flix serve: error: the base model is T5ForConditionalGeneration, an encoder-decoder: llama-server serves causal language models only"
    ]


def test_request_prints_the_lora_list(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    done = subprocess.run(
        [sys.executable, "-m", "flix", "serve", "request", str(tmp_path), "--features", "task=qa,lang=sw"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"lora": client.lora_list(MANIFEST, {"task": "qa", "lang": "sw"})}


needs_source = pytest.mark.skipif(
    not (home() / "src" / "convert_lora_to_gguf.py").is_file(), reason="llama.cpp's source is not cached: make serve-setup"
)
needs_server = pytest.mark.skipif(server_binary() is None, reason="llama-server is not built: make serve-setup")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny FLix adapter exported to GGUF, its float32 GGUF base, and flix's model."""
    from flix.serve.convert import base_gguf, feature_ggufs

    tmp = tmp_path_factory.mktemp("serve")
    model, tok = tiny_flix()
    adapters = feature_ggufs(model, tmp / "export")
    manifest = {"format": client.FORMAT, "model": "tiny", "groups": list(FEATURES), "adapters": adapters}
    (tmp / "export" / "manifest.json").write_text(json.dumps(manifest))
    return model, tok, tmp / "export", manifest, base_gguf("tiny", tmp / "tiny-f32.gguf", "f32")


@pytest.mark.slow
@needs_source
def test_export_writes_one_gguf_lora_per_feature_with_flix_scale(served):
    import gguf

    model, _, export, manifest, _ = served
    assert [(a["id"], a["file"], a["rank"]) for a in manifest["adapters"]] == [
        (0, "task=ner.gguf", 4),
        (1, "task=qa.gguf", 4),
        (2, "lang=sw.gguf", 2),
        (3, "lang=yo.gguf", 2),
    ]
    reader = gguf.GGUFReader(export / "lang=yo.gguf")
    # llama.cpp scales an adapter by alpha / its rank: FLix's alpha / active rank (16 / 6)
    assert reader.fields["adapter.lora.alpha"].contents() / 2 == pytest.approx(16.0 / 6)
    tensors = {t.name: t.data for t in reader.tensors}
    rows = model.flix_config.space.rows_of("lang", "yo")
    layer = model.flix_layers()["model.layers.0.self_attn.k_proj"]
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_k.weight.lora_a"].copy()), layer.flix_A[rows].detach())
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_k.weight.lora_b"].copy()), layer.flix_B[rows].detach().T)


@pytest.mark.slow
@needs_source
def test_an_architecture_llama_cpp_does_not_convert_is_refused_in_one_line(tmp_path):
    from flix.serve.convert import run_child

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}))
    with pytest.raises(
        ValueError, match=r"^architecture NoSuchForCausalLM \(from .*config.json\) is not one llama.cpp converts; llama-server cannot serve it$"
    ):
        run_child([{"kind": "check", "base": str(tmp_path)}])


COMBINATIONS = [{"task": "ner", "lang": "sw"}, {"task": "qa", "lang": "yo"}, {}, {"task": "qa"}, {"lang": "sw"}, {"task": "ner", "lang": "xx"}]


@pytest.mark.slow
@needs_server
def test_per_request_sums_equal_flix_on_a_float_base(served, tmp_path):
    """Every combination (two features, one, none, an unseen language), requests interleaved
    on one server: all 384 log-probabilities at every teacher-forced position within 1e-3 of
    flix's; and the adapters matter (flix's base differs from each combination by far more)."""
    from flix.serve.agreement import Case, compare, flix_logprobs
    from flix.serve.server import LlamaServer

    model, tok, export, manifest, base = served
    texts = [("Task: ner. Text: Amina alikwenda Nairobi.", "PER: Amina"), ("question: who? context: Ade lives in Lagos.", "Ade")]
    cases = [Case(f, tok(p, add_special_tokens=False)["input_ids"], tok(t)["input_ids"]) for f in COMBINATIONS for p, t in texts]
    with LlamaServer(base, export, log=tmp_path / "server.log", threads=1, exact=True) as url:
        result = compare(model, url, manifest, cases, n_probs=384)
    assert result["positions"] == sum(len(c.target) for c in cases) and result["positions_withheld"] == 0
    assert result["max_abs_logprob_diff"] < TOLERANCE, result
    assert result["top1_agreement"] == 1.0
    bare = flix_logprobs(model, Case({}, cases[0].prompt, cases[0].target))
    assert (flix_logprobs(model, cases[0]) - bare).abs().max() > 100 * TOLERANCE


@pytest.mark.slow
@needs_server
def test_greedy_outputs_equal_flix(served, tmp_path):
    from flix.serve.agreement import flix_greedy, server_greedy
    from flix.serve.server import LlamaServer

    model, tok, export, manifest, base = served
    prompt = tok("Task: ner. Text: Amina alikwenda Nairobi.", add_special_tokens=False)["input_ids"]
    with LlamaServer(base, export, log=tmp_path / "server.log", threads=1, exact=True) as url:
        for features in COMBINATIONS:
            ours = flix_greedy(model, prompt, features, 12, {tok.eos_token_id})
            theirs = server_greedy(url, prompt, client.lora_list(manifest, features), 12, {tok.eos_token_id})
            assert theirs == ours, features


def test_parting_reports_both_sides_margins_where_greedy_outputs_part():
    from benchmarks.serving_run import parting

    flix_lp = torch.log_softmax(torch.tensor([0.0, 2.0, 1.9, -1.0]), dim=-1)  # flix: 1, then 2 (0.1 apart); 0 is a stop token
    row = parting(flix_lp, 2, {2: -0.60, 1: -0.65, 3: -3.0}, {0})  # the server took 2; asked again, 2 is 0.05 above 1
    assert (row["flix_token"], row["flix_second"], row["server_token"], row["server_again_token"]) == (1, 2, 2, 2)
    assert row["server_took_flix_second"] and row["flix_margin"] == pytest.approx(0.1, abs=1e-6)
    assert row["flix_gap_to_server_token"] == pytest.approx(0.1, abs=1e-6)
    assert row["server_again_margin"] == pytest.approx(0.05) and row["server_again_gap_to_flix_token"] == pytest.approx(0.05)
    stopped = parting(flix_lp, None, {1: -0.1, 3: -2.0}, {0})  # the server stopped; asked again, it ranks flix's token first
    assert stopped["server_token"] == "stop" and not stopped["server_took_flix_second"]
    assert stopped["flix_gap_to_server_token"] == pytest.approx(2.0, abs=1e-6) and stopped["server_again_gap_to_flix_token"] == 0.0
    assert parting(flix_lp, 2, {3: -0.1, 2: -2.0}, {0})["server_again_gap_to_flix_token"] is None  # flix's token not in the list
    assert parting(flix_lp, 2, None, {0})["server_again_token"] is None  # the server held its reply back


def test_flix_outputs_resume_from_the_cache_index_by_index(tmp_path, monkeypatch):
    from benchmarks import serving_run
    from flix.serve.agreement import Case

    made = []
    monkeypatch.setattr(serving_run, "flix_greedy", lambda model, prompt, features, max_new, stop: made.append(prompt) or prompt)
    cases = [Case({"task": "ner", "lang": lang}, [k, i], []) for k, lang in enumerate(["am", "ee"]) for i in range(3)]
    cache = tmp_path / "flix.json"
    cache.write_text(json.dumps({json.dumps(["task=ner,lang=ee", 0]): [1, 0]}))  # one kept from an earlier run
    ours = serving_run.flix_outputs(None, cases, set(), cache)
    assert made == [[0, 0], [0, 1], [1, 1], [0, 2], [1, 2]]  # index by index across the combinations, the kept one skipped
    assert ours[("task=ner,lang=am", 2)] == [0, 2] and ours[("task=ner,lang=ee", 0)] == [1, 0]
    assert len(json.loads(cache.read_text())) == 6
    made.clear()
    assert serving_run.flix_outputs(None, cases, set(), cache) == ours and made == []


def test_flix_margins_are_the_smallest_top_two_gap_along_each_greedy_path(monkeypatch):
    from benchmarks import serving_run
    from flix.serve.agreement import Case

    lp = torch.log_softmax(torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.8, 0.0], [2.0, 0.0, 0.0]]), dim=-1)
    seen = []
    monkeypatch.setattr(serving_run, "flix_logprobs", lambda model, case: seen.append(case.target) or lp[: len(case.target)])
    cases = [Case({"task": "ner", "lang": "am"}, [5], [])] * 2
    ours = {("task=ner,lang=am", 0): [7, 8], ("task=ner,lang=am", 1): []}
    margins = serving_run.flix_margins(None, cases, ours)
    assert margins["task=ner,lang=am"][0] == pytest.approx(0.2, abs=1e-6)  # the second step's near-tie
    assert seen[0] == [7, 8, 0]  # flix stopped after two tokens: the stop's position counts
    assert seen[1] == [0] and margins["task=ner,lang=am"][1] == pytest.approx(3.0, abs=1e-5)  # stopped at once


def test_summarise_counts_what_the_differing_examples_share():
    from benchmarks.serving_run import summarise

    rows = [
        {"flix_margin": 0.02, "server_took_flix_second": True, "server_again_token": 7, "flix_token": 7},
        {"flix_margin": 0.30, "server_took_flix_second": False, "server_again_token": "stop", "flix_token": 7},
        {"flix_margin": 0.10, "server_took_flix_second": True, "server_again_token": "stop", "flix_token": "stop"},
    ]
    assert summarise(rows) == {
        "examples": 3,
        "flix_margin_median": 0.10,
        "flix_margin_max": 0.30,
        "server_took_flix_second": 2,
        "server_again_ranks_flix_token_first": 2,
    }
    assert summarise([])["flix_margin_median"] is None


def test_differ_by_margin_bins_each_example_by_flix_smallest_margin():
    from benchmarks.serving_run import differ_by_margin

    margins = {"task=ner,lang=am": [0.01, 0.07, 0.2, 2.0], "task=ner,lang=ee": [0.04, 0.6]}
    greedy = {"task=ner,lang=am": {"differences": [{"index": 0}, {"index": 2}]}, "task=ner,lang=ee": {"differences": []}}
    assert differ_by_margin(margins, greedy) == {"0.0-0.05": [1, 2], "0.05-0.1": [0, 1], "0.1-0.5": [1, 1], "0.5-inf": [0, 2]}
