"""`python -m benchmarks.positions`: computed / real input positions of a scale's training
steps, as `Trainer.train_step` builds its micro-batches (`flix.pipeline.batching.step_batches`:
the scale's sampler and seed, its tokenizer and budgets), three ways:

    rows      length-sorted micro-batches of scale.micro_batch_size rows (before packing)
    budget    length-sorted padded micro-batches by the token budget (runs that cannot pack)
    packed    several examples per row (flix.packing), by the token budget

The budget is scale.tokens_per_micro_batch (--tokens overrides it; default, as
step_batches: micro_batch_size rows of the longest possible example). Counts only: nothing is
timed (`flix bench run` times the step packed and padded).
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.positions", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides (default: scale=cpu mixture=multilingual_ner)")
    p.add_argument("--steps", type=int, help="steps counted (default: the scale's)")
    p.add_argument("--tokens", type=int, help="token budget per micro-batch (default: the scale's)")
    args = p.parse_args(argv)
    from flix.base_models import load_model, model_kind
    from flix.data.reader import resolve_root
    from flix.data.sampling import MixtureSampler, read_split
    from flix.pipeline.batching import TextLimits, padding_fraction, step_batches
    from flix.pipeline.run_config import compose, load_mixture_for

    cfg = compose(["scale=cpu", "mixture=multilingual_ner", *args.overrides])
    s, t = cfg.scale, cfg.train
    root, mixture = resolve_root(cfg.data.root), load_mixture_for(cfg)
    train = read_split(root, mixture.train_datasets, "train", None)
    sampler = MixtureSampler(train, s.batch_size, seed=cfg.seed, strategy=t.sampling, cap=t.cap, temperature=t.temperature)
    model, tokenizer = load_model(cfg.model)  # the tokenizer as runs load it (Gemma: seconds from the flix cache)
    seq2seq = model_kind(model) == "seq2seq"
    del model
    limits = TextLimits(s.max_prompt_tokens, s.max_target_tokens, s.max_context_chars)
    tokens = args.tokens or s.tokens_per_micro_batch
    ways = {"rows": {}, "budget": {"tokens": tokens}, "packed": {"tokens": tokens, "packed": True}}
    batches: dict[str, list] = {way: [] for way in ways}
    for step in range(args.steps or s.steps):
        examples = sampler.batch(step)
        for way, kw in ways.items():
            batches[way] += [b for _, b in step_batches(examples, tokenizer, limits, seq2seq, s.micro_batch_size, **kw)]
    report = {
        way: {"computed_per_real": round(1 / (1 - padding_fraction(b)), 4), "micro_batches_per_step": round(len(b) / (args.steps or s.steps), 2)}
        for way, b in batches.items()
    }
    print(
        json.dumps({"scale": s.name, "mixture": mixture.name, "steps": args.steps or s.steps, "tokens_per_micro_batch": tokens, **report}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
