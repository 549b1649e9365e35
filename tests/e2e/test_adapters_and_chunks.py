"""LoRA adapters and chunked prefills on CLaSp engines.

- LoRA: vLLM's LoRA layers read a token -> adapter mapping set per step for the step's
  scheduled tokens; the DP and the draft passes run the same layers on other rows, so CLaSp
  sets the mapping for its own rows (`vllm_clasp.vllm.adapter_rows`). Greedy output with two
  adapters, base requests and their mixes equals plain decoding's with the same adapters.
- Seeded requests whose prefill is chunked: vLLM rewinds a seeded request's generator after
  a discarded sample with `set_offset`, which a CPU generator refuses (plain vLLM-CPU dies
  too); patches 15 and 16 rewind by state in CLaSp workers. A seed still pins the output,
  alone and in any batch.

The engines share one small batch budget (128 tokens) so that long prompts are chunked, and
leave room for vLLM's LoRA check (max_num_batched_tokens >= max_num_seqs x (K + 1)).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import chat
from tests.e2e.prompts import CHAT_PROMPTS, SHORT_PASSAGE

pytestmark = pytest.mark.engine

# max_loras 3 > the 2 adapters used: with exactly max_loras adapters in a batch beside base
# requests, vLLM-CPU 0.32.0 gives the base requests wrong tokens in plain decoding too (their
# output differs from the same request alone), so plain would be no reference.
BUDGET = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 3,
          "max_num_batched_tokens": 128, "max_num_seqs": 4, "enable_chunked_prefill": True}
ALWAYS = {"method": "clasp", "clasp_adaptive": False, "clasp_prompt_lookup_max": 0,
          "num_speculative_tokens": 8}
DEFAULTS = {"method": "clasp"}
MAX_TOKENS = 24
# Longer than the 128-token budget: their prefill is split into chunks.
LONG = [f"Summarize the following text twice, first briefly and then in detail.\n\n"
        f"{SHORT_PASSAGE}\n\n{SHORT_PASSAGE}",
        f"Answer three questions about this text: who, where, when.\n\n{SHORT_PASSAGE} "
        f"{SHORT_PASSAGE}"]


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """Two random rank-8 adapters on every projection of the default model."""
    from vllm.lora.request import LoRARequest

    from tests.support.lora_adapter import write_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return [LoRARequest(f"random-{i}", i + 1, str(write_random_adapter(root / f"a{i}",
                                                                        model_dir, seed=i)))
            for i in range(2)]


def _tokens(results) -> list[list[int]]:
    return [list(r.outputs[0].token_ids) for r in results]


def _mixed(adapters, n: int):
    """Per request: adapter 1, adapter 2, the base model, in turn."""
    return [(adapters + [None])[i % 3] for i in range(n)]


@pytest.mark.parametrize("config", [ALWAYS, DEFAULTS], ids=["always_drafting", "defaults"])
def test_adapters_greedy_output_equals_plain(engines, adapters, config):
    """The reported input (two prompts, one adapter, 16 tokens), then six prompts (two of
    them chunked) with two adapters and the base model mixed, each adapter alone, and a
    batch without adapters: every output equals plain decoding's with the same adapters."""
    from vllm import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    plain = engines.get(**BUDGET)
    llm = engines.get(speculative_config=config, **BUDGET)
    tokenizer = llm.get_tokenizer()
    reported = ["The capital of France is", "Hello, my name is"]
    prompts = [chat(tokenizer, p) for p in [*CHAT_PROMPTS[:4], *LONG]]
    cases = [(reported, adapters[0]), (prompts, _mixed(adapters, len(prompts))),
             (prompts[:3], adapters[1]), (prompts[3:], None)]
    for batch, lora in cases:
        expected = _tokens(plain.generate(batch, greedy, lora_request=lora, use_tqdm=False))
        got = _tokens(llm.generate(batch, greedy, lora_request=lora, use_tqdm=False))
        assert got == expected, lora
    assert expected[0] != _tokens(plain.generate(prompts[3:4], greedy, lora_request=adapters[0],
                                                 use_tqdm=False))[0], "the adapter changes nothing"


def test_sampled_and_seeded_requests_with_adapters(engines, adapters):
    """Sampled requests (top-k, top-p, seeds) with adapters on the always-drafting engine: each
    is served, and a seeded one gives the same tokens alone and in a mixed batch."""
    from vllm import SamplingParams as S

    llm = engines.get(speculative_config=ALWAYS, **BUDGET)
    prompts = [chat(llm.get_tokenizer(), p) for p in [*CHAT_PROMPTS[4:8], *LONG]]
    params = [S(temperature=0.9, seed=50 + i, max_tokens=MAX_TOKENS, ignore_eos=True)
              if i % 2 == 0 else S(temperature=0.8, top_k=20, top_p=0.9, max_tokens=MAX_TOKENS,
                                   ignore_eos=True)
              for i in range(len(prompts))]
    loras = _mixed(adapters, len(prompts))
    batch = _tokens(llm.generate(prompts, params, lora_request=loras, use_tqdm=False))
    assert all(len(t) == MAX_TOKENS for t in batch)
    for i in range(0, len(prompts), 2):
        alone = _tokens(llm.generate([prompts[i]], params[i], lora_request=loras[i],
                                     use_tqdm=False))[0]
        assert alone == batch[i], i


@pytest.mark.parametrize("config", [ALWAYS, DEFAULTS], ids=["always_drafting", "defaults"])
def test_seeded_prompts_longer_than_the_batch_budget(engines, config):
    """The reported input (four chat prompts, temperature 0.8, seed 9, 48 tokens, prefills
    chunked by a small budget) killed the engine; the same seeded long prompt gives the same
    tokens alone, twice, and next to other long prompts (whose chunks move its chunk
    boundaries), and the engine still serves."""
    from vllm import SamplingParams

    llm = engines.get(speculative_config=config, **BUDGET)
    tokenizer = llm.get_tokenizer()
    prompts = [chat(tokenizer, p) for p in [*LONG, *CHAT_PROMPTS[8:10]]]
    assert all(len(tokenizer(p).input_ids) > BUDGET["max_num_batched_tokens"]
               for p in prompts[:2])
    seeded = SamplingParams(temperature=0.8, seed=9, max_tokens=48, ignore_eos=True)
    batch = _tokens(llm.generate(prompts, seeded, use_tqdm=False))
    assert all(len(t) == 48 for t in batch)
    alone = [_tokens(llm.generate([prompts[0]], seeded, use_tqdm=False))[0] for _ in range(2)]
    assert alone[0] == alone[1] == batch[0]
    shifted = _tokens(llm.generate([prompts[1], prompts[0]], seeded, use_tqdm=False))
    assert shifted[1] == batch[0] and shifted[0] == batch[1]
    greedy = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4),
                          use_tqdm=False)
    assert len(greedy[0].outputs[0].token_ids) == 4
