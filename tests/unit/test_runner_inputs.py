"""`vllm.runner_inputs.step_inputs`: the runner's batch as the planner's plain inputs (a
stand-in runner with the attributes the V1 runner has; the contract suite checks the names)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from vllm_clasp.vllm.runner_inputs import step_inputs, tokens_left


def runner(max_tokens):
    batch = SimpleNamespace(
        req_ids=["a", "b", "c"],
        token_ids_cpu=np.zeros((4, 64), dtype=np.int32),
        num_tokens_no_spec=np.array([10, 40, 60, 0]),
        num_prompt_tokens=np.array([8, 30, 20, 0]),
        sampling_metadata=SimpleNamespace(generators={2: object()}),
    )
    requests = {r: SimpleNamespace(sampling_params=SimpleNamespace(max_tokens=m))
                for r, m in zip(batch.req_ids, max_tokens)}
    return SimpleNamespace(input_batch=batch, requests=requests)


def test_most_tokens_each_row_may_draft():
    r = runner([100, 12, None])  # b: 10 produced of 12; c: unbounded
    assert tokens_left(r, ["a", "b", "c"]).tolist() == [98, 2, np.iinfo(np.int32).max - 40]
    step = step_inputs(r, SimpleNamespace(scheduled_new_reqs=[]), [[1], [2, 3]],
                       num_speculative_tokens=8, max_model_len=64)
    # a: K; b: max_tokens leaves 2, a verification yields drafts + 1 -> 1; c: 64 - 60 = 4.
    assert step.max_draft.tolist() == [8, 1, 4]
    assert step.tokens_left.tolist() == [98, 2, np.iinfo(np.int32).max - 40]
    assert step.num_sampled == [1, 2, 0]  # rows the runner did not sample this step: 0
    assert step.req_ids == ["a", "b", "c"] and step.seeded == frozenset({2})
    assert step.has_prefill is False and step.num_tokens.tolist() == [10, 40, 60]
