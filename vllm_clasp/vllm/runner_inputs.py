"""The V1 runner's state after a verification step, as the planner's plain inputs.

The one place that reads the runner's `input_batch` and `requests` for the step policy
(`core.planner.StepInputs`); the proposer adapter calls it and reads nothing else of the
runner's bookkeeping.
"""

from __future__ import annotations

import numpy as np

from vllm_clasp.core.planner import StepInputs


def step_inputs(runner, scheduler_output, sampled_token_ids: list[list[int]],
                num_speculative_tokens: int, max_model_len: int) -> StepInputs:
    """The batch's requests in input-batch row order: tokens so far [n, >= max len] (the
    runner's CPU buffer, not copied), tokens sampled this step, and the most tokens each row
    may draft: K, the room left in max_model_len, and its max_tokens less one (a verification
    yields its accepted drafts plus one token)."""
    batch = runner.input_batch
    req_ids = list(batch.req_ids)
    n = len(req_ids)
    num_tokens = batch.num_tokens_no_spec[:n]  # [n]
    num_sampled = [len(s) for s in sampled_token_ids[:n]]
    left = tokens_left(runner, req_ids)  # [n]
    return StepInputs(
        req_ids=req_ids, token_ids=batch.token_ids_cpu, num_tokens=num_tokens,
        num_sampled=num_sampled + [0] * (n - len(num_sampled)),
        max_draft=np.minimum(np.minimum(num_speculative_tokens, max_model_len - num_tokens),
                             left - 1),
        num_prompt_tokens=batch.num_prompt_tokens[:n],
        seeded=frozenset(batch.sampling_metadata.generators or ()),
        has_prefill=bool(scheduler_output.scheduled_new_reqs),
        tokens_left=left,
    )


def tokens_left(runner, req_ids: list[str]) -> np.ndarray:
    """[n] int64: tokens each request may still generate (max_tokens less its output so far;
    int32 max when unbounded)."""
    batch = runner.input_batch
    n = len(req_ids)
    produced = batch.num_tokens_no_spec[:n] - batch.num_prompt_tokens[:n]  # [n]
    limits = np.array([
        getattr(getattr(runner.requests.get(r), "sampling_params", None), "max_tokens", None)
        or np.iinfo(np.int32).max
        for r in req_ids], dtype=np.int64)  # [n]
    return limits - produced
