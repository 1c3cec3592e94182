"""Batched greedy generation and scoring with the official metrics."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from flix.batching import TextLimits, generation_batch
from flix.data import Example
from flix.data.formatting import TARGET_MAX_TOKENS
from flix.metrics import score

Dataset = tuple[str, str]  # (task, lang)


@torch.no_grad()
def predict(model, tokenizer, examples: list[Example], limits: TextLimits, batch_size: int, seq2seq: bool, device) -> list[str]:
    """Greedy outputs for one dataset's examples; each batch routes its examples' own
    features (an unseen language falls back to the task feature by itself)."""
    max_new = min(TARGET_MAX_TOKENS.get(examples[0].task, limits.max_target_tokens), limits.max_target_tokens) + 1
    outputs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
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
        outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return outputs


def evaluate(
    model, tokenizer, datasets: dict[Dataset, list[Example]], limits: TextLimits, batch_size: int, seq2seq: bool, device, desc: str = "eval"
) -> tuple[dict[str, dict[str, float]], dict[Dataset, list[str]]]:
    """Scores {task: {lang: score}} and predictions for every dataset."""
    was_training = model.training
    model.eval()
    scores: dict[str, dict[str, float]] = {}
    predictions: dict[Dataset, list[str]] = {}
    for (task, lang), examples in tqdm(datasets.items(), desc=desc, unit="dataset", leave=False):
        preds = predict(model, tokenizer, examples, limits, batch_size, seq2seq, device)
        predictions[(task, lang)] = preds
        scores.setdefault(task, {})[lang] = score(task, [ex.target for ex in examples], preds)
    model.train(was_training)
    return scores, predictions
