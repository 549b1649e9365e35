"""Every per-request sampling parameter vLLM accepts for its own speculative methods either
works with CLaSp or is refused for that request alone; and a seed pins the output.

The rejection sampler expands each request's sampling parameters per draft token (temperature,
top-k, top-p, penalties, bad words, allowed token ids, min_tokens, seeds). Steps that mix
requests with and without drafts, greedy and sampled, and steps with no draft token at all
(every prefill) must all survive, on the default engine (whose draft budget leaves some
requests undrafted) and on one that drafts every step. See docs/troubleshooting.md.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import chat
from tests.e2e.prompts import CHAT_PROMPTS

pytestmark = pytest.mark.engine

DEFAULTS = {"method": "clasp"}
# Layer-skip drafts on every step (shared with test_exactness.py's engine).
ALWAYS = {"method": "clasp", "clasp_adaptive": False, "clasp_prompt_lookup_max": 0}
PROMPTS = CHAT_PROMPTS[:8]
MAX_TOKENS = 32


def _params():
    """(name, per-request SamplingParams for the 8 prompts) for every parameter class."""
    from vllm import SamplingParams as S
    from vllm.sampling_params import StructuredOutputsParams

    def each(make):
        return [make(i) for i in range(len(PROMPTS))]

    return {
        "top_k": each(lambda i: S(temperature=1.0, top_k=5, seed=i, max_tokens=MAX_TOKENS)),
        "top_p": each(lambda i: S(temperature=0.8, top_p=0.9, seed=i, max_tokens=MAX_TOKENS)),
        "top_k_top_p": each(lambda i: S(temperature=0.8, top_k=20, top_p=0.9,
                                        max_tokens=MAX_TOKENS)),
        "mixed_greedy_sampled_seeded": each(
            lambda i: S(temperature=0, max_tokens=MAX_TOKENS) if i % 3 == 0
            else S(temperature=0.9, top_k=1 + i, seed=i, max_tokens=MAX_TOKENS) if i % 3 == 1
            else S(temperature=0.9, top_p=0.5, max_tokens=MAX_TOKENS)),
        "penalties": each(lambda i: S(temperature=0.9, repetition_penalty=1.3,
                                      presence_penalty=0.5, frequency_penalty=0.5, seed=i,
                                      max_tokens=MAX_TOKENS)),
        "bad_words": each(lambda i: S(temperature=0.9, bad_words=[" Paris"], top_k=10,
                                      max_tokens=MAX_TOKENS)),
        "allowed_token_ids": each(lambda i: S(temperature=0.9, top_p=0.95,
                                              allowed_token_ids=list(range(100, 3000)),
                                              max_tokens=MAX_TOKENS)),
        "min_tokens": each(lambda i: S(temperature=0.9, min_tokens=24, top_k=50,
                                       max_tokens=MAX_TOKENS)),
        "logprobs": each(lambda i: S(temperature=0.9, top_k=10, logprobs=2, prompt_logprobs=1,
                                     max_tokens=8)),
        "n_4": each(lambda i: S(temperature=0.9, top_p=0.9, n=4, seed=i, max_tokens=16)),
        "structured_choice": each(lambda i: S(
            temperature=0.9, top_k=5, max_tokens=8,
            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))),
        "max_tokens_1": each(lambda i: S(temperature=0.9, top_k=3, max_tokens=1)),
    }


@pytest.mark.parametrize("config", [DEFAULTS, ALWAYS], ids=["defaults", "always_drafting"])
def test_every_accepted_sampling_parameter_is_served(engines, config):
    llm = engines.get(dtype="float32", speculative_config=config)
    prompts = [chat(llm.get_tokenizer(), p) for p in PROMPTS]
    for name, params in _params().items():
        results = llm.generate(prompts, params, use_tqdm=False)
        for result, p in zip(results, params):
            assert len(result.outputs) == p.n, name
            assert all(1 <= len(o.token_ids) <= p.max_tokens for o in result.outputs), name
        if name == "structured_choice":
            assert all(r.outputs[0].text in ("yes", "no") for r in results)
        if name == "bad_words":
            assert all(" Paris" not in r.outputs[0].text for r in results)


@pytest.mark.parametrize("config", [DEFAULTS, ALWAYS], ids=["defaults", "always_drafting"])
def test_the_reported_top_k_request_alone(engines, config):
    """The smallest failing input: one raw prompt, temperature 1 with top_k=5, 4 tokens (the
    engine died in the CPU top-k path on a step without draft tokens); then the engine still
    serves."""
    from vllm import SamplingParams

    llm = engines.get(dtype="float32", speculative_config=config)
    for _ in range(2):
        out = llm.generate(["Hello"], SamplingParams(temperature=1.0, top_k=5, max_tokens=4),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("kwargs", [{"min_p": 0.1}, {"logit_bias": {504: 5.0}}])
def test_parameters_spec_decoding_lacks_are_refused_per_request(engines, kwargs):
    """vLLM refuses min_p and logit_bias for every speculative method before the request
    reaches the engine; the engine keeps serving."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = engines.get(dtype="float32", speculative_config=DEFAULTS)
    prompt = chat(llm.get_tokenizer(), PROMPTS[0])
    with pytest.raises(VLLMValidationError, match="not yet supported with speculative"):
        llm.generate([prompt], SamplingParams(temperature=0.8, max_tokens=4, **kwargs),
                     use_tqdm=False)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def _tokens(results) -> list[list[int]]:
    return [list(r.outputs[0].token_ids) for r in results]


@pytest.mark.parametrize("config", [ALWAYS, DEFAULTS], ids=["always_drafting", "defaults"])
def test_top_k_1_and_tiny_top_p_give_the_greedy_output(engines, config):
    """top_k=1, or a top_p that keeps only the most likely token, is greedy decoding at any
    temperature: alone, in a batch of its kind, and mixed with greedy and seeded requests,
    with layer-skip drafts on every step (the rejection sampler then sees a point-mass target
    against a sampled draft) and with the defaults (copies, some rows undrafted)."""
    from vllm import SamplingParams as S

    plain = engines.get(dtype="float32")
    prompts = [chat(plain.get_tokenizer(), p) for p in PROMPTS]
    greedy = S(temperature=0, max_tokens=MAX_TOKENS)
    expected = _tokens(plain.generate(prompts, greedy, use_tqdm=False))

    llm = engines.get(dtype="float32", speculative_config=config)
    point_masses = [S(temperature=t, top_k=1, max_tokens=MAX_TOKENS) for t in (0.5, 1.0, 1.7)]
    point_masses += [S(temperature=t, top_p=1e-6, max_tokens=MAX_TOKENS) for t in (0.7, 1.3)]
    for params in point_masses:
        assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == expected, params
    assert _tokens(llm.generate(prompts[:1], point_masses[1], use_tqdm=False)) == expected[:1]
    mixed = [point_masses[i % len(point_masses)] if i % 2 == 0
             else S(temperature=0.9, seed=100 + i, max_tokens=MAX_TOKENS) if i % 4 == 1
             else greedy for i in range(len(prompts))]
    got = _tokens(llm.generate(prompts, mixed, use_tqdm=False))
    for i, params in enumerate(mixed):
        if params.seed is None:
            assert got[i] == expected[i], (i, params)


# ------------------------------------------------------------------------------ seeds


def _seeded(i: int, n: int = 1):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.9, seed=1000 + i, n=n, max_tokens=64)


def test_a_seed_pins_the_output_whatever_else_runs(engines):
    """The default engine (adaptive draft budget) decides from measured step times; a seeded
    request's tokens must not depend on them: the same seeded request alone, twice, in two
    different batches, and after other traffic gives the same tokens."""
    from vllm import SamplingParams

    llm = engines.get(dtype="float32", speculative_config=DEFAULTS)
    tokenizer = llm.get_tokenizer()
    fib = chat(tokenizer, "Write a Python function that returns the n-th Fibonacci number.")
    alone = [_tokens(llm.generate([fib], _seeded(1), use_tqdm=False))[0] for _ in range(3)]
    assert alone[0] == alone[1] == alone[2]

    others = [chat(tokenizer, p) for p in CHAT_PROMPTS[8:16]]
    greedy = SamplingParams(temperature=0, max_tokens=64)
    batch_a = llm.generate([fib, *others[:3]], [_seeded(1), greedy, _seeded(2), greedy],
                           use_tqdm=False)
    llm.generate(others, SamplingParams(temperature=1.0, max_tokens=48), use_tqdm=False)
    batch_b = llm.generate([*others[3:7], fib], [greedy, _seeded(3), greedy, greedy,
                                                  _seeded(1)], use_tqdm=False)
    assert _tokens(batch_a)[0] == alone[0]
    assert _tokens(batch_b)[-1] == alone[0]
    # The other seeded requests of the mixed batches, alone.
    assert _tokens(llm.generate([others[1]], _seeded(2), use_tqdm=False))[0] == \
        _tokens(batch_a)[2]
    assert _tokens(llm.generate([others[4]], _seeded(3), use_tqdm=False))[0] == \
        _tokens(batch_b)[1]


def test_the_same_mixed_batch_twice_and_each_seeded_request_alone(engines):
    """A mixed batch: 8 short chat prompts, greedy and seeded (temperature 0.9, seed
    1000 + i, 64 tokens) alternating, sent twice with the defaults; then each seeded request
    alone, twice. Every seeded output is the same each time, in the batch and alone."""
    from vllm import SamplingParams

    llm = engines.get(dtype="float32", speculative_config=DEFAULTS)
    prompts = [chat(llm.get_tokenizer(), p) for p in PROMPTS]
    params = [_seeded(i) if i % 2 else SamplingParams(temperature=0, max_tokens=64)
              for i in range(len(prompts))]
    first, second = (_tokens(llm.generate(prompts, params, use_tqdm=False)) for _ in range(2))
    assert first == second
    for i in range(1, len(prompts), 2):
        alone = [_tokens(llm.generate([prompts[i]], params[i], use_tqdm=False))[0]
                 for _ in range(2)]
        assert alone[0] == alone[1] == first[i], i


def test_a_seed_pins_every_completion_of_n(engines):
    from vllm import SamplingParams

    llm = engines.get(dtype="float32", speculative_config=DEFAULTS)
    fib = chat(llm.get_tokenizer(), "Write a Python function that returns the n-th Fibonacci "
               "number.")
    params = SamplingParams(temperature=0.9, seed=7, n=4, max_tokens=64)  # one prompt, n=4, seeded
    first, second = (llm.generate([fib], params, use_tqdm=False)[0] for _ in range(2))
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
