"""Greedy CLaSp output equals plain decoding on the real model (float32 and bfloat16).

Speculative decoding verifies drafts with the full model, so greedy output is exactly plain
greedy decoding up to floating-point effects: the verify pass runs K+1 tokens at once, a
different kernel shape than plain decoding's one token, and where the target's top-2 logits
are nearly tied the argmax can flip. The tests allow that for at most 5 % of prompts and, for
each prompt that differs, print the first differing position and the target's top-2 margin
there, which must be tiny.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import chat, spec_metrics
from tests.e2e.prompts import CHAT_PROMPTS

pytestmark = pytest.mark.engine

MAX_TOKENS = 128
# Defaults, except that every step drafts: the adaptive draft budget may turn drafting off
# where it measures slower, which would leave less of the draft path under test.
CLASP = {"method": "clasp", "clasp_adaptive": False, "clasp_prompt_lookup_max": 0}
# Largest top-2 log-prob margin at a divergence that we still call numerics.
MAX_MARGIN = {"float32": 0.05, "bfloat16": 0.5}


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX). There oneDNN's bf16
    kernels for a K+1-token verification and a 1-token decode round differently, and bf16
    logits tie exactly often (top-2 margin 0.0), so many prompts diverge at ties; where bf16
    is emulated (AVX2 only) the two paths round alike and divergences are rare."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Share of prompts allowed to diverge (each at a near-tie, to one of plain's top-2 tokens).
MAX_DIFFERING = {"float32": 0.05, "bfloat16": 1.0 if native_bf16() else 0.05}


def generate(llm, prompts: list[str], batch_size: int) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        results = llm.generate(prompts[start:start + batch_size], params, use_tqdm=False)
        out.extend(list(r.outputs[0].token_ids) for r in results)
    return out


def top2_margin(plain, prompt: str, prefix: list[int]) -> tuple[float, set[int]]:
    """The target's top-2 log-prob margin for the token after prompt + prefix, and the two
    tokens."""
    from vllm import SamplingParams, TokensPrompt

    prompt_ids = plain.get_tokenizer().encode(prompt, add_special_tokens=False)
    result = plain.generate(
        TokensPrompt(prompt_token_ids=prompt_ids + prefix),
        SamplingParams(temperature=0, max_tokens=1, logprobs=2), use_tqdm=False,
    )[0]
    logprobs = result.outputs[0].logprobs[0]
    top = sorted(logprobs.items(), key=lambda item: -item[1].logprob)[:2]
    return top[0][1].logprob - top[1][1].logprob, {token for token, _ in top}


def assert_matches_plain(plain, prompts, reference, candidate, dtype, label):
    differing = []
    for prompt, ref, got in zip(prompts, reference, candidate):
        if ref == got:
            continue
        position = next(
            (i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got))
        )
        margin, top2 = top2_margin(plain, prompt, ref[:position])
        chosen = got[position] if position < len(got) else None
        differing.append((position, margin, chosen in top2))
        print(f"[{label}] differs at token {position}: top-2 margin {margin:.4f}")
    print(f"[{label}] identical: {len(prompts) - len(differing)}/{len(prompts)}")
    assert len(differing) <= MAX_DIFFERING[dtype] * len(prompts), (
        f"{label}: {len(differing)} prompts differ")
    for position, margin, in_top2 in differing:
        assert margin <= MAX_MARGIN[dtype] and in_top2, (
            f"{label}: divergence at token {position} with top-2 margin {margin:.3f} "
            f"(CLaSp's token among plain's top 2: {in_top2}) is not a near-tie: a real bug, "
            "not numerics"
        )


@pytest.fixture(scope="module")
def reference(engines):
    """Plain greedy outputs per dtype, batch 1 (the strictest reference)."""
    cache = {}

    def get(dtype):
        if dtype not in cache:
            plain = engines.get(dtype=dtype)
            prompts = [chat(plain.get_tokenizer(), p) for p in CHAT_PROMPTS]
            cache[dtype] = (prompts, generate(plain, prompts, batch_size=1))
        return cache[dtype]

    return get


@pytest.mark.parametrize("dtype, batch_size", [
    ("float32", 1), ("float32", 8),
    pytest.param("bfloat16", 1, marks=pytest.mark.bf16),
    pytest.param("bfloat16", 8, marks=pytest.mark.bf16),
])
def test_greedy_equals_plain(engines, reference, dtype, batch_size):
    prompts, expected = reference(dtype)
    clasp = engines.get(dtype=dtype, speculative_config=CLASP)
    before = spec_metrics(clasp)
    got = generate(clasp, prompts, batch_size)
    after = spec_metrics(clasp)
    drafts = after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0)
    accepted = (after["vllm:spec_decode_num_accepted_tokens"]
                - before.get("vllm:spec_decode_num_accepted_tokens", 0))
    acceptance_length = 1 + accepted / drafts
    print(f"[{dtype} batch {batch_size}] mean acceptance length {acceptance_length:.2f} "
          f"({drafts} verification steps)")
    assert_matches_plain(engines.get(dtype=dtype), prompts, expected, got, dtype,
                         f"{dtype} batch {batch_size}")
    if dtype == "float32" and batch_size == 1:
        assert acceptance_length > 1.5, "default CLaSp settings accept too few tokens"


@pytest.mark.parametrize("knobs", [
    # The full model as draft, over the full vocabulary: it must agree with verification.
    {"clasp_skip_layers": 0, "clasp_draft_vocab_size": 0},
    {"clasp_skip_layers": 28},  # every layer but the first and last (never skipped)
], ids=["skip-nothing", "skip-all-skippable"])
def test_degenerate_drafts_equal_plain(engines, reference, knobs):
    prompts, expected = reference("float32")
    prompts, expected = prompts[:8], expected[:8]
    llm = engines.get(dtype="float32", speculative_config={**CLASP, **knobs})
    before = spec_metrics(llm)
    got = generate(llm, prompts, batch_size=8)
    after = spec_metrics(llm)
    assert_matches_plain(engines.get(dtype="float32"), prompts, expected, got, "float32",
                         str(knobs))
    drafted = (after["vllm:spec_decode_num_draft_tokens"]
               - before.get("vllm:spec_decode_num_draft_tokens", 0))
    accepted = (after["vllm:spec_decode_num_accepted_tokens"]
                - before.get("vllm:spec_decode_num_accepted_tokens", 0))
    print(f"[{knobs}] accepted {accepted}/{drafted} draft tokens")
    if knobs["clasp_skip_layers"] == 0:
        # The draft is the full model: every draft token is the target's own greedy choice
        # (up to the rare near-tie that single-token and K+1-token kernels round differently).
        assert accepted >= 0.98 * drafted
