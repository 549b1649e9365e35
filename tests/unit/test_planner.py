"""The step planner (`core.planner`) on plain inputs: request lifetime, prompt-lookup drafts,
which requests get model drafts, how much is verified, crediting the last plan, seeded
requests, and the tensor-parallel broadcast path (host-free, milliseconds).

Finished and preempted requests are forgotten before anything else, so a request resumed
after preemption (its KV recomputed, its context possibly different from the one its skip set
was chosen for) gets a fresh DP run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_clasp.core.draft_budget import DraftBudget, choose_lengths
from vllm_clasp.core.options import ClaspOptions
from vllm_clasp.core.ngram_lookup import NGRAM as LOOKUP
from vllm_clasp.core.optimizer import SkipSearch
from vllm_clasp.core.stats import ClaspStats
from vllm_clasp.core.planner import MODEL, StepInputs, StepPlanner

REPEATED = [5, 6, 7, 8, 9, 5, 6, 7]  # row 0 ends in a repeat of "5 6 7"
FRESH = [1, 2, 3, 4, 10, 11, 12, 13]  # row 1 has no repeat
SKIP = torch.tensor([False, True, False])  # a 3-layer model's skip set


class FixedCost(DraftBudget):
    """A draft budget with a given verification cost on every step; records observations.
    Model drafts cost 100 x a verification step per pass (draft_ratio) unless a test says
    otherwise: never worth it."""

    def __init__(self, cost, draft_ratio: float = 100.0):
        super().__init__(draft_ratio=draft_ratio)
        # (fixed, per token[, overhead of verifying any draft: 0 unless given])
        self.cost = None if cost is None else (*cost, 0.0)[:3]
        self.observed = []

    def start_step(self, batch_size: int):
        return self.cost

    def observe(self, batch_size, tokens_verified, seconds) -> None:
        self.observed.append((batch_size, tokens_verified))


def planner_with(cost=(0.05, 0.0), lookup: int = 3, adaptive: bool = True,
                 copy_source: str = "ngram", share: bool = True, **kwargs) -> StepPlanner:
    options = ClaspOptions(prompt_lookup_max=lookup, adaptive=adaptive, loi=16,
                           copy_source=copy_source, share_skip_sets=share,
                           ).resolve(num_layers=3, vocab_size=100)
    budget = FixedCost(cost) if adaptive else None
    kwargs.setdefault("layer_costs", [1.0] * 3)
    return StepPlanner(options, budget=budget, **kwargs)


def inputs(sampled=(1, 1), req_ids=("a", "b"), new=False, seeded=()) -> StepInputs:
    return StepInputs(
        req_ids=list(req_ids), token_ids=np.array([REPEATED, FRESH][: len(req_ids)]),
        num_tokens=np.full(len(req_ids), 8), num_sampled=list(sampled),
        max_draft=np.full(len(req_ids), 8), seeded=frozenset(seeded), has_prefill=new,
    )


def search_giving(masks: torch.Tensor) -> SkipSearch:
    """A DP result whose skip_mask at each row's own M (its mask's size) is masks [B, L]."""
    B, L = masks.shape
    skipped = torch.zeros(L, B, L + 1, dtype=torch.bool)  # [L, B, J+1]
    final = torch.full((B, L + 1), float("nan"))
    for b in range(B):
        j = 0
        for i in range(L):
            if masks[b, i]:
                j += 1
                skipped[i, b, j] = True
        final[b, j] = 0.9
    return SkipSearch(skipped, final)


def step(planner: StepPlanner, made=None, **kwargs) -> list[list[int]]:
    """One step as the adapter runs it; `made(plan)` stands in for the model's drafts."""
    step_inputs = inputs(**kwargs)
    plan = planner.plan(step_inputs)
    if plan is None:
        return [[] for _ in step_inputs.req_ids]
    drafts = made(plan) if made else {}
    assert made or not plan.model_rows, "this test has no model to draft with"
    if plan.model_rows:
        planner.skip_masks(plan, step_inputs, search_giving(
            SKIP.expand(len(plan.search_rows), -1)) if plan.search_rows else None)
    return planner.finish(plan, step_inputs, drafts, 0.001).tokens


# ------------------------------------------------------------------ request lifetime


def test_preempted_and_finished_requests_are_forgotten():
    planner = planner_with()
    for req_id in "abc":
        planner.skip_sets.tracker.update(req_id, SKIP)
    planner.forget({"c"})
    planner.forget({"b"})
    assert "a" in planner.skip_sets.tracker
    assert "b" not in planner.skip_sets.tracker and "c" not in planner.skip_sets.tracker
    assert not planner.skip_sets.tracker.is_due("a")
    assert planner.skip_sets.tracker.is_due("b"), "a resumed request must be searched afresh"


def test_preempted_ids_may_be_none():
    planner = planner_with()
    planner.skip_sets.tracker.update("a", SKIP)
    planner.forget(None)
    assert "a" in planner.skip_sets.tracker


def test_forgetting_every_request_empties_the_state_and_the_gauge():
    """The step after the last requests finish schedules nothing: the patched execute_model
    calls forget() so an idle engine holds (and reports) no CLaSp state."""
    planner = planner_with()
    for req_id in "ab":
        planner.skip_sets.tracker.update(req_id, SKIP)
    planner.stats.tracked_requests = 2
    planner.forget({"a", "b"})
    assert len(planner.skip_sets.tracker) == 0
    assert planner.stats.take_delta()["tracked_requests"] == 0


def test_nothing_decodes_nothing_is_planned():
    planner = planner_with()
    assert planner.plan(inputs(sampled=(0, 0))) is None
    assert step(planner, sampled=(0, 0)) == [[], []]


# ------------------------------------------------------------------ prompt lookup and costs


def test_prompt_lookup_drafts_and_model_off_for_the_rest():
    planner = planner_with()
    # Row 0 copies what followed the earlier "5 6 7" (verification is free: all of it); row 1
    # gets nothing: a model draft would cost more than it is expected to gain.
    assert step(planner) == [[8, 9, 5, 6, 7], []]
    assert planner.stats.num_copy_draft_rounds == 1 and planner.stats.num_speculation_off_rounds == 1
    assert planner.stats.num_speculation_off_steps == 0  # one request drafted
    # The next step credits the previous one: 2 requests verified 2 + 5 tokens; request "a"
    # got 2 of its 5 copied tokens accepted (3 sampled = 2 accepted + the correction).
    step(planner, sampled=(3, 1))
    assert planner.budget.observed == [(2, 7)]
    assert planner.acceptance.rate("a", LOOKUP) > planner.acceptance.source_rate(LOOKUP)
    step(planner, new=True)  # a prefill in the step: its time is not credited
    assert len(planner.budget.observed) == 1


def test_finished_requests_acceptance_is_forgotten():
    planner = planner_with()
    step(planner)
    step(planner, sampled=(3, 1))
    assert len(planner.acceptance) == 1
    planner.forget({"a"})
    assert len(planner.acceptance) == 0


def test_measured_costs_truncate_copied_drafts():
    """With verification paying per token, only the copied tokens likely enough to be
    accepted are verified (rate 0.5 before any observation: gains 0.5, 0.25, 0.125, ...)."""
    fixed, per_token = 0.010, 0.001
    planner = planner_with(cost=(fixed, per_token))
    # Both requests verify one token each (E = 2 tokens in T = 0.012 s); a copied token of
    # gain g is worth its 0.001 s while g * T > E * 0.001: 0.5 and 0.25 are, 0.125 is not.
    assert choose_lengths([5, 0], [0.5, 0.5], fixed, per_token) == [2, 0]
    assert step(planner) == [[8, 9], []]
    assert planner.stats.num_unverified_draft_tokens == 3
    # Verification as expensive as a whole step per token: nothing is worth verifying.
    planner = planner_with(cost=(fixed, fixed))
    assert step(planner) == [[], []]
    assert planner.stats.num_speculation_off_steps == 1 and planner.stats.num_unverified_draft_tokens == 5


def test_drafts_never_exceed_the_room_each_request_has():
    """max_draft: K, clipped by the context left and by max_tokens (a request with one token
    to go drafts nothing)."""
    planner = planner_with()
    step_inputs = inputs()
    step_inputs.max_draft = np.array([2, 0])
    plan = planner.plan(step_inputs)
    assert plan.rows == [0, 1]  # both decode (and count in the step's cost)...
    assert plan.copied[0].tolist() == [8, 9] and plan.model_rows == []  # ...row 1 drafts none
    assert planner.finish(plan, step_inputs, {}, 0.0).tokens == [[8, 9], []]
    assert planner.stats.num_speculation_off_rounds == 1


def test_lookup_off_leaves_every_request_to_the_model():
    planner = planner_with(lookup=0, adaptive=False)
    plan = planner.plan(inputs())
    assert plan.copied == {} and plan.model_rows == [0, 1]


# ------------------------------------------------------------------ model drafts and the DP


def test_model_drafts_go_to_requests_worth_their_cost():
    planner = planner_with(cost=(0.05, 0.001))
    step_inputs = inputs()
    for _ in range(20):  # "a" drafts well with the model, "b" badly
        planner.acceptance.observe("a", MODEL, drafted=2, accepted=2)
        planner.acceptance.observe("b", MODEL, drafted=2, accepted=0)
    planner.budget.draft_ratio = 0.1  # a cheap draft: worth it for "a" alone
    assert planner._model_rows(step_inputs, (0.05, 0.001, 0.0), [0, 1], {}, {}, 2) == [0]
    planner.budget.draft_ratio = 5.0  # drafting dearer than anything it could gain
    assert planner._model_rows(step_inputs, (0.05, 0.001, 0.0), [0, 1], {}, {}, 2) == []
    # No fit yet, or exploring: one request (the most promising) drafts, to measure.
    assert planner._model_rows(step_inputs, None, [0, 1], {}, {}, 2) == [0]


def test_model_rows_are_searched_when_due_then_every_loi_drafting_steps():
    planner = planner_with(lookup=0, adaptive=False, share=False)
    planner.skip_sets.tracker.loi = 2
    step_inputs = inputs()
    plan = planner.plan(step_inputs)
    assert plan.model_rows == plan.search_rows == [0, 1]  # new requests: no skip set yet
    assert plan.shared_rows == frozenset() and plan.search_groups is None
    masks = planner.skip_masks(plan, step_inputs, search_giving(torch.stack([SKIP, SKIP])), 0.01)
    assert masks.tolist() == [SKIP.tolist(), SKIP.tolist()]
    assert planner.stats.num_dp_runs == 2
    made = {0: np.array([3, 4]), 1: np.array([7])}
    assert planner.finish(plan, step_inputs, made, 0.002).tokens == [[3, 4], [7]]
    assert planner.stats.num_model_draft_rounds == 2 and planner.stats.num_model_draft_tokens == 3
    assert planner.plan(inputs(sampled=(3, 2))).search_rows == []  # 1 step since the DP
    assert planner.plan(inputs(sampled=(1, 1))).search_rows == [0, 1]  # LOI = 2 reached


def test_a_plan_that_asks_for_a_dp_run_refuses_to_draft_without_one():
    planner = planner_with(lookup=0, adaptive=False)
    step_inputs = inputs()
    plan = planner.plan(step_inputs)
    with pytest.raises(ValueError, match="DP run"):
        planner.skip_masks(plan, step_inputs)


def test_requests_drafting_together_share_one_set_searched_every_loi_shared_steps():
    """Two unseeded model rows share one set (one DP group); a seeded one keeps its own;
    a row drafting alone uses its own set; the union metric counts the shared set once."""
    planner = planner_with(lookup=0, adaptive=False)
    planner.skip_sets.shared.loi = 2
    step_inputs = inputs()
    plan = planner.plan(step_inputs)
    assert plan.shared_rows == {0, 1} and plan.search_rows == [0, 1]
    assert plan.search_groups == [0, 0]
    masks = planner.skip_masks(plan, step_inputs, search_giving(torch.stack([SKIP, SKIP])))
    assert masks.tolist() == [SKIP.tolist()] * 2
    assert planner.stats.num_dp_runs == 1 and len(planner.skip_sets) == 0
    planner.finish(plan, step_inputs, {0: np.array([3]), 1: np.array([7])}, 0.001)
    assert planner.stats.num_model_draft_steps == 1
    assert planner.stats.draft_union_kept_layers == 2 == planner.stats.draft_mean_kept_layers
    assert planner.plan(inputs(sampled=(2, 2))).search_rows == []  # shared set, 1 step old
    plan = planner.plan(inputs(sampled=(1, 1), seeded={1}))  # b seeded: nobody shares
    assert plan.shared_rows == frozenset() and plan.search_rows == [0, 1]
    plan = planner.plan(inputs(sampled=(1, 1)))
    assert plan.shared_rows == {0, 1} and plan.search_rows == [0, 1]  # LOI = 2 shared steps


def test_per_request_sets_drafting_together_cost_their_union():
    stats = ClaspStats()
    stats.record_drafts(torch.tensor([[True, False, False, True],
                                      [False, True, False, True]]), [2, 1], 0.01)
    assert stats.draft_union_kept_layers == 3 and stats.draft_mean_kept_layers == 2.0


def test_copied_and_model_drafts_are_verified_jointly():
    """Per token the verification costs 0.001 s: the model's and the copy's tokens compete
    for it in order of expected gain, and the model's (rate 0.9) win."""
    planner = planner_with(cost=(0.010, 0.001))
    planner.budget.draft_ratio = 0.01
    for _ in range(50):
        planner.acceptance.observe("b", MODEL, drafted=4, accepted=4)
    step_inputs = inputs()
    plan = planner.plan(step_inputs)
    assert plan.model_rows == plan.search_rows == [1] and list(plan.copied) == [0]
    planner.skip_masks(plan, step_inputs, search_giving(SKIP[None]), 0.001)
    drafts = planner.finish(plan, step_inputs, {1: np.array([1, 2, 3, 4])}, 0.001)
    assert len(drafts.tokens[1]) == 4 and len(drafts.tokens[0]) < 4
    assert drafts.copied[0].tolist() == drafts.tokens[0]


# ------------------------------------------------------------------ seeds


def test_seeded_requests_draft_by_their_own_tokens_whatever_the_costs():
    """A seeded request's output depends on what is drafted for it, so measured costs must
    not shape its drafts: its own-context copy is verified in full, it gets no model draft
    under the budget (whether one pays is measured in time), and with the budget off it
    drafts like every other row; unseeded requests follow the budget."""
    fixed = 0.010
    planner = planner_with(cost=(fixed, fixed))  # verifying costs a step per token
    assert step(planner) == [[], []]
    assert step(planner, seeded={0}) == [[8, 9, 5, 6, 7], []]
    assert planner.plan(inputs(seeded={1})).model_rows == []
    planner.budget.draft_ratio = 0.0  # model drafts free: unseeded rows take them
    step_inputs = inputs(seeded={1})
    assert planner._model_rows(step_inputs, (0.05, 0.001, 0.0), [0, 1], {}, {}, 2) == [0]
    off = planner_with(adaptive=False)
    assert off._model_rows(step_inputs, None, [0, 1], {}, {}, 2) == [0, 1]


# ------------------------------------------------------------------ tensor parallelism


class Rank0:
    """Records what rank 0 broadcasts."""

    def __init__(self):
        self.sent: list[torch.Tensor] = []

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sent.append(tensor.clone())
        return tensor


class OtherRank:
    """Receives rank 0's tensors in order (checking shape and dtype agree)."""

    def __init__(self, sent: list[torch.Tensor]):
        self.sent = list(sent)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        received = self.sent.pop(0)
        assert received.shape == tensor.shape and received.dtype == tensor.dtype
        return received


def test_every_rank_follows_rank_0s_time_based_decisions():
    """Rank 1 measures a different cost (here: verification dear), but the cost, the trimmed
    lengths and the model rows it acts on are rank 0's, so both ranks run the same layers."""
    rank0 = Rank0()
    leader = planner_with(cost=(0.010, 0.0), broadcast=rank0)
    expected = step(leader)
    assert expected == [[8, 9, 5, 6, 7], []]
    assert len(rank0.sent) >= 2  # the cost, then the copied lengths
    follower_channel = OtherRank(rank0.sent)
    follower = planner_with(cost=(0.010, 0.010), broadcast=follower_channel)
    assert step(follower) == expected
    assert follower_channel.sent == [], "the ranks broadcast in the same order"
    alone = planner_with(cost=(0.010, 0.010))
    assert step(alone) == [[], []], "without the broadcast rank 1 would have decided otherwise"


def test_a_closed_batch_trims_the_copies_of_requests_ahead_of_the_critical_path():
    """Two requests with the same copy: while the batch is open both verify the same prefix;
    once nobody has joined for CLOSED_AFTER steps, the one with fewer tokens left (ahead)
    verifies less of it, and the steps it was ahead are counted."""
    from vllm_clasp.core.closed_batch import CLOSED_AFTER

    planner = planner_with(cost=(0.019, 0.0019))
    step = StepInputs(req_ids=["a", "b"], token_ids=np.array([REPEATED, REPEATED]),
                      num_tokens=np.full(2, 8), num_sampled=[1, 1], max_draft=np.full(2, 8),
                      tokens_left=np.array([90, 50]))
    lengths = []
    for _ in range(CLOSED_AFTER + 1):
        plan = planner.plan(step)
        lengths.append([len(plan.copied.get(i, ())) for i in (0, 1)])
    assert all(a == b > 0 for a, b in lengths[:-1])  # open: the same copy, the same prefix
    critical, ahead = lengths[-1]
    assert critical >= lengths[0][0] and ahead < critical
    assert plan.weights == {0: 1.0, 1: pytest.approx(0.25)}
    assert planner.stats.num_ahead_rounds == 1
