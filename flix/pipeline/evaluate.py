"""Scoring a model on evaluation sets: batched greedy generation scored with the official
metrics, and the gold targets' teacher-forced log-likelihood (a second, low-variance
metric: mean nats per target token, lower is better)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from flix.data import Example
from flix.data.formatting import TARGET_MAX_TOKENS
from flix.metrics import score
from flix.pipeline.batching import TextLimits, generation_batch, prompt_tokens, step_batches, target_nll

Dataset = tuple[str, str]  # (task, lang)


def max_new_tokens(task: str, limits: TextLimits) -> int:
    """Greedy tokens allowed for a task's examples: its target limit under `limits`, plus one for the stop."""
    return min(TARGET_MAX_TOKENS.get(task, limits.max_target_tokens), limits.max_target_tokens) + 1


@torch.no_grad()
def predict(model, tokenizer, examples: list[Example], limits: TextLimits, batch_size: int, seq2seq: bool, device) -> list[str]:
    """Greedy outputs for one dataset's examples, in their order; each batch routes its
    examples' own features (an unseen language falls back to the task feature by itself).
    Batches hold prompts of similar length (longest first), so few positions are padding."""
    max_new = max_new_tokens(examples[0].task, limits)
    lengths = [len(ids) for ids in prompt_tokens(examples, tokenizer, limits, seq2seq)]
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    outputs: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", leave=False, disable=len(order) <= batch_size):
        positions = order[start : start + batch_size]
        chunk = [examples[i] for i in positions]
        batch = {k: v.to(device) for k, v in generation_batch(chunk, tokenizer, limits, seq2seq).items()}
        with model.route([ex.features for ex in chunk]):
            generated = model.generate(
                **batch,
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = generated if seq2seq else generated[:, batch["input_ids"].shape[1] :]
        outputs.update(zip(positions, (text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))))
    return [outputs[i] for i in range(len(examples))]


@torch.no_grad()
def example_nll(
    model, tokenizer, examples: list[Example], limits: TextLimits, batch_size: int, seq2seq: bool, device, packed: bool = False
) -> list[float]:
    """Each example's gold-target NLL (`flix.pipeline.batching.target_nll`), in the examples' order;
    batches of `batch_size` examples of similar length, prompts formatted as for generation.
    `packed` (a causal model that packs exactly: `flix.packing.packs_exactly`): the
    examples packed into rows instead, at most `batch_size` rows of the longest possible
    example a batch, no padding between them; the same values to float rounding."""
    out = [0.0] * len(examples)
    for part, batch in step_batches(examples, tokenizer, limits, seq2seq, batch_size, packed=packed and not seq2seq, train=False):
        tensors = {k: v.to(device) for k, v in batch.items() if k not in ("num_targets", "token_examples")}
        tokens = batch.get("token_examples")  # packed rows: each position's example (routing and the per-example split)
        with model.route([examples[i].features for i in part], token_examples=tokens):
            values = target_nll(model, tensors if tokens is None else {**tensors, "token_examples": tokens}, seq2seq)
        for i, value in zip(part, values):
            out[i] = value
    return out


@dataclass
class Evaluation:
    """One evaluation pass: {task: {lang: ...}} of the paper's metric and of the mean
    target NLL, each example's NLL, and the predictions per dataset."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    nll: dict[str, dict[str, float]] = field(default_factory=dict)
    example_nll: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    predictions: dict[Dataset, list[str]] = field(default_factory=dict)


def evaluate(
    model,
    tokenizer,
    datasets: dict[Dataset, list[Example]],
    limits: TextLimits,
    batch_size: int,
    seq2seq: bool,
    device,
    desc: str = "eval",
    generate: dict[Dataset, list[Example]] | None = None,
    packed: bool = False,
) -> Evaluation:
    """The gold targets' NLL on every dataset (on packed rows with `packed`: see
    `example_nll`), and greedy predictions scored with the paper's metric on `generate`
    (its examples per dataset; the same as `datasets` when not given; {} for none: a
    validation by NLL alone)."""
    generate = datasets if generate is None else generate
    was_training = model.training
    model.eval()
    result = Evaluation()
    generate = {key: prompted for key, prompted in generate.items() if key in datasets}
    for (task, lang), prompted in tqdm(generate.items(), desc=desc, unit="dataset", leave=False, disable=not generate):
        preds = predict(model, tokenizer, prompted, limits, batch_size, seq2seq, device)
        result.predictions[(task, lang)] = preds
        result.scores.setdefault(task, {})[lang] = score(task, [ex.target for ex in prompted], preds)
    # every dataset's NLL in one pass: examples of different datasets share micro-batches (and
    # packed rows), each routed by its own features
    pooled = [ex for examples in datasets.values() for ex in examples]
    values = iter(example_nll(model, tokenizer, pooled, limits, batch_size, seq2seq, device, packed))
    for (task, lang), examples in datasets.items():
        nll = [next(values) for _ in examples]
        result.example_nll.setdefault(task, {})[lang] = nll
        result.nll.setdefault(task, {})[lang] = float(np.mean(nll))
    model.train(was_training)
    return result
