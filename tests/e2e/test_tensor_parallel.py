"""CLaSp under tensor parallelism (vLLM's `mp` executor, CPU).

Every rank runs the same DP and draft layer calls (skip masks and per-step draft decisions
are broadcast from rank 0), or the all-reduces inside the layers would hang. The default
model has 9 attention heads, so TP=3 is the size that fits it; TP=2 runs on a small
random-weight Llama with 4 heads (small_llama.py). The CPU workers share the machine's
2 cores through VLLM_CPU_OMP_THREADS_BIND.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from tests.e2e.conftest import chat, spec_metrics
from tests.e2e.prompts import CHAT_PROMPTS

pytestmark = pytest.mark.engine

PROMPTS = CHAT_PROMPTS[:4]
MAX_TOKENS = 64
# Every step drafts: the adaptive draft budget would otherwise stop drafting on the random model.
CLASP = {"method": "clasp", "clasp_adaptive": False, "clasp_prompt_lookup_max": 0}
SMALL_PROMPTS = CHAT_PROMPTS[:3]
SMALL_MAX_TOKENS = 48


def greedy(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS, ignore_eos=False) -> list[list[int]]:
    from vllm import SamplingParams

    texts = [chat(llm.get_tokenizer(), p) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    outs = llm.generate(texts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@contextlib.contextmanager
def threads_bound(binding: str):
    """VLLM_CPU_OMP_THREADS_BIND while an engine starts (its workers read it at start-up)."""
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


def drafts_during(llm, run):
    before = spec_metrics(llm)
    result = run()
    after = spec_metrics(llm)
    return result, after["vllm:spec_decode_num_drafts"] - before["vllm:spec_decode_num_drafts"]


def test_tp3_clasp_equals_single_rank_plain(engines):
    expected = greedy(engines.get(dtype="float32"))
    with threads_bound("0|1|0"):
        llm = engines.get(dtype="float32", tensor_parallel_size=3, speculative_config=CLASP)
    got, drafts = drafts_during(llm, lambda: greedy(llm))
    print(f"TP=3: {drafts} verification steps with drafts")
    assert drafts > 0
    identical = sum(a == b for a, b in zip(expected, got))
    print(f"TP=3 CLaSp vs TP=1 plain: {identical}/{len(PROMPTS)} identical")
    # TP=3 sums partial products in another order than TP=1: allow one near-tie flip.
    assert identical >= len(PROMPTS) - 1


def test_tp2_clasp_equals_plain_on_small_llama(engines, small_llama_dir):
    """TP=2 (4 heads, 2 KV heads): CLaSp equals plain decoding at TP=2 token for token."""
    def run(llm):
        return greedy(llm, SMALL_PROMPTS, SMALL_MAX_TOKENS, ignore_eos=True)

    single = run(engines.get(model=small_llama_dir))
    with threads_bound("0|1"):
        plain = engines.get(model=small_llama_dir, tensor_parallel_size=2)
        expected = run(plain)
        llm = engines.get(model=small_llama_dir, tensor_parallel_size=2, speculative_config=CLASP)
    got, drafts = drafts_during(llm, lambda: run(llm))
    accepted = spec_metrics(llm)["vllm:spec_decode_num_accepted_tokens"]
    print(f"TP=2 small Llama: {drafts} verification steps with drafts, "
          f"{accepted} accepted draft tokens so far")
    for label, outputs in (("plain", expected), ("CLaSp", got)):
        print(f"TP=2 {label} vs TP=1 plain: {sum(a == b for a, b in zip(single, outputs))}/"
              f"{len(SMALL_PROMPTS)} identical")
    assert drafts > 0
    assert got == expected
