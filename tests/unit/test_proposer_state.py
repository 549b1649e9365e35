"""ClaspProposer's per-request state across a step: finished and preempted requests are
forgotten before anything else, so a request resumed after preemption (its KV recomputed, its
context possibly different from the one its skip set was chosen for) gets a fresh DP run.

A fake runner with no request to draft for: `propose_for_runner` then does only its
bookkeeping (host-free, milliseconds).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from vllm_clasp.draft_budget import AcceptanceRates, DraftBudget, choose_lengths
from vllm_clasp.proposer import ClaspProposer
from vllm_clasp.skip_state import SkipSetTracker
from vllm_clasp.stats import ClaspStats


def proposer_with(live: list[str], tracked: list[str]) -> ClaspProposer:
    proposer = ClaspProposer.__new__(ClaspProposer)  # no vLLM config or model needed
    proposer.num_speculative_tokens = 8
    proposer.max_model_len = 2048
    proposer.tracker = SkipSetTracker(loi=16)
    proposer.budget = DraftBudget(enabled=False)
    proposer.acceptance = AcceptanceRates()
    proposer.stats = ClaspStats()
    proposer._last_step = None
    proposer.rows = object()  # not None: PagedRows is built on first use otherwise
    proposer.runner = SimpleNamespace(
        input_batch=SimpleNamespace(
            req_ids=list(live), num_tokens_no_spec=np.full(len(live), 10, dtype=np.int64),
        ),
        requests=dict.fromkeys(live),
    )
    for req_id in tracked:
        proposer.tracker.update(req_id, torch.tensor([False, True, False]))
    return proposer


def step(proposer, finished=(), preempted=None):
    scheduler_output = SimpleNamespace(
        finished_req_ids=set(finished), preempted_req_ids=preempted, scheduled_new_reqs=[],
    )
    live = proposer.runner.input_batch.req_ids
    # No sampled tokens: nothing to draft, only the state bookkeeping runs.
    return proposer.propose_for_runner(scheduler_output, [[] for _ in live])


def test_preempted_and_finished_requests_are_forgotten():
    proposer = proposer_with(live=["a"], tracked=["a", "b", "c"])
    proposer.runner.requests.update(b=None, c=None)  # still known to the runner
    assert step(proposer, finished={"c"}, preempted={"b"}) == [[]]
    assert "a" in proposer.tracker
    assert "b" not in proposer.tracker and "c" not in proposer.tracker
    assert not proposer.tracker.is_due("a")
    assert proposer.tracker.is_due("b"), "a resumed request must be searched afresh"


def test_preempted_ids_may_be_none():
    proposer = proposer_with(live=["a"], tracked=["a"])
    step(proposer, preempted=None)
    assert "a" in proposer.tracker


def test_state_of_requests_the_runner_forgot_is_dropped():
    """A step that never reached the proposer (no tokens scheduled) still must not leak."""
    proposer = proposer_with(live=["a"], tracked=["a", "gone1", "gone2"])
    step(proposer)
    assert len(proposer.tracker) == 1 and "a" in proposer.tracker


def test_forget_on_a_step_that_never_drafts_empties_the_state():
    """The step after the last requests finish schedules nothing: the patched execute_model
    calls forget() so an idle engine holds (and reports) no CLaSp state."""
    proposer = proposer_with(live=[], tracked=["a", "b"])
    proposer.stats.tracked_requests = 2
    proposer.forget(SimpleNamespace(finished_req_ids={"a", "b"}, preempted_req_ids=None))
    assert len(proposer.tracker) == 0
    assert proposer.stats.take_delta()["tracked_requests"] == 0


class _FixedCost(DraftBudget):
    """A draft budget with a given verification cost on every step; records observations.
    Model drafts cost 100 x a verification step per pass (draft_ratio): never worth it, as
    these tests have no model to draft with."""

    def __init__(self, cost):
        super().__init__(draft_ratio=100.0)
        self.cost, self.observed = cost, []

    def start_step(self, batch_size: int):
        return self.cost

    def observe(self, batch_size, tokens_verified, seconds) -> None:
        self.observed.append((batch_size, tokens_verified))


def speculating_proposer(cost=(0.05, 0.0)) -> ClaspProposer:
    repeated = [5, 6, 7, 8, 9, 5, 6, 7]  # row 0 ends in a repeat of "5 6 7"
    fresh = [1, 2, 3, 4, 10, 11, 12, 13]  # row 1 has no repeat
    proposer = proposer_with(live=["a", "b"], tracked=[])
    proposer.tp_size = 1
    proposer.resolved = SimpleNamespace(prompt_lookup_max=3, prompt_lookup_min=3)
    proposer.budget = _FixedCost(cost)
    batch = proposer.runner.input_batch
    batch.num_tokens_no_spec = np.array([8, 8])
    batch.token_ids_cpu = np.array([repeated, fresh])
    batch.sampling_metadata = SimpleNamespace(all_greedy=True, generators={})
    return proposer


def propose(proposer, new_reqs=(), sampled=([1], [1])):
    scheduler_output = SimpleNamespace(finished_req_ids=set(), preempted_req_ids=None,
                                       scheduled_new_reqs=list(new_reqs))
    return proposer.propose_for_runner(scheduler_output, [list(s) for s in sampled])


def test_prompt_lookup_drafts_and_model_off_for_the_rest():
    proposer = speculating_proposer()
    # Row 0 copies what followed the earlier "5 6 7" (verification is free: all of it); row 1
    # gets nothing: a model draft would cost more than it is expected to gain.
    assert propose(proposer) == [[8, 9, 5, 6, 7], []]
    assert proposer.stats.num_prompt_lookup_rounds == 1 and proposer.stats.num_plain_rounds == 1
    assert proposer.stats.num_plain_steps == 0  # one request drafted
    # The next step credits the previous one: 2 requests verified 2 + 5 tokens; request "a"
    # got 2 of its 5 copied tokens accepted (3 sampled = 2 accepted + the correction).
    propose(proposer, sampled=([8, 9, 4], [1]))
    assert proposer.budget.observed == [(2, 7)]
    assert proposer.acceptance.rate("a", "lookup") > proposer.acceptance.source_rate("lookup")
    propose(proposer, new_reqs=["c"])  # a prefill in the step: its time is not credited
    assert len(proposer.budget.observed) == 1


def test_finished_requests_acceptance_is_forgotten():
    proposer = speculating_proposer()
    propose(proposer)
    propose(proposer, sampled=([8, 9, 4], [1]))
    assert len(proposer.acceptance) == 1
    proposer.forget(SimpleNamespace(finished_req_ids={"a"}, preempted_req_ids=None))
    assert len(proposer.acceptance) == 0


def test_measured_costs_truncate_copied_drafts():
    """With verification paying per token, only the copied tokens likely enough to be
    accepted are verified (rate 0.5 before any observation: gains 0.5, 0.25, 0.125, ...)."""
    fixed, per_token = 0.010, 0.001
    proposer = speculating_proposer(cost=(fixed, per_token))
    # Both requests verify one token each (E = 2 tokens in T = 0.012 s); a copied token of
    # gain g is worth its 0.001 s while g * T > E * 0.001: 0.5 and 0.25 are, 0.125 is not.
    assert choose_lengths([5, 0], [0.5, 0.5], fixed, per_token) == [2, 0]
    drafts = propose(proposer)
    assert drafts == [[8, 9], []]
    assert proposer.stats.num_unverified_draft_tokens == 3
    # Verification as expensive as a whole step per token: nothing is worth verifying.
    proposer = speculating_proposer(cost=(fixed, fixed))
    assert propose(proposer) == [[], []]
    assert proposer.stats.num_plain_steps == 1 and proposer.stats.num_unverified_draft_tokens == 5


def test_model_drafts_go_to_requests_worth_their_cost():
    proposer = speculating_proposer(cost=(0.05, 0.001))
    proposer.runner.input_batch.req_ids = ["a", "b"]
    for _ in range(20):  # "a" drafts well with the model, "b" badly
        proposer.acceptance.observe("a", "model", drafted=2, accepted=2)
        proposer.acceptance.observe("b", "model", drafted=2, accepted=0)
    proposer.budget.draft_ratio = 0.1  # a cheap draft: worth it for "a" alone
    assert proposer._model_rows((0.05, 0.001), [0, 1], {}, num_rows=2) == [0]
    proposer.budget.draft_ratio = 5.0  # drafting dearer than anything it could gain
    assert proposer._model_rows((0.05, 0.001), [0, 1], {}, num_rows=2) == []
    # No fit yet, or exploring: one request (the most promising) drafts, to measure.
    assert proposer._model_rows(None, [0, 1], {}, num_rows=2) == [0]


def test_seeded_requests_draft_by_the_fixed_policy_whatever_the_costs():
    """A seeded request's output depends on what is drafted for it, so measured costs must
    not shape its drafts: its copied draft is verified in full and, without one, it always
    gets a model draft, while unseeded requests follow the budget."""
    fixed = 0.010
    proposer = speculating_proposer(cost=(fixed, fixed))  # verifying costs a step per token
    batch = proposer.runner.input_batch
    batch.sampling_metadata = SimpleNamespace(all_greedy=True, generators={0: object()})
    assert proposer._truncate((fixed, fixed), {0: np.array([8, 9]), 1: np.array([3, 4])},
                              {0: "lookup", 1: "lookup"}) == {}  # nothing seeded yet
    drafts = propose(proposer)  # sets this step's seeded rows from the sampling metadata
    assert drafts[0] == [8, 9, 5, 6, 7]
    kept = proposer._truncate((fixed, fixed), {0: np.array([8, 9]), 1: np.array([3, 4])},
                              {0: "lookup", 1: "lookup"})
    assert list(kept) == [0] and kept[0].tolist() == [8, 9]
    proposer._seeded = {1}
    proposer.budget.draft_ratio = 5.0  # model drafts never pay for unseeded requests
    assert proposer._model_rows((0.05, 0.001), [0, 1], {}, num_rows=2) == [1]
    assert proposer._model_rows(None, [0, 1], {}, num_rows=2) == [0, 1]
