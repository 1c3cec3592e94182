"""How closely llama-server's per-request adapter sums agree with flix's own model.

Teacher-forced: for each target position, flix's log-probabilities (one forward pass over
prompt + target, routed by the combination) beside the server's top-n log-probabilities
for the same prefix (one n_predict=1 request per position; the server keeps the prefix in
its cache, so each costs about one token). The server reports log-softmax values, not raw
logits: the comparison is of logits less their log-normaliser, which is what decides every
token's probability. Greedy: flix's generate and the server's completion, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flix.serve.client import complete, lora_list, next_logprobs


@dataclass
class Case:
    """One teacher-forced sequence: a combination, its prompt's and gold target's token ids."""

    features: dict
    prompt: list[int]
    target: list[int]


@torch.no_grad()
def flix_logprobs(model, case: Case) -> torch.Tensor:
    """(len(target), vocab) log-probabilities at the positions that predict the target."""
    ids = torch.tensor([case.prompt + case.target])
    with model.route([case.features]):
        logits = model(input_ids=ids).logits[0].float()
    start = len(case.prompt) - 1
    return torch.log_softmax(logits[start : start + len(case.target)], dim=-1)


def server_logprobs(url: str, lora: list[dict], case: Case, n_probs: int) -> list[dict[int, float] | None]:
    return [next_logprobs(url, case.prompt + case.target[:k], lora, n_probs) for k in range(len(case.target))]


def compare(model, url: str, manifest: dict, cases: list[Case], n_probs: int) -> dict:
    """Teacher-forced agreement over cases: the largest and median absolute difference of
    the server's top-n log-probabilities from flix's for the same tokens, and how often the
    two top tokens agree (with flix's margin between its top two where they do not)."""
    diffs, top_agree, positions, margins, withheld = [], 0, 0, [], 0
    per_case = []
    for case in cases:
        ours = flix_logprobs(model, case)
        theirs = server_logprobs(url, lora_list(manifest, case.features), case, n_probs)
        worst = 0.0
        for k, top in enumerate(theirs):
            if top is None:  # a byte token held back (client.next_logprobs): counted, not compared
                withheld += 1
                continue
            ids = torch.tensor(list(top))
            d = (torch.tensor(list(top.values())) - ours[k, ids]).abs()
            diffs.append(d)
            worst = max(worst, float(d.max()))
            best = max(top, key=top.get)
            positions += 1
            if best == int(ours[k].argmax()):
                top_agree += 1
            else:
                two = ours[k].topk(2).values
                margins.append(float(two[0] - two[1]))
        per_case.append(worst)
    every = torch.cat(diffs) if diffs else torch.zeros(1)
    return {
        "cases": len(cases),
        "positions": positions,
        "positions_withheld": withheld,
        "max_abs_logprob_diff": float(every.max()),
        "median_abs_logprob_diff": float(every.median()),
        "per_case_max": per_case,
        "top1_agreement": top_agree / max(positions, 1),
        "flix_margin_where_top1_differs": margins,
    }


def trim(tokens: list[int], stop: set[int]) -> list[int]:
    """Tokens up to (not including) the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


@torch.no_grad()
def flix_greedy(model, prompt: list[int], features: dict, max_new: int, stop: set[int]) -> list[int]:
    """flix's greedy continuation of one prompt (no padding), cut at the first stop token."""
    ids = torch.tensor([prompt])
    with model.route([features]):
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=sorted(stop)
        )
    return trim(out[0, len(prompt) :].tolist(), stop)


def server_greedy(url: str, prompt: list[int], lora: list[dict], max_new: int, stop: set[int]) -> list[int]:
    reply = complete(url, prompt, lora, n_predict=max_new, return_tokens=True)
    return trim([int(t) for t in reply["tokens"]], stop)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (or one ends), None where equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
