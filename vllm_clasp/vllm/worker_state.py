"""The one way tools read CLaSp's state out of a worker: `read(worker, take_dp_log)`, run
through vLLM's `collective_rpc` (`LLM.collective_rpc(read, kwargs=...)`).

Tools (benchmark, layers report, tests) never reach into the runner or the proposer
themselves; `tests/unit/test_layering.py` checks that none names `drafter` or `planner`.
"""

from __future__ import annotations


def read(worker, take_dp_log: bool = False) -> dict | None:
    """Runs in a worker. None when the worker drafts with something else; else
    {"stats": ClaspStats.as_dict() (cumulative counters), "acceptance_by_m": {M: [judged,
    accepted]} (model-draft tokens per M), "dp_log": the DP runs since the last
    take_dp_log=True call (then cleared; [] when not taken)}."""
    from vllm_clasp.vllm.proposer import ClaspProposer

    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    if not isinstance(drafter, ClaspProposer):
        return None
    return drafter.state(take_dp_log)
