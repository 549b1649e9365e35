"""The draft budget: the step-cost fit, acceptance rates, and the choice of draft lengths
(brute force over every combination of draft prefixes on small cases)."""

from __future__ import annotations

import itertools
import random

import pytest

from vllm_clasp.core.draft_budget import (
    MIN_STEPS,
    AcceptanceRates,
    DraftBudget,
    MODEL_DRAFT_MARGIN,
    UNFITTED_MODEL_EVERY,
    StepCostFit,
    choose_lengths,
    choose_rows,
    expected_accepted,
)


def tokens_per_second(lengths, rates, fixed, per_token, overhead=0.0, weights=None) -> float:
    weights = weights or [1.0] * len(lengths)
    expected = sum(w * (1 + sum(rate ** i for i in range(1, k + 1)))
                   for k, rate, w in zip(lengths, rates, weights))
    return expected / (fixed + per_token * sum(1 + k for k in lengths)
                       + (overhead if any(lengths) else 0.0))


@pytest.mark.parametrize("seed", range(40))
def test_choice_maximises_expected_tokens_per_second(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    candidates = [rng.randint(0, 4) for _ in range(n)]
    rates = [rng.uniform(0.05, 0.95) for _ in range(n)]
    fixed = rng.uniform(0.005, 0.1)
    per_token = fixed * rng.choice([0.0, 0.01, 0.1, 0.3, 1.0, 3.0])
    overhead = fixed * rng.choice([0.0, 0.0, 0.05, 0.2, 1.0])
    weights = rng.choice([None, [rng.choice([1.0, 0.25, 0.05]) for _ in range(n)]])
    chosen = choose_lengths(candidates, rates, fixed, per_token, overhead=overhead,
                            weights=weights)
    assert all(0 <= k <= c for k, c in zip(chosen, candidates))
    best = max(
        tokens_per_second(lengths, rates, fixed, per_token, overhead, weights)
        for lengths in itertools.product(*(range(c + 1) for c in candidates))
    )
    assert tokens_per_second(chosen, rates, fixed, per_token, overhead, weights) == (
        pytest.approx(best, rel=1e-12))


def test_free_verification_keeps_every_candidate():
    assert choose_lengths([3, 0, 8], [0.01, 0.5, 0.2], fixed=0.05, per_token=0.0) == [3, 0, 8]


def test_costly_verification_keeps_only_likely_tokens():
    # Verifying a token costs a tenth of a step: a token must be accepted with a
    # probability above ~0.1 x the tokens per step already expected.
    assert choose_lengths([8, 8], [0.9, 0.1], fixed=0.09, per_token=0.01)[1] == 0
    assert choose_lengths([8, 8], [0.9, 0.1], fixed=0.09, per_token=0.01)[0] >= 5


def test_fit_recovers_a_line_and_waits_for_spread():
    fit = StepCostFit()
    for _ in range(MIN_STEPS + 5):
        fit.observe(4, 0.05)
    assert fit.estimate() is None  # every step verified 4 tokens: no slope to see
    rng = random.Random(0)
    fit = StepCostFit()
    for _ in range(200):
        n = rng.randint(1, 40)
        fit.observe(n, 0.02 + 0.003 * n + rng.gauss(0, 0.001))
    fixed, per_token, overhead = fit.estimate()
    assert fixed == pytest.approx(0.02, abs=0.002)
    assert per_token == pytest.approx(0.003, rel=0.05)
    assert overhead == pytest.approx(0.0, abs=0.002)


def test_fit_separates_the_speculative_paths_jump_from_the_per_token_cost():
    """Steps that verify drafts pay 5 ms once, and 0.2 ms per token: a line through all
    steps would call the jump a per-token cost."""
    rng = random.Random(1)
    fit = StepCostFit()
    for _ in range(300):
        drafts = rng.choice([0, 0, 1, 2, 3, 6, 12])
        seconds = 0.03 + (0.005 if drafts else 0.0) + 0.0002 * (1 + drafts)
        fit.observe(1 + drafts, seconds + rng.gauss(0, 0.0003), drafted=drafts > 0)
    fixed, per_token, overhead = fit.estimate()
    assert overhead == pytest.approx(0.005, rel=0.1)
    assert per_token == pytest.approx(0.0002, abs=0.0001)
    assert fixed == pytest.approx(0.0302, rel=0.02)
    # Hence: any draft is verified in full, or none (a 1-token draft accepted at 0.1 does
    # not pay for the jump; a long likely one does).
    cost = (fixed, per_token, overhead)
    assert choose_lengths([1], [0.1], *cost[:2], overhead=overhead) == [0]
    assert choose_lengths([8], [0.9], *cost[:2], overhead=overhead) == [8]


def test_fit_follows_a_change():
    fit = StepCostFit()
    for i in range(300):
        fit.observe(1 + i % 9, 0.05 + 0.01 * (1 + i % 9))
    for i in range(300):  # the machine got faster per token
        fit.observe(1 + i % 9, 0.05 + 0.001 * (1 + i % 9))
    assert fit.estimate()[1] == pytest.approx(0.001, rel=0.05)


def test_fit_slope_is_never_negative():
    fit = StepCostFit()
    for n in range(1, 20):
        fit.observe(n, 0.1 - 0.001 * n)
    assert fit.estimate()[1] == 0.0


def test_acceptance_rates_count_judged_positions_and_shrink_to_the_source():
    rates = AcceptanceRates(prior=0.5, prior_weight=4)
    assert rates.rate("a", "lookup") == 0.5
    rates.observe("a", "lookup", drafted=5, accepted=5)  # 5 judged, 5 kept
    rates.observe("b", "lookup", drafted=5, accepted=0)  # 1 judged (the first), 0 kept
    assert rates.source_rate("lookup") == pytest.approx((5 + 2) / (6 + 4))
    source = rates.source_rate("lookup")
    assert rates.rate("a", "lookup") == pytest.approx((5 + 4 * source) / (5 + 4))
    assert rates.rate("b", "lookup") == pytest.approx((0 + 4 * source) / (1 + 4))
    assert rates.rate("a", "model") == 0.5  # sources are separate
    assert len(rates) == 2
    rates.drop({"a"})
    assert len(rates) == 1
    rates.drop({"b"})
    assert len(rates) == 0


def test_budget_explores_and_switches_off():
    budget = DraftBudget(explore_every=4)
    assert budget.start_step(1) is None  # no fit yet: verify everything
    for i in range(20):
        budget.observe(1, 1 + i % 5, 0.05 + 0.001 * (1 + i % 5))
    decided = []
    for _ in range(8):  # a fitted decision that drafts keeps exploration every 4th step
        decided.append(budget.start_step(1))
        if decided[-1] is not None:
            budget.model_rows(decided[-1], [5.0], expected=1.0, seconds=1.0)
    assert sum(d is None for d in decided) == 2  # every 4th step of the bucket explores
    assert all(d is not None for i, d in enumerate(decided, start=2) if i % 4)
    assert budget.lengths(None, [3, 2], [0.1, 0.1]) == [3, 2]
    off = DraftBudget(enabled=False)
    off.observe(1, 3, 0.05)
    assert off.start_step(1) is None and off.fits == {}


def test_model_exploration_backs_off_while_model_drafts_stay_off():
    """Every 4th step still verifies every copy; fitted decisions that never draft with the
    model double the interval of model explorations on those steps (4, 8, 16, ...), and
    one that drafts brings it back to every 4th step."""
    budget = DraftBudget(explore_every=4)
    budget.start_step(1)
    for i in range(20):
        budget.observe(1, 1 + i % 5, 0.05 + 0.001 * (1 + i % 5))

    def run(steps, gain):
        verified_all, explored = [], []
        for step in steps:
            cost = budget.start_step(1)
            drafted = budget.model_rows(cost, [gain], expected=1.0, seconds=0.05)
            if cost is None:
                verified_all.append(step)
                if drafted[0]:
                    explored.append(step)
            else:
                assert drafted == [gain > 1]
        return verified_all, explored

    verified_all, explored = run(range(2, 81), gain=0.01)
    assert verified_all == list(range(4, 81, 4))
    assert explored == [4, 12, 28, 60]  # intervals 8, 16, 32 after 4
    run([81], gain=50.0)  # a fitted decision drafts
    _, explored = run(range(82, 200), gain=0.01)
    assert explored[:2] == [124, 128], explored  # 64 after 60, then back to 4


@pytest.mark.parametrize("seed", range(40))
def test_row_choice_maximises_expected_tokens_per_second(seed):
    """Against every subset of requests (the best subset of each size is the top gains)."""
    rng = random.Random(seed)
    gains = [rng.uniform(0.0, 3.0) for _ in range(rng.randint(1, 5))]
    pass_cost, row_cost = rng.choice([0.0, rng.uniform(0.0, 0.1)]), rng.uniform(0.001, 0.05)
    expected, seconds = rng.uniform(1, 10), rng.uniform(0.02, 0.2)
    chosen = choose_rows(gains, pass_cost, row_cost, expected, seconds)

    def rate(mask):
        k = sum(mask)
        return ((expected + sum(g for g, m in zip(gains, mask) if m))
                / (seconds + (pass_cost if k else 0.0) + row_cost * k))

    best = max(rate(mask) for mask in itertools.product([False, True], repeat=len(gains)))
    assert rate(chosen) == pytest.approx(best, rel=1e-12)


def test_a_fixed_pass_cost_needs_enough_gain_in_total():
    # One request alone does not pay for the pass; three together do.
    assert choose_rows([0.5], 0.05, 0.001, expected=1, seconds=0.05) == [False]
    assert choose_rows([1.5, 1.5, 1.5], 0.05, 0.001, expected=3, seconds=0.05) == [True] * 3


def test_expected_accepted():
    assert expected_accepted(0.5, 0) == 0
    assert expected_accepted(0.5, 2) == pytest.approx(0.5 + 0.25)
    assert expected_accepted(0.5, 1.5) == pytest.approx(0.5 + 0.5 * 0.25)
    assert expected_accepted(1.0, 8) == 8


def test_model_rows_from_the_measured_draft_ratio():
    budget = DraftBudget(explore_every=1000, loi=16)
    for i in range(40):  # verification: 50 ms + 10 ms per token
        budget.observe(8, 8 + i % 9, 0.05 + 0.01 * (8 + i % 9))
    cost = budget.start_step(8)
    assert cost == pytest.approx((0.05, 0.01, 0.0), rel=1e-6, abs=1e-9)
    # Drafts of 2 tokens for 4 requests took 2 x (50 ms + 4 x 10 ms) x 0.5: ratio 0.5.
    for _ in range(60):
        budget.observe_model(8, [2, 2, 2, 2], 0.5 * (2 * 0.05 + 0.01 * 8))
    assert budget.draft_ratio == pytest.approx(0.5, rel=1e-3)
    assert budget.model_draft_length == pytest.approx(2.0)
    budget.observe_search(rows=2, seconds=0.32)
    assert budget.search_row_seconds == pytest.approx(0.16)
    # The decision is choose_rows with those costs.
    gains, expected, seconds = [1.8, 0.2], 8.0, 0.13
    assert budget.model_rows(cost, gains, expected, seconds) == choose_rows(
        gains, pass_cost=2 * 0.5 * 0.05, row_cost=2 * 1.5 * 0.01 + 0.16 / 16,
        expected=expected, seconds=seconds, margin=MODEL_DRAFT_MARGIN)
    # An exploration step with a fit: a model exploration only when it is due.
    assert budget.model_rows(None, [0.2, 0.9, 0.5], 1.0, 1.0) == [False] * 3
    # No fit yet: the most promising request alone; adaptivity off: everyone.
    assert DraftBudget().model_rows(None, [0.2, 0.9, 0.5], 1.0, 1.0) == [False, True, False]
    # A bucket whose fit cannot estimate yet (too few steps) explores on every 4th step, as
    # one without a fit: a new server's first requests measure model drafts (and run the DP).
    young = DraftBudget()
    young.observe(1, 1, 0.03)
    explored = []
    for step in range(1, 10):
        assert young.start_step(1) is None
        explored.append(young.model_rows(None, [0.2, 0.9], 1.0, 1.0) == [False, True])
    assert explored == [step % UNFITTED_MODEL_EVERY == 1 for step in range(1, 10)]
    assert DraftBudget(enabled=False).model_rows(None, [0.2, 0.9], 1, 1) == [True, True]


@pytest.mark.parametrize("seed", range(30))
def test_choice_with_given_token_gains_maximises_expected_tokens_per_second(seed):
    """Drafts valued by per-position acceptance probabilities (a suffix tree's), against
    every combination of prefixes."""
    rng = random.Random(1000 + seed)
    n = rng.randint(1, 3)
    candidates = [rng.randint(0, 4) for _ in range(n)]
    given = []
    for c in candidates:
        product, gains = 1.0, []
        for _ in range(c):
            product *= rng.uniform(0.1, 1.0)
            gains.append(product)
        given.append(gains)
    fixed = rng.uniform(0.005, 0.1)
    per_token = fixed * rng.choice([0.01, 0.1, 0.3, 1.0])
    chosen = choose_lengths(candidates, [0.5] * n, fixed, per_token, token_gains=given)

    def rate(lengths):
        expected = sum(1 + sum(g[:k]) for k, g in zip(lengths, given))
        return expected / (fixed + per_token * sum(1 + k for k in lengths))

    best = max(rate(ls) for ls in itertools.product(*(range(c + 1) for c in candidates)))
    assert rate(chosen) == pytest.approx(best, rel=1e-12)


def test_model_drafts_need_the_margin():
    """A draft that would raise tokens/s by 2 % is not taken under a 3 % margin."""
    assert choose_rows([0.02], 0.0, 0.0, expected=1.0, seconds=1.0) == [True]
    assert choose_rows([0.02], 0.0, 0.0, expected=1.0, seconds=1.0, margin=1.03) == [False]
    assert choose_rows([0.05], 0.0, 0.0, expected=1.0, seconds=1.0, margin=1.03) == [True]
    assert MODEL_DRAFT_MARGIN == 1.10


def _fitted_at_8(budget: DraftBudget) -> None:
    """Batch 8 fitted on `0.05 + 0.001 * tokens`, its decisions never drafting with the model."""
    budget.start_step(8)
    for i in range(20):
        budget.observe(8, 8 + i % 5, 0.05 + 0.001 * (8 + i % 5))
    for _ in range(12):
        budget.model_rows(budget.start_step(8), [0.01], expected=1.0, seconds=0.05)


def test_a_new_bucket_decides_with_the_nearest_fitted_buckets_costs():
    """A batch draining from 8 requests meets buckets 4, 2, 1 without fits of their own: each
    trims with the nearest fitted bucket's line (a larger one on a tie), not verify-all, and
    explores model drafts on the fitted schedule only; its own fit replaces the borrowed one."""
    budget = DraftBudget(explore_every=4)
    _fitted_at_8(budget)
    own = budget.fits[8].estimate()
    assert budget.start_step(4) == pytest.approx(own)
    assert budget.model_rows(budget.start_step(4), [0.5, 0.9], expected=1.0,
                             seconds=0.05) == [False, False]
    budget.start_step(16)  # a 16 bucket, fitted on another line: 4 is nearer to 8
    for i in range(20):
        budget.observe(16, 16 + i % 5, 0.2 + 0.01 * (16 + i % 5))
    assert budget.start_step(4) == pytest.approx(own)
    assert budget.start_step(32) == pytest.approx(budget.fits[16].estimate())
    explored = [step for step in range(1, 18) if budget.start_step(2) is None
                and budget.model_rows(None, [0.9], expected=1.0, seconds=0.05) == [True]]
    assert explored == [4, 12]  # bucket 2's exploration steps, the interval doubling
    for i in range(20):
        budget.observe(4, 4 + i % 5, 0.01 + 0.002 * (4 + i % 5))
    assert budget.start_step(4) is None  # bucket 4's 4th step: an exploration one
    fixed, per_token, _ = budget.start_step(4)
    assert (fixed, per_token) == (pytest.approx(0.01), pytest.approx(0.002))
    fresh = DraftBudget(explore_every=4)  # nothing fitted anywhere: verify every candidate
    assert fresh.start_step(4) is None


def test_a_bucket_whose_fit_never_forms_still_explores_model_drafts():
    """One request without copies: every step verifies one token, so batch 1's step costs
    never spread and its fit never forms. It must still draft with the model: on every 4th
    step while nothing is fitted, on the fitted schedule once another bucket has a fit."""
    alone = DraftBudget(explore_every=4)
    explored = []
    for step in range(1, 13):
        assert alone.start_step(1) is None
        alone.observe(1, 1, 0.05)
        if alone.model_rows(None, [0.9], expected=1.0, seconds=0.05) == [True]:
            explored.append(step)
    assert explored == [1, 5, 9]
    budget = DraftBudget(explore_every=4)
    _fitted_at_8(budget)
    explored = []
    for step in range(1, 13):
        cost = budget.start_step(1)
        budget.observe(1, 1, 0.05)
        if cost is None and budget.model_rows(None, [0.9], 1.0, 0.05) == [True]:
            explored.append(step)
    assert explored[:1] == [4]


def test_an_unfitted_bucket_explores_the_model_only_on_steps_without_copies():
    """A fresh engine's first batch of 8: copies on most steps give the fit its spread, so
    the model explores (a DP run and draft passes for one request) only on the every-4th
    steps that verify no copy; the fit then forms without it."""
    budget = DraftBudget()
    explored = []
    for step in range(1, 9):  # MIN_STEPS
        assert budget.start_step(8) is None
        copies = step not in (5, 6, 7)  # step 5: due and copy-free; 6 and 7: not due
        if budget.model_rows(None, [0.2, 0.9], 8.0, 0.07, copies=copies) == [False, True]:
            explored.append(step)
        budget.observe(8, 8 + 3 * copies, 0.06 + 0.004 * copies)
    assert explored == [5]
    assert budget.start_step(8) is not None  # fitted from the copies' steps alone
