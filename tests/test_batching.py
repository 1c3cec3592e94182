"""Training tensors and the loss: causal models learn only the target tokens, padding and
the trimmed logits change nothing, and accumulation over micro-batches is one big batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flix.base_models import load_model
from flix.data.reader import read_dataset
from flix.pipeline.batching import IGNORE, TextLimits, loss_sum, position_ids, training_batch

REPO = Path(__file__).resolve().parents[1]
LIMITS = TextLimits(max_prompt_tokens=96, max_target_tokens=12, max_context_chars=120)


@pytest.fixture(scope="module")
def examples(data_root):
    """Real examples of different lengths, so the batch is padded."""
    return read_dataset(data_root, "ner", "train", "sw", limit=2) + read_dataset(data_root, "qa_in_lang", "train", "sw", limit=2)


def test_causal_loss_is_the_target_tokens_cross_entropy(examples):
    model, tokenizer = load_model({"name": "tiny"})
    batch = training_batch(examples, tokenizer, LIMITS, seq2seq=False)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1  # really padded

    expected, targets = 0.0, 0
    for i, ex in enumerate(examples):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]  # the example alone, unpadded
        target = tokenizer(" " + ex.target, add_special_tokens=False)["input_ids"][: LIMITS.max_target_tokens] + [tokenizer.eos_token_id]
        assert ids[-len(target) :].tolist() == target  # the sequence ends with target + eos
        labels = batch["labels"][i]
        assert labels[labels != IGNORE].tolist() == target  # and only those are labels
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0]  # every position's logits
        expected += F.cross_entropy(logits[-len(target) - 1 : -1], torch.tensor(target), reduction="sum").item()
        targets += len(target)

    with torch.no_grad():
        got = loss_sum(model, {k: v for k, v in batch.items() if k != "num_targets"}, seq2seq=False).item()
    assert batch["num_targets"] == targets
    assert got == pytest.approx(expected, rel=1e-5)


def test_seq2seq_loss_is_the_models_own_summed_loss(examples):
    model, tokenizer = load_model({"name": "tiny_seq2seq"})
    batch = training_batch(examples, tokenizer, LIMITS, seq2seq=True)
    tensors = {k: v for k, v in batch.items() if k != "num_targets"}
    with torch.no_grad():
        got = loss_sum(model, tensors, seq2seq=True).item()
        mean = model(**tensors).loss.item()  # transformers averages over the non-ignored labels
    assert got == pytest.approx(mean * batch["num_targets"], rel=1e-5)


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_micro_batches_accumulate_to_the_full_batch(compose, tmp_path):
    """Gradient accumulation: 4 micro-batches of 2 train exactly as one batch of 8."""
    from flix.pipeline.run_config import load_mixture_for
    from flix.pipeline.trainer import Trainer

    states, losses = {}, {}
    for micro in (8, 2):
        cfg = compose("mixture=multitask_sw", "dropout=0.0", "scale.batch_size=8", f"scale.micro_batch_size={micro}")
        trainer = Trainer.from_config(cfg, load_mixture_for(cfg), tmp_path / str(micro))
        losses[micro] = [trainer.train_step(step)[0] for step in range(3)]
        states[micro] = trainer.model.adapter_state_dict()
    assert losses[2] == pytest.approx(losses[8], rel=1e-5)
    for name, value in states[8].items():
        # Adam divides by sqrt(v): float-order noise in a near-zero gradient can move its value by
        # a fraction of one step (lr 3e-3): 4e-4 seen in 1 of 576 values; the losses above are exact
        torch.testing.assert_close(states[2][name], value, rtol=1e-4, atol=1e-3)
    assert any(v.abs().sum() > 0 for k, v in states[8].items() if "flix_B" in k)  # it did learn


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    from flix.optim import lr_lambda

    factor = lr_lambda(warmup=4, total=20)
    values = [factor(step) for step in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[-1] == pytest.approx(0.1)


def test_help_lists_every_group_and_option():
    out = subprocess.run([sys.executable, "-m", "flix.train", "--help"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    for group in ("method", "mixture", "rank", "model", "data", "scale", "logger"):
        options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in out, group
    assert "dropout: 0.7" in out and "seed: 0" in out
