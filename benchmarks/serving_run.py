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
from flix.data.sampling import read_split
from flix.export import merge_and_unload
from flix.io import atomic_write_text
from flix.model import FLixModel
from flix.pipeline.batching import TextLimits, _targets, prompt_tokens
from flix.pipeline.evaluate import max_new_tokens
from flix.serve.agreement import Case, compare, first_difference, flix_greedy, flix_logprobs, server_greedy
from flix.serve.client import complete, lora_list, next_logprobs, read_manifest
from flix.serve.server import LlamaServer

TEST_SAMPLE = 48  # conf/scale/cpu.yaml's greedy sample (eval_sample of the test file; cpu_long draws its 48 from its 250-example NLL sample)
LIMITS = TextLimits(max_prompt_tokens=160, max_target_tokens=32, max_context_chars=600)  # the cpu scales' (conf/scale/cpu_long.yaml)


def key(features: dict) -> str:
    return ",".join(f"{g}={v}" for g, v in features.items())


def max_new_for(features: dict) -> int:
    """Greedy tokens allowed per example, as evaluation allows them under the cpu scales' limits."""
    return max_new_tokens(features["task"], LIMITS)


def test_cases(model, tok, root: Path, n: int) -> list[Case]:
    """The first n of each trained combination's fixed 48-example test sample
    (`eval_sample` of the test file: the cpu scale's greedy sample, not cpu_long's, which
    it draws from its 250-example NLL sample), formatted as evaluation formats them."""
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
    started = time.perf_counter()
    with LlamaServer(base, args.export, log=Path(args.export) / "server-agreement.log", threads=args.threads, exact=True) as url:
        for name, group in by_combo.items() if args.forced else ():
            result = compare(model, url, manifest, group[: args.forced], args.n_probs)
            out["teacher_forced"][name] = {k: v for k, v in result.items() if k != "per_case_max"}
            print(
                f"  {base.name} {name}: teacher-forced max |dlogp| {result['max_abs_logprob_diff']:.4f}, top-1 {result['top1_agreement']:.3f}",
                flush=True,
            )
        for name, group in by_combo.items():
            rows = []
            for i, case in enumerate(group):
                max_new = max_new_for(case.features)
                theirs = server_greedy(url, case.prompt, lora_list(manifest, case.features), max_new, stop)
                mine = ours[(name, i)]
                at = first_difference(mine, theirs)
                row = {"index": i, "equal": at is None, "text_equal": tok.decode(mine) == tok.decode(theirs)}
                if at is not None:  # both sides' log-probabilities where the outputs part
                    lp = flix_logprobs(model, Case(case.features, case.prompt, mine[: at + 1] if at < len(mine) else mine + [0]))[at]
                    took = theirs[at] if at < len(theirs) else None  # None: the server stopped there
                    again = next_logprobs(url, case.prompt + theirs[:at], lora_list(manifest, case.features), args.n_probs)
                    row |= {"at": at, **parting(lp, took, again, stop), "flix_text": tok.decode(mine), "server_text": tok.decode(theirs)}
                rows.append(row)
            equal = sum(r["equal"] for r in rows)
            out["greedy"][name] = {
                "examples": len(rows),
                "equal": equal,
                "text_equal": sum(r["text_equal"] for r in rows),
                "differences": [r for r in rows if not r["equal"]],
            }
            print(f"  {base.name} {name}: greedy equal {equal}/{len(rows)}", flush=True)
    out["seconds"] = time.perf_counter() - started
    out["differences"] = summarise([r for g in out["greedy"].values() for r in g["differences"]])
    print(f"  {base.name} differences: {out['differences']}", flush=True)
    return out


def summarise(differences: list[dict]) -> dict:
    """What the differing examples have in common: how close flix's top two were where each
    parts, how often the server took flix's second choice there, and how often the server,
    asked again for the same prefix, ranks flix's token first itself (its own near-tie)."""
    margins = sorted(r["flix_margin"] for r in differences)
    return {
        "examples": len(differences),
        "flix_margin_median": statistics.median(margins) if margins else None,
        "flix_margin_max": margins[-1] if margins else None,
        "server_took_flix_second": sum(r["server_took_flix_second"] for r in differences),
        "server_again_ranks_flix_token_first": sum(r["server_again_token"] == r["flix_token"] for r in differences),
    }


def parting(flix_lp: torch.Tensor, took: int | None, again: dict[int, float] | None, stop: set[int]) -> dict:
    """Where the greedy outputs first part: flix's token (its argmax; "stop" for a stop token),
    its second choice and its margin between them; the token the server's greedy took there
    (`took`, None where it stopped) and flix's log-probability gap from its own token to that
    one; then the server asked again for the same prefix (`again`: its top log-probabilities,
    None where it held its reply back), whose top token, own top-two margin and gap to
    flix's token tell whether the server itself is near a tie there."""
    name = lambda t: "stop" if t is None or t in stop else t  # noqa: E731
    top2 = flix_lp.topk(2)
    first, second = int(top2.indices[0]), int(top2.indices[1])
    took_lp = flix_lp[sorted(stop)].max() if took is None else flix_lp[took]
    row = {
        "flix_token": name(first),
        "flix_second": name(second),
        "flix_margin": float(top2.values[0] - top2.values[1]),
        "server_token": name(took),
        "server_took_flix_second": name(took) == name(second),
        "flix_gap_to_server_token": float(flix_lp[first] - took_lp),
    }
    if not again:
        return row | {"server_again_token": None, "server_again_margin": None, "server_again_gap_to_flix_token": None}
    ranked = sorted(again, key=again.get, reverse=True)
    return row | {
        "server_again_token": name(ranked[0]),
        "server_again_margin": again[ranked[0]] - again[ranked[1]] if len(ranked) > 1 else None,
        "server_again_gap_to_flix_token": again[ranked[0]] - again[first] if first in again else None,
    }


def throughput(args, model, tok, manifest, cases, bases: list[Path]) -> dict:
    """The same mixed-combination requests (each exactly new_tokens generated) through the
    server over each base (parallel clients), flix's generate (mixed batches) and merged
    models (one per combination, requests grouped by it)."""
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

    out["llama_server"] = []
    for base in bases:
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
        out["llama_server"].append({"base": base.name, "seconds": seconds, "requests_per_s": n / seconds, "tokens_per_s": tokens / seconds})
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


def flix_margins(model, cases: list[Case], ours: dict) -> dict:
    """flix's smallest top-two log-probability margin along each of its greedy outputs (at
    every token it chose, and at its choice to stop where it stopped), per combination in
    example order: how near a tie flix's own greedy path passes, so where a slightly
    different arithmetic (a quantised base) may part from it."""
    out: dict[str, list[float]] = {}
    for case in cases:
        name = key(case.features)
        mine = ours[(name, len(out.setdefault(name, [])))]
        steps = len(mine) + (len(mine) < max_new_for(case.features))  # the stop was a choice too
        lp = flix_logprobs(model, Case(case.features, case.prompt, (mine + [0])[:steps]))
        top2 = lp.topk(2, dim=-1).values
        out[name].append(float((top2[:, 0] - top2[:, 1]).min()))
    return out


MARGIN_BINS = (0.0, 0.05, 0.1, 0.5, float("inf"))  # nats


def differ_by_margin(min_margins: dict[str, list[float]], greedy: dict) -> dict[str, list[int]]:
    """Greedy outputs that differ / examples, by flix's smallest top-two margin along its own
    greedy path: quantised arithmetic should part from flix only near its ties."""
    out = {f"{lo}-{hi}": [0, 0] for lo, hi in zip(MARGIN_BINS, MARGIN_BINS[1:])}
    for name, margins in min_margins.items():
        differing = {r["index"] for r in greedy[name]["differences"]}
        for i, margin in enumerate(margins):
            lo, hi = next((lo, hi) for lo, hi in zip(MARGIN_BINS, MARGIN_BINS[1:]) if lo <= margin < hi)
            out[f"{lo}-{hi}"][0] += i in differing
            out[f"{lo}-{hi}"][1] += 1
    return out


def flix_outputs(model, cases: list[Case], stop: set[int], cache: Path | None) -> dict:
    """flix's greedy tokens per (combination, index), kept in `cache` (JSON) when given: they
    do not depend on the server's base, and a rerun need not generate them again. Generated
    index by index across the combinations and saved as they come, so an interrupted run
    leaves the same count for each combination, and a rerun only adds the missing ones."""
    kept = {tuple(json.loads(k)): v for k, v in json.loads(cache.read_text()).items()} if cache and cache.is_file() else {}
    counters: dict[str, int] = {}
    indexed = []
    for case in cases:
        name = key(case.features)
        counters[name] = counters.get(name, -1) + 1
        indexed.append((counters[name], name, case))
    todo = sorted((row for row in indexed if (row[1], row[0]) not in kept), key=lambda row: row[:2])
    started, ours = time.perf_counter(), {(name, i): kept[(name, i)] for i, name, _ in indexed if (name, i) in kept}
    for done, (i, name, case) in enumerate(todo, 1):
        max_new = max_new_for(case.features)
        ours[(name, i)] = flix_greedy(model, case.prompt, case.features, max_new, stop)
        if cache and (done % len(counters) == 0 or done == len(todo)):
            # atomically: a kill mid-write keeps the last copy
            atomic_write_text(cache, json.dumps({json.dumps(list(k)): v for k, v in {**kept, **ours}.items()}))
            print(f"flix greedy: {done}/{len(todo)} new examples, {time.perf_counter() - started:.0f} s", flush=True)
    if todo:
        print(f"flix greedy on {len(todo)} examples ({len(cases) - len(todo)} kept): {time.perf_counter() - started:.0f} s", flush=True)
    return ours


def run(args) -> int:
    torch.set_num_threads(args.threads)
    root = Path(args.data or os.environ["FLIX_DATA_ROOT"])
    base_model, tok = load_model({"name": args.model})
    model = FLixModel.from_pretrained(base_model, args.adapter).eval()
    manifest = read_manifest(args.export)
    cases = test_cases(model, tok, root, args.examples)
    stop = {tok.eos_token_id} | ({tok.convert_tokens_to_ids("<end_of_turn>")} - {tok.unk_token_id, None})
    result: dict = {"adapter": str(args.adapter), "examples_per_combination": args.examples, "stop_tokens": sorted(stop), "bases": []}
    if args.examples and not args.no_agreement:
        started = time.perf_counter()
        ours = flix_outputs(model, cases, stop, args.flix_cache)
        result["flix_greedy_seconds"] = time.perf_counter() - started  # near 0 where the cache held them all
        if args.margins:
            result["flix_min_margin"] = flix_margins(model, cases, ours)
        for base in [] if args.only_flix else args.base:
            result["bases"].append(agreement(args, model, tok, manifest, cases, base, ours, stop))
            if args.margins:
                result["bases"][-1]["differ_by_flix_margin"] = differ_by_margin(result["flix_min_margin"], result["bases"][-1]["greedy"])
    if args.throughput and not args.only_flix:
        result["throughput"] = throughput(args, model, tok, manifest, cases, args.base)
    result["median_prompt_tokens"] = statistics.median(len(c.prompt) for c in cases)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0
