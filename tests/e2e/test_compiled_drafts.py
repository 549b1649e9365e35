"""Layer-skip drafts through compiled decoder layers (`clasp_compile_layers`), on engines that
vLLM compiles (no enforce_eager): output equal to plain decoding on a compiled engine, every
draft pass compiled, and a draft with no layer skipped agreeing with the model it drafts for.
Eager engines report no compiled pass."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import chat, clasp_stats, spec_metrics
from tests.e2e.prompts import CHAT_PROMPTS
from tests.e2e.test_exactness import CLASP, assert_matches_plain, generate

pytestmark = pytest.mark.engine

COMPILED = {"enforce_eager": False}
FORCED = {**CLASP, "clasp_copy_source": "none", "clasp_draft_exit_threshold": 0,
          "clasp_skip_layers": 12}
PROMPTS = CHAT_PROMPTS[:8]


@pytest.fixture(scope="module")
def compiled_reference(engines):
    plain = engines.get(**COMPILED)
    prompts = [chat(plain.get_tokenizer(), p) for p in PROMPTS]
    return prompts, generate(plain, prompts, batch_size=1)


def run(llm, prompts, batch_size):
    before_stats, before = clasp_stats(llm), spec_metrics(llm)
    got = generate(llm, prompts, batch_size)
    after_stats, after = clasp_stats(llm), spec_metrics(llm)
    delta = {key: after_stats[key] - before_stats[key]
             for key in ("num_draft_passes", "num_compiled_draft_passes", "num_dp_runs")}
    for key in ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"):
        delta[key] = after[key] - before.get(key, 0)
    print(f"[batch {batch_size}] {delta}")
    return got, delta


@pytest.mark.parametrize("batch_size", [1, 8])
def test_compiled_drafts_equal_plain_and_agree_with_the_model(engines, compiled_reference,
                                                              batch_size):
    """One row and several rows are the compiled function's two shape classes; the DP's
    candidate calls run through it too. With no layer skipped over the full vocabulary every
    draft token is the target's own choice: compiled layers computing anything else than the
    model's layers would show as rejected drafts (one compiled engine: each costs ~1.5 min
    of CI)."""
    prompts, expected = compiled_reference
    knobs = {**FORCED, "clasp_skip_layers": 0, "clasp_draft_vocab_size": 0}
    llm = engines.get(speculative_config=knobs, **COMPILED)
    got, delta = run(llm, prompts, batch_size)
    assert_matches_plain(engines.get(**COMPILED), prompts, expected, got, "float32",
                         f"compiled, batch {batch_size}")
    assert delta["num_dp_runs"] > 0
    assert delta["num_compiled_draft_passes"] == delta["num_draft_passes"] > 0
    drafted = delta["vllm:spec_decode_num_draft_tokens"]
    assert delta["vllm:spec_decode_num_accepted_tokens"] >= 0.98 * drafted > 0


def test_eager_engines_run_eager_draft_layers(engines):
    llm = engines.get(speculative_config=FORCED)
    prompts = [chat(llm.get_tokenizer(), p) for p in PROMPTS[:2]]
    _, delta = run(llm, prompts, 2)
    assert delta["num_draft_passes"] > 0 and delta["num_compiled_draft_passes"] == 0
