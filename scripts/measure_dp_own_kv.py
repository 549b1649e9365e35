#!/usr/bin/env python
"""Does the DP's own-position approximation cost acceptance?

In the engine a DP candidate at the last accepted token's position attends to the full
model's K/V there (a read of the paged cache; nothing is written), whereas a real draft token
attends to its own. This script replays greedy self-speculative decoding on Spec-Bench
prompts with the transformers reference (``tests.support.hf_layers`` for the DP,
``tests.support.hf_spec`` for the drafts) twice per skip count M: skip sets chosen by the
exact DP (``own_kv="candidate"``) and by the engine's approximation (``own_kv="full"``),
everything else equal (same greedy continuation, DP every LOI rounds at the last accepted
token, K-token greedy drafts attending to the full model's context K/V and their own). It
reports the mean acceptance length tau of each and their paired difference.

    .venv/bin/python scripts/measure_dp_own_kv.py --per-category 17 --offset 40 \\
        --out docs/bench/2026-11-30-dp-approx-and-reruns/dp-own-kv.jsonl

One JSON line per prompt (appended, so an interrupted run resumes where it stopped), then a
summary line. Single-threaded torch by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.support import hf_layers, hf_spec  # noqa: E402
from vllm_clasp.core.optimizer import search_skip_sets  # noqa: E402
from vllm_clasp.core.options import ClaspOptions  # noqa: E402
from vllm_clasp.tools.questions import DEFAULT_QUESTIONS, load_questions, select_questions  # noqa: E402

GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
VARIANTS = ("exact", "approx")  # own_kv="candidate" / "full"
OWN_KV = {"exact": "candidate", "approx": "full"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", default=DEFAULT_QUESTIONS)
    p.add_argument("--per-category", type=int, default=17)
    p.add_argument("--offset", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=1536)
    p.add_argument("--skip-counts", default="3,9,15", help="M values (comma-separated)")
    p.add_argument("--draft-tokens", type=int, default=8, help="K per round")
    p.add_argument("--loi", type=int, default=None, help="rounds between DP runs (default: CLaSp's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="i/n: measure questions i, i+n, ... only")
    p.add_argument("--out", required=True, help="JSON lines file (appended)")
    p.add_argument("--summarize", nargs="*", default=None, metavar="JSONL",
                   help="only summarise these files' rows (e.g. the shards') into --out's summary")
    return p.parse_args(argv)


def load_model():
    import transformers

    from vllm_clasp.tools.model_prep import prepare_model

    path = prepare_model()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, return_tensors="pt")
    return (ids if isinstance(ids, torch.Tensor) else ids["input_ids"]).reshape(-1)  # [P]


def measure_prompt(model, prompt, eos, skip_counts, never_skip, draft_tokens, loi, max_tokens):
    """-> {variant: {M: {"tau", "rounds", "skip_sets"}}} for one prompt."""
    y = hf_spec.greedy_continuation(model, prompt, max_tokens, eos)  # [N]
    seq = torch.cat([prompt, y])
    kv = hf_spec.ContextKV(model, seq)
    out = {}
    for variant in VARIANTS:
        cache: dict[int, object] = {}  # committed length -> SkipSearch (the DP covers every M)

        def search(length: int, variant=variant, cache=cache):
            if length not in cache:
                ctx = hf_layers.LastTokenContext(model, [seq[:length]], mode="packed",
                                                 own_kv=OWN_KV[variant])
                cache[length] = search_skip_sets(ctx.trajectory, ctx.run_layer, max(skip_counts),
                                                 never_skip=never_skip, min_skip=min(skip_counts))
            return cache[length]

        out[variant] = {}
        for m in skip_counts:
            rounds = hf_spec.speculate(model, prompt, y, kv,
                                       lambda length, m=m: search(length).skip_mask(m)[0],
                                       draft_tokens, loi)
            out[variant][m] = {
                "tau": rounds.tau, "rounds": len(rounds.accepted),
                "accepted": sum(rounds.accepted),
                "skip_sets": [mask.nonzero()[:, 0].tolist() for mask in rounds.skip_masks],
            }
    return len(y), out


def summarize(rows, skip_counts, seed=0):
    """Mean tau per variant and M, and the paired relative difference with a bootstrap 95 % CI."""
    rng = random.Random(seed)
    summary = {}
    for m in skip_counts:
        key = str(m)
        exact = [r["result"]["exact"][key]["tau"] for r in rows]
        approx = [r["result"]["approx"][key]["tau"] for r in rows]
        n = len(rows)
        mean_e, mean_a = sum(exact) / n, sum(approx) / n
        boots = []
        for _ in range(2000):
            idx = [rng.randrange(n) for _ in range(n)]
            e = sum(exact[i] for i in idx) / n
            a = sum(approx[i] for i in idx) / n
            boots.append(a / e - 1)
        boots.sort()
        first_sets = [(set(r["result"]["exact"][key]["skip_sets"][0]),
                       set(r["result"]["approx"][key]["skip_sets"][0])) for r in rows]
        jaccard = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in first_sets]
        summary[key] = {
            "prompts": n, "tau_exact": mean_e, "tau_approx": mean_a,
            "approx_vs_exact": mean_a / mean_e - 1,
            "ci95": [boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]],
            "approx_better": sum(a > e for a, e in zip(approx, exact)),
            "exact_better": sum(e > a for a, e in zip(approx, exact)),
            "first_skip_set_jaccard_mean": sum(jaccard) / n,
            "first_skip_set_identical": sum(j == 1.0 for j in jaccard),
        }
    return summary


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    skip_counts = sorted(int(x) for x in args.skip_counts.split(","))
    if args.summarize is not None:
        rows = [row for path in args.summarize for row in read_rows(path).values()]
        write_summary(args, rows, skip_counts, {"files": args.summarize})
        return
    options = ClaspOptions()
    loi = args.loi or options.loi
    model, tok = load_model()
    L = model.config.num_hidden_layers
    resolved = options.resolve(L, tok.vocab_size, None)
    never_skip = torch.tensor(resolved.never_skip)  # [L] bool
    questions = select_questions(load_questions(args.questions), GROUPS, args.per_category,
                                 args.offset)
    shard, shards = (int(x) for x in args.shard.split("/"))
    questions = questions[shard::shards]
    done = read_rows(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows = []
    with open(args.out, "a") as f:
        for q in tqdm(questions, desc="prompts", unit="prompt"):
            if str(q.question_id) in done:
                rows.append(done[str(q.question_id)])
                continue
            prompt = prompt_ids(tok, q.text)
            if prompt.numel() > args.max_prompt_tokens:
                tqdm.write(f"skipping question {q.question_id}: {prompt.numel()} prompt tokens")
                continue
            t0 = time.perf_counter()
            n, result = measure_prompt(model, prompt, tok.eos_token_id, skip_counts, never_skip,
                                       args.draft_tokens, loi, args.max_tokens)
            row = {"question_id": q.question_id, "group": q.group, "prompt_tokens": prompt.numel(),
                   "new_tokens": n, "seconds": round(time.perf_counter() - t0, 2),
                   "result": {v: {str(m): r for m, r in res.items()} for v, res in result.items()}}
            f.write(json.dumps(row) + "\n")
            f.flush()
            rows.append(row)
    config = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "offset": args.offset,
              "per_category": args.per_category, "max_tokens": args.max_tokens,
              "draft_tokens": args.draft_tokens, "loi": loi, "never_skip": resolved.never_skip.count(True),
              "shard": args.shard}
    write_summary(args, rows, skip_counts, config)


def read_rows(path: str) -> dict[str, dict]:
    """question_id -> row of a JSON lines file written by this script ({} if absent)."""
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                rows[str(row["question_id"])] = row
    return rows


def write_summary(args, rows, skip_counts, config) -> None:
    out = {"config": config, "summary": summarize(rows, skip_counts)}
    print(json.dumps(out, indent=1))
    with open(os.path.splitext(args.out)[0] + "-summary.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
