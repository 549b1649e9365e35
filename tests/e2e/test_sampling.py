"""Sampling with CLaSp's drafts keeps plain decoding's distribution (at temperature 1, and with
top-k, top-p and a repetition penalty, which the rejection sampler applies per draft token).

Many seeded samples of a high-entropy prompt from plain decoding and from CLaSp (disjoint
seeds), then a chi-square test of homogeneity per position (tokens seen fewer than MIN_COUNT
times in both samples pooled into one bin). Positions >= 1 pass through the rejection sampler
with CLaSp's draft probabilities. Each position is tested at ALPHA, so a correct
implementation fails this test with probability <= NUM_POSITIONS * ALPHA = 0.3 %.
A draft path that samples from q but hands the rejection sampler no (or wrong) probabilities
skews the distribution towards the draft's choices and fails it (see docs/design.md).
"""

from __future__ import annotations

from collections import Counter

import pytest

pytestmark = pytest.mark.engine

PROMPT = "Here is a list of random English words, one per line:\napple\nriver\n"
NUM_SAMPLES = 1600
NUM_POSITIONS = 3
ALPHA = 1e-3
MIN_COUNT = 10


SETTINGS = {
    "temperature_1": {"temperature": 1.0},
    "top_k_top_p_penalty": {"temperature": 0.8, "top_k": 40, "top_p": 0.9,
                            "repetition_penalty": 1.2},
}


def sample_tokens(llm, seeds: range, setting: dict) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=NUM_POSITIONS, seed=s, ignore_eos=True, **setting)
              for s in seeds]
    results = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]


def homogeneity_p_value(a: Counter, b: Counter) -> tuple[float, int]:
    from scipy.stats import chi2_contingency

    kept = [t for t in set(a) | set(b) if a[t] + b[t] >= MIN_COUNT]
    rows = [[a[t] for t in kept], [b[t] for t in kept]]
    other = [sum(a.values()) - sum(rows[0]), sum(b.values()) - sum(rows[1])]
    if sum(other) > 0:
        rows[0].append(other[0])
        rows[1].append(other[1])
    if len(rows[0]) < 2:
        return 1.0, len(rows[0])
    return float(chi2_contingency(rows)[1]), len(rows[0])


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampling_matches_plain_distribution(engines, setting):
    plain = sample_tokens(engines.get(dtype="float32"), range(NUM_SAMPLES), SETTINGS[setting])
    # Every step drafts (no adaptive off-switch), so every position goes through the
    # rejection sampler with CLaSp's draft probabilities.
    clasp_llm = engines.get(dtype="float32",
                            speculative_config={"method": "clasp", "clasp_adaptive": False,
                                                "clasp_prompt_lookup_max": 0})
    clasp = sample_tokens(clasp_llm, range(NUM_SAMPLES, 2 * NUM_SAMPLES), SETTINGS[setting])
    for position in range(NUM_POSITIONS):
        a = Counter(tokens[position] for tokens in plain)
        b = Counter(tokens[position] for tokens in clasp)
        p_value, bins = homogeneity_p_value(a, b)
        print(f"position {position}: {bins} bins, {len(a)}/{len(b)} distinct tokens, "
              f"p = {p_value:.4f}")
        assert bins >= 5, "the prompt is not high-entropy enough for a meaningful test"
        assert p_value > ALPHA, f"position {position}: CLaSp's token distribution differs"
