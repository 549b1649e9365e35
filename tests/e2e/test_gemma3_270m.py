"""Gemma 3 270M, the second real model (`vllm-clasp model gemma3-270m`): a hybrid-attention
model (sliding-window and full layers in separate KV-cache groups, 262k-token vocabulary).
CLaSp's greedy output equals plain decoding's, with the defaults and with layer-skip drafts
on every step; the mean acceptance length is printed (shown with -s).

It is the base model (no chat template): completion prompts, with <bos> (its tokenizer adds
it; without it the model's output degenerates).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import spec_metrics

pytestmark = pytest.mark.engine

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The water cycle describes how water moves between the oceans, the air and the land. "
    "First,",
    "Here is a list of the planets of the solar system, in order from the Sun:\n1. Mercury\n",
]
MAX_TOKENS = 48
ALWAYS = {"method": "clasp", "clasp_adaptive": False, "clasp_prompt_lookup_max": 0}


@pytest.fixture(scope="module")
def gemma_dir() -> str:
    from vllm_clasp.tools.model_prep import prepare_model

    return str(prepare_model("gemma3-270m"))


def greedy(llm) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return [list(r.outputs[0].token_ids) for r in llm.generate(PROMPTS, params, use_tqdm=False)]


def tau(llm) -> float:
    counters = spec_metrics(llm)
    drafts = counters["vllm:spec_decode_num_drafts"]
    return 1 + counters["vllm:spec_decode_num_accepted_tokens"] / drafts if drafts else 1.0


@pytest.mark.parametrize("config", [{"method": "clasp"}, ALWAYS], ids=["defaults", "always"])
def test_greedy_equals_plain_on_gemma3(engines, gemma_dir, config):
    plain = greedy(engines.get(model=gemma_dir))
    llm = engines.get(model=gemma_dir, speculative_config=config)
    got = greedy(llm)
    print(f"Gemma 3 270M, {config}: mean acceptance length {tau(llm):.2f}")
    assert got == plain
    if config is ALWAYS:
        assert spec_metrics(llm)["vllm:spec_decode_num_drafts"] > 0


def test_transformers_and_vllm_agree_on_gemma3(engines, gemma_dir):
    """The conversion's sanity check (`vllm-clasp model gemma3-270m --check`): transformers and
    vLLM give the same greedy continuations (with <bos>), on the shared plain engine."""
    from vllm_clasp.tools.model_check import check_agreement

    report = check_agreement(gemma_dir, llm=engines.get(model=gemma_dir))
    for a in report:
        print(a.prompt[:30], a.first_difference, a.margin)
    assert all(a.ok for a in report), report
    assert sum(a.first_difference is None for a in report) >= len(report) - 1
