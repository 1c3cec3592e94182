"""FLix in users' own training code: routing as data (FLixDataCollator, `flix_features`),
transformers.Trainer and Seq2SeqTrainer with mixed batches, checkpoints, gradient
checkpointing, merging and export, on the tiny random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from flix import FLixConfig, FLixDataCollator, get_flix_model
from flix.base_models import load_model
from flix.export import export_all
from flix.pipeline.export_command import main as export_main

FEATURES = {"task": ["ner", "qa", "sp"], "lang": ["sw", "yo", "bn"]}
SEEN = [("ner", "sw"), ("qa", "yo"), ("ner", "yo"), ("qa", "sw")]  # sp and bn never appear


def flix(name: str = "tiny", dropout: float = 0.0):
    torch.manual_seed(0)
    model = get_flix_model(load_model({"name": name})[0], FLixConfig(features=FEATURES, ranks={"task": 4, "lang": 2}, feature_dropout=dropout))
    with torch.no_grad():  # trained-looking banks: B = 0 would hide routing mistakes
        for layer in model.flix_layers().values():
            layer.flix_B.normal_(0, 0.2)
            layer.flix_B[0].zero_()
    return model


def dataset(n: int = 16, length: int = 10) -> Dataset:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (n, length), generator=gen).tolist()
    task, lang = zip(*(SEEN[i % len(SEEN)] for i in range(n)))
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "task": list(task), "lang": list(lang)})


def args(tmp_path, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **overrides})


def train(tmp_path, model=None, **overrides):
    model = model or flix()
    Trainer(model=model, args=args(tmp_path, **overrides), train_dataset=dataset(), data_collator=FLixDataCollator(model)).train()
    return model


def banks(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


def test_flix_features_in_a_batch_equal_routing_each_example_alone():
    model = flix().eval()
    data = dataset(6)
    batch = FLixDataCollator(model)([data[i] for i in range(6)])
    assert batch["flix_features"].shape == (6, 2) and "task" not in batch
    together = model(**batch).logits
    alone = []
    for i in range(6):
        with model.route([{"task": data[i]["task"], "lang": data[i]["lang"]}]):
            alone.append(model(input_ids=batch["input_ids"][i : i + 1]).logits)
    torch.testing.assert_close(together, torch.cat(alone))
    by_keywords = model(input_ids=batch["input_ids"], task=data["task"][:6], lang=data["lang"][:6]).logits
    torch.testing.assert_close(by_keywords, together)
    with pytest.raises(RuntimeError, match="flix_features"):  # no features: a clear error, not the last batch's rows
        model(input_ids=batch["input_ids"])


def test_trainer_keeps_feature_columns_and_trains_only_the_features_it_saw(tmp_path):
    model = flix()
    before = banks(model)
    train(tmp_path, model)  # remove_unused_columns=True, the default: task and lang must survive it
    space = model.flix_config.space
    seen = {r for group, value in [("task", "ner"), ("task", "qa"), ("lang", "sw"), ("lang", "yo")] for r in space.rows_of(group, value)}
    unseen = set(space.rows_of("task", "sp") + space.rows_of("lang", "bn")) | {0}
    for key, after in model.adapter_state_dict().items():
        changed = {i for i in range(after.shape[0]) if not torch.equal(after[i], before[key][i])}
        assert changed == seen and not changed & unseen, key
    assert sorted((c["task"], c["lang"]) for c in model.trained_combinations) == sorted(SEEN)


def test_gradient_accumulation_equals_one_batch(tmp_path):
    one = train(tmp_path / "one", per_device_train_batch_size=4)
    accumulated = train(tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    # float32 sums in another order differ by ~1e-7 relative, and Adam scales every
    # coordinate's step to ~lr (1e-2) whatever its gradient's size; an accumulation that
    # lost or doubled a micro-batch would be off by ~lr.
    for key, value in one.adapter_state_dict().items():
        torch.testing.assert_close(accumulated.adapter_state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_trains_as_without(tmp_path):
    """Checkpointing recomputes the layers in backward, after forward returned: the
    batch's rows must still be routed then."""
    plain = train(tmp_path / "plain")
    checkpointed = train(tmp_path / "ckpt", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    for key, value in plain.adapter_state_dict().items():
        torch.testing.assert_close(checkpointed.adapter_state_dict()[key], value, rtol=1e-4, atol=1e-6)


def test_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    full = train(tmp_path / "full", save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all(k.endswith((".flix_A", ".flix_B")) for k in saved), "the adapter only, not the frozen base"
    resumed = flix()
    Trainer(
        model=resumed,
        args=args(tmp_path / "full", save_strategy="steps", save_steps=2),
        train_dataset=dataset(),
        data_collator=FLixDataCollator(resumed),
    ).train(resume_from_checkpoint=str(checkpoint))
    for key, value in full.adapter_state_dict().items():
        torch.testing.assert_close(resumed.adapter_state_dict()[key], value)


def test_feature_dropout_applies_in_training_only():
    model = flix(dropout=0.7)
    batch = FLixDataCollator(model)([dataset(8)[i] for i in range(8)])
    model.eval()
    assert torch.equal(model(**batch).logits, model(**batch).logits)
    model.train()
    torch.manual_seed(3)
    model(**batch)
    dropped = (model.router.rows == 0).any()
    assert dropped, "p = 0.7 over 16 features drops some"


def test_seq2seq_trainer_predicts_with_generate_per_example(tmp_path):
    model = flix("tiny_seq2seq").eval()
    data = dataset(4).remove_columns("labels")
    trainer = Seq2SeqTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True, per_device_eval_batch_size=4, report_to=[], use_cpu=True),
        data_collator=FLixDataCollator(model),
    )
    predicted = trainer.predict(data, max_new_tokens=5).predictions
    for i in range(4):
        with model.route([{"task": data[i]["task"], "lang": data[i]["lang"]}]):
            alone = model.generate(input_ids=torch.tensor([data[i]["input_ids"]]), max_new_tokens=5)
        assert predicted[i][: alone.shape[1]].tolist() == alone[0].tolist()


def test_merged_and_exported_adapters_reproduce_their_combination(tmp_path, capsys):
    from peft import PeftModel

    model = train(tmp_path / "t").eval()
    ids = torch.tensor(dataset(2)["input_ids"])
    combo = {"task": "qa", "lang": "sw"}
    with model.route([combo, combo]):
        expected = model(input_ids=ids).logits
    out = export_all(model, tmp_path / "export")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_lora_rank"] == 6 and len(manifest["adapters"]) == len(SEEN)
    (entry,) = [e for e in manifest["adapters"] if e["features"] == combo]
    peft = PeftModel.from_pretrained(load_model({"name": "tiny"})[0], str(out / entry["path"])).eval()
    torch.testing.assert_close(peft(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path / "adapter")  # trained combinations travel with the adapter
    assert export_main([str(tmp_path / "adapter"), str(tmp_path / "cli"), "--model", "tiny"]) == 0
    assert f"{len(SEEN)} peft adapter(s)" in capsys.readouterr().out
    assert export_main([str(tmp_path / "nothing"), str(tmp_path / "cli2"), "--model", "tiny"]) == 2

    merged = model.merge_and_unload(combo)
    assert not any("flix" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_trl_sft_trainer_trains_flix(tmp_path):
    """TRL replaces the model's forward with a fused LM head that needs the Hugging Face
    model itself: give it model.base_model, which routes by `flix_features` too. TRL
    names its own columns, so the feature columns need remove_unused_columns=False."""
    trl = pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = flix()
    before = banks(model)
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
    )
    tokenizer = load_model({"name": "tiny"})[1]
    collator = FLixDataCollator(model, DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id))
    trl.SFTTrainer(
        model=model.base_model, args=config, train_dataset=dataset().remove_columns("labels"), processing_class=tokenizer, data_collator=collator
    ).train()
    changed = [k for k, v in model.adapter_state_dict().items() if not torch.equal(v, before[k])]
    assert changed and sorted((c["task"], c["lang"]) for c in model.trained_combinations) == sorted(SEEN)


def test_unknown_or_missing_features_route_with_the_rest():
    model = flix().eval()
    ids = torch.tensor(dataset(3)["input_ids"])
    rows = [{"input_ids": ids[0].tolist(), "task": "ner", "lang": "zz"}, {"input_ids": ids[1].tolist(), "task": "qa", "lang": None}]
    batch = FLixDataCollator(model)(rows)
    with model.route([{"task": "ner"}, {"task": "qa"}]):  # the task feature alone
        expected = model(input_ids=ids[:2]).logits
    torch.testing.assert_close(model(**batch).logits, expected)


def test_an_accelerate_loop_routes_from_the_batch():
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    model = flix()
    before = banks(model)
    accelerator = Accelerator(cpu=True)
    # weight_decay=0: torch's decay would shrink every row each step, seen or not
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loader = DataLoader(dataset(), batch_size=4, collate_fn=FLixDataCollator(model))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    space = model.flix_config.space
    unseen = space.rows_of("task", "sp") + space.rows_of("lang", "bn")
    for key, after in model.adapter_state_dict().items():
        assert not torch.equal(after, before[key]) and torch.equal(after[unseen], before[key][unseen]), key
    assert sorted((c["task"], c["lang"]) for c in model.trained_combinations) == sorted(SEEN)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_hf_trainer import FLixDataCollator, Trainer, args, banks, dataset, flix
model = flix()
before = banks(model)
Trainer(model=model, args=args({out!r}, per_device_train_batch_size=2, ddp_backend="gloo"), train_dataset=dataset(),
        data_collator=FLixDataCollator(model)).train()
rank = torch.distributed.get_rank()
torch.save({{"before": before, "after": banks(model)}}, {out!r} + f"/rank{{rank}}.pt")
"""


@pytest.mark.slow
def test_trainer_under_torchrun_ddp_keeps_the_ranks_equal(tmp_path):
    """Two CPU processes (gloo): the id tensor in the batch survives DDP, both ranks end
    with the same banks, trained rows moved and never-seen ones did not."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    space = flix().flix_config.space
    unseen = space.rows_of("task", "sp") + space.rows_of("lang", "bn")
    for key, after in ranks[0]["after"].items():
        assert torch.equal(after, ranks[1]["after"][key]), key
        assert not torch.equal(after, ranks[0]["before"][key]) and torch.equal(after[unseen], ranks[0]["before"][key][unseen]), key


def test_a_feature_group_named_like_a_model_argument_is_refused():
    with pytest.raises(ValueError, match="labels.*rename the group"):
        get_flix_model(load_model({"name": "tiny"})[0], FLixConfig(features={"labels": ["a"]}, ranks={"labels": 2}))


def test_trainer_bf16_autocast_keeps_float32_banks(tmp_path):
    """bf16=True runs the step under autocast (as on a GPU); the banks and their
    optimizer state stay float32 and still train."""
    model = flix()
    before = banks(model)
    train(tmp_path, model, bf16=True)
    after = model.adapter_state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())
    assert all(torch.isfinite(v).all() for v in after.values()) and any(not torch.equal(v, before[k]) for k, v in after.items())
