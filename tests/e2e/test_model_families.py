"""Model families: the draft path computes what the model computes, on every family CLaSp
claims (`TESTED_ARCHITECTURES`), and a model that does not fit is refused at start-up.

With `clasp_skip_layers: 0` (and no draft-exit threshold, full draft vocabulary, no prompt
lookup) the draft *is* the full model, so every draft token must be accepted: a draft path that
misses a model-specific piece (an embedding normaliser, logit soft-capping, a sliding window,
a second KV-cache group) fails this at once. Every family also checks greedy output against
plain decoding, with the full-model draft and with one layer skipped. Tiny random-weight
checkpoints (tests/support/tiny_models.py); prompts are longer than the 16-token windows of
the families with sliding-window layers (Mistral with a window, Gemma 2 and 3: several
KV-cache groups under vLLM's hybrid KV-cache manager).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import chat, spec_metrics
from tests.e2e.prompts import CHAT_PROMPTS
from vllm_clasp.vllm.config import TESTED_ARCHITECTURES

pytestmark = pytest.mark.engine

K = 4
FULL_MODEL_DRAFT = {"method": "clasp", "num_speculative_tokens": K, "clasp_skip_layers": 0,
                    "clasp_adaptive": False, "clasp_prompt_lookup_max": 0,
                    "clasp_draft_exit_threshold": 0, "clasp_draft_vocab_size": 0}
SKIP_ONE = {**FULL_MODEL_DRAFT, "clasp_skip_layers": 1}
FAMILIES = {  # family -> architecture (tests/support/tiny_models.py)
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mistral_sliding": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
PROMPTS = [CHAT_PROMPTS[6], CHAT_PROMPTS[1], CHAT_PROMPTS[10]]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_dir(model_dir, tmp_path_factory):
    from pathlib import Path

    from tests.support.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("families")
    return lambda family: str(build_tiny_model(family, root / family, Path(model_dir)))


def greedy(llm) -> list[list[int]]:
    from vllm import SamplingParams

    prompts = [chat(llm.get_tokenizer(), p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params, use_tqdm=False)]


def test_every_tested_architecture_is_covered():
    assert sorted(FAMILIES.values()) == sorted(TESTED_ARCHITECTURES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_full_model_draft_is_always_accepted(engines, tiny_dir, family):
    llm = engines.get(model=tiny_dir(family), speculative_config=FULL_MODEL_DRAFT)
    out = greedy(llm)
    counters = spec_metrics(llm)
    drafts = counters["vllm:spec_decode_num_drafts"]
    drafted = counters["vllm:spec_decode_num_draft_tokens"]
    accepted = counters["vllm:spec_decode_num_accepted_tokens"]
    print(f"{family}: {drafts} drafts, {drafted} draft tokens, {accepted} accepted")
    # Drafts are K long but for the last steps (never past max_tokens).
    assert drafts > 0 and K * (drafts - K) <= drafted <= K * drafts
    assert accepted == drafted, f"{family}: the full-model draft differs from the model"
    plain = greedy(engines.get(model=tiny_dir(family)))
    assert out == plain, f"{family}: full-model draft, greedy output differs from plain"
    skip_one = engines.get(model=tiny_dir(family), speculative_config=SKIP_ONE)
    assert greedy(skip_one) == plain, f"{family}: one layer skipped, greedy output differs"


def test_a_model_that_does_not_fit_is_refused_at_start_up(tiny_dir):
    """Granite scales its embeddings outside embed_input_ids and its layers take no residual:
    the engine must not start (no request ever reaches a wrong draft), and say why."""
    code = (
        "from vllm import LLM\n"
        f"LLM(model={tiny_dir('granite')!r}, dtype='float32', enforce_eager=True, "
        "max_model_len=512, speculative_config={'method': 'clasp'})\n"
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode != 0
    assert "CLaSp cannot draft with GraniteDecoderLayer" in result.stderr, result.stderr[-3000:]
    assert "not (positions, hidden_states, residual)" in result.stderr
