"""The work of `python -m benchmarks.serving` (options and what it measures: benchmarks/serving.py)."""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from flix.base_models import load_model
from flix.data.formatting import TARGET_MAX_TOKENS
from flix.data.sampling import read_split
from flix.export import merge_and_unload
from flix.model import FLixModel
from flix.pipeline.batching import TextLimits, _targets, prompt_tokens
from flix.serve.agreement import Case, compare, first_difference, flix_greedy, flix_logprobs, server_greedy
from flix.serve.client import complete, lora_list, read_manifest
from flix.serve.server import LlamaServer

TEST_SAMPLE = 48  # conf/scale/cpu_long.yaml's test_examples
LIMITS = TextLimits(max_prompt_tokens=160, max_target_tokens=32, max_context_chars=600)  # the cpu scales' (conf/scale/cpu_long.yaml)


def key(features: dict) -> str:
    return ",".join(f"{g}={v}" for g, v in features.items())


def test_cases(model, tok, root: Path, n: int) -> list[Case]:
    """The first n of each trained combination's fixed test sample (the cpu scales' 48 greedy
    examples per language), formatted as evaluation formats them."""
    cases = []
    for combo in model.trained_combinations:
        examples = read_split(root, [(combo["task"], combo["lang"])], "test", limit=TEST_SAMPLE)[(combo["task"], combo["lang"])][:n]
        prompts, targets = prompt_tokens(examples, tok, LIMITS, seq2seq=False), _targets(examples, tok, LIMITS)
        cases += [Case(combo, p, t) for p, t in zip(prompts, targets)]
    return cases


def agreement(args, model, tok, manifest, cases, base: Path, ours: dict, stop: set[int]) -> dict:
    by_combo: dict[str, list[Case]] = {}
    for case in cases:
        by_combo.setdefault(key(case.features), []).append(case)
    out: dict = {"base": str(base), "teacher_forced": {}, "greedy": {}}
    with LlamaServer(base, args.export, log=Path(args.export) / "server-agreement.log", threads=args.threads, exact=True) as url:
        for name, group in by_combo.items():
            result = compare(model, url, manifest, group[: args.forced], args.n_probs)
            out["teacher_forced"][name] = {k: v for k, v in result.items() if k != "per_case_max"}
            print(
                f"  {base.name} {name}: teacher-forced max |dlogp| {result['max_abs_logprob_diff']:.4f}, top-1 {result['top1_agreement']:.3f}",
                flush=True,
            )
        for name, group in by_combo.items():
            rows = []
            for i, case in enumerate(group):
                max_new = min(TARGET_MAX_TOKENS.get(case.features["task"], LIMITS.max_target_tokens), LIMITS.max_target_tokens) + 1
                theirs = server_greedy(url, case.prompt, lora_list(manifest, case.features), max_new, stop)
                mine = ours[(name, i)]
                at = first_difference(mine, theirs)
                row = {"equal": at is None, "text_equal": tok.decode(mine) == tok.decode(theirs)}
                if at is not None:  # flix's own margin between its top two tokens where the outputs part
                    lp = flix_logprobs(model, Case(case.features, case.prompt, mine[: at + 1] if at < len(mine) else mine + [0]))[at]
                    top2 = lp.topk(2)
                    row |= {
                        "at": at,
                        "flix_margin": float(top2.values[0] - top2.values[1]),
                        "server_took_flix_second": at < len(theirs) and theirs[at] == int(top2.indices[1]),
                    }
                rows.append(row)
            equal = sum(r["equal"] for r in rows)
            out["greedy"][name] = {
                "examples": len(rows),
                "equal": equal,
                "text_equal": sum(r["text_equal"] for r in rows),
                "differences": [r for r in rows if not r["equal"]],
            }
            print(f"  {base.name} {name}: greedy equal {equal}/{len(rows)}", flush=True)
    return out


def throughput(args, model, tok, manifest, cases, base: Path) -> dict:
    """The same mixed-combination requests (each exactly new_tokens generated) through the
    server (parallel clients), flix's generate (mixed batches) and merged models (one per
    combination, requests grouped by it)."""
    rng = random.Random(0)
    requests = [rng.choice(cases) for _ in range(args.throughput)]
    n, new = len(requests), args.new_tokens
    out = {"requests": n, "new_tokens_each": new, "parallel": args.parallel, "threads": args.threads}

    def flix_batches(m, reqs, route: bool) -> None:
        for s in range(0, len(reqs), args.parallel):
            chunk = reqs[s : s + args.parallel]
            width = max(len(c.prompt) for c in chunk)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(c.prompt)) + c.prompt for c in chunk])
            mask = torch.tensor([[0] * (width - len(c.prompt)) + [1] * len(c.prompt) for c in chunk])
            kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
            with torch.no_grad():
                if route:
                    with m.route([c.features for c in chunk]):
                        m.generate(**kwargs)
                else:
                    m.generate(**kwargs)

    with LlamaServer(
        base, args.export, log=Path(args.export) / "server-throughput.log", threads=args.threads, parallel=args.parallel, ctx=512 * args.parallel
    ) as url:
        send = lambda c: complete(url, c.prompt, lora_list(manifest, c.features), n_predict=new, ignore_eos=True, cache_prompt=False)  # noqa: E731
        send(requests[0])  # warm-up
        started = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            replies = list(pool.map(send, requests))
        seconds = time.perf_counter() - started
        tokens = sum(r["tokens_predicted"] for r in replies)
    out["llama_server"] = {"base": base.name, "seconds": seconds, "requests_per_s": n / seconds, "tokens_per_s": tokens / seconds}
    print(f"  llama-server ({base.name}): {n / seconds:.2f} req/s, {tokens / seconds:.1f} tok/s", flush=True)
    flix_batches(model, requests[:1], True)  # warm-up
    started = time.perf_counter()
    flix_batches(model, requests, True)
    seconds = time.perf_counter() - started
    out["flix_generate"] = {"seconds": seconds, "requests_per_s": n / seconds, "tokens_per_s": n * new / seconds}
    print(f"  flix generate (mixed batches of {args.parallel}): {n / seconds:.2f} req/s, {n * new / seconds:.1f} tok/s", flush=True)
    groups: dict[str, list[Case]] = {}
    for c in requests:
        groups.setdefault(key(c.features), []).append(c)
    seconds, merge_seconds = 0.0, 0.0
    for name, reqs in groups.items():
        started = time.perf_counter()
        merged = merge_and_unload(FLixModel.from_pretrained(load_model({"name": args.model})[0], args.adapter), reqs[0].features)
        merge_seconds += time.perf_counter() - started
        flix_batches(merged, reqs[:1], False)  # warm-up
        started = time.perf_counter()
        flix_batches(merged, reqs, False)
        seconds += time.perf_counter() - started
        del merged
    out["merged_per_combination"] = {
        "seconds": seconds,
        "requests_per_s": n / seconds,
        "tokens_per_s": n * new / seconds,
        "load_and_merge_seconds": merge_seconds,
    }
    print(
        f"  merged model per combination ({len(groups)}): {n / seconds:.2f} req/s, {n * new / seconds:.1f} tok/s (load+merge {merge_seconds:.0f} s)",
        flush=True,
    )
    return out


def flix_outputs(model, cases: list[Case], stop: set[int], cache: Path | None) -> dict:
    """flix's greedy tokens per (combination, index), kept in `cache` (JSON) when given: they
    do not depend on the server's base, and a rerun need not generate them again."""
    if cache and cache.is_file():
        kept = {tuple(json.loads(k)): v for k, v in json.loads(cache.read_text()).items()}
        counts: dict[str, int] = {}
        for case in cases:
            counts[key(case.features)] = counts.get(key(case.features), 0) + 1
        if all((name, i) in kept for name, n in counts.items() for i in range(n)):
            return kept
    started, ours, counters = time.perf_counter(), {}, {}
    for case in cases:
        name = key(case.features)
        i = counters[name] = counters.get(name, -1) + 1
        max_new = min(TARGET_MAX_TOKENS.get(case.features["task"], LIMITS.max_target_tokens), LIMITS.max_target_tokens) + 1
        ours[(name, i)] = flix_greedy(model, case.prompt, case.features, max_new, stop)
    print(f"flix greedy on {len(cases)} examples: {time.perf_counter() - started:.0f} s", flush=True)
    if cache:
        cache.write_text(json.dumps({json.dumps(list(k)): v for k, v in ours.items()}))
    return ours


def run(args) -> int:
    torch.set_num_threads(args.threads)
    root = Path(args.data or os.environ["FLIX_DATA_ROOT"])
    model = FLixModel.from_pretrained(load_model({"name": args.model})[0], args.adapter).eval()
    tok = load_model({"name": args.model})[1]
    manifest = read_manifest(args.export)
    cases = test_cases(model, tok, root, args.examples)
    stop = {tok.eos_token_id} | ({tok.convert_tokens_to_ids("<end_of_turn>")} - {tok.unk_token_id, None})
    result: dict = {"adapter": str(args.adapter), "examples_per_combination": args.examples, "stop_tokens": sorted(stop), "bases": []}
    if args.examples:
        ours = flix_outputs(model, cases, stop, args.flix_cache)
        if args.only_flix:
            return 0
        for base in args.base:
            result["bases"].append(agreement(args, model, tok, manifest, cases, base, ours, stop))
    if args.throughput:
        result["throughput"] = throughput(args, model, tok, manifest, cases, args.base[0])
    result["median_prompt_tokens"] = statistics.median(len(c.prompt) for c in cases)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
