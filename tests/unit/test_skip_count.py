"""The choice of M, the number of skipped layers (`core.skip_count`): brute force on small
cases, the calibration of predicted acceptance, exploration (host-free, milliseconds)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from vllm_clasp.core.skip_count import PRIOR_GAMMA, SkipCountChooser, expected_tokens


def _brute_force(cosines, lo, hi, gamma, layer_cost, head, ratio, length, fixed, per_token,
                 reference):
    """Expected tokens per second of a round at every M, written out independently."""
    best, best_rate = None, -1.0
    full = len(cosines) - 1  # layers: every M up to this is a possible skip count
    num_layers = full + 2
    for m in range(lo, hi + 1):
        if math.isnan(cosines[m]):
            continue
        alpha = cosines[m] ** gamma
        tokens = 1 + sum(alpha ** i for i in range(1, length + 1))
        pass_seconds = ratio * (fixed + per_token) * (
            ((num_layers - m) * layer_cost + head)
            / ((num_layers - reference) * layer_cost + head))
        seconds = fixed + per_token * (1 + length) + length * pass_seconds
        if tokens / seconds > best_rate:
            best, best_rate = m, tokens / seconds
    return best


@pytest.mark.parametrize("seed", range(60))
def test_chosen_m_maximises_expected_tokens_per_second(seed):
    """Against every M, with the pass cost referenced to the M the ratio was measured at
    (before any draft: the given reference; then the Ms drafted with)."""
    rng = random.Random(seed)
    num_layers = rng.randint(4, 12)
    cosines = sorted((rng.uniform(0.3, 1.0) for _ in range(num_layers - 1)), reverse=True)
    cosines[0] = 1.0
    if rng.random() < 0.3:
        cosines[rng.randrange(1, len(cosines))] = float("nan")
    lo = rng.randint(0, len(cosines) - 2)
    hi = rng.randint(lo, len(cosines) - 1)
    if all(math.isnan(cosines[m]) for m in range(lo, hi + 1)):
        return
    chooser = SkipCountChooser(lo, hi, [1.0] * num_layers, head_cost=rng.uniform(0, 5),
                               explore_every=0, reference=hi)
    length = rng.randint(1, 6)
    fixed, per_token = rng.uniform(0.01, 0.1), rng.choice([0.0, rng.uniform(0.0, 0.02)])
    ratio = rng.uniform(0.1, 1.0)
    choice = chooser.choose(cosines, ratio, length, (fixed, per_token))
    expected = _brute_force(cosines, lo, hi, PRIOR_GAMMA, 1.0, chooser.head_cost, ratio,
                            length, fixed, per_token, reference=hi)
    assert choice.num_skip == expected
    # With a reference M drafted before, fewer kept layers make passes cheaper.
    chooser.drafted_with(lo)
    rates = {m: chooser.tokens_per_second(cosines[m], m, ratio, length, (fixed, per_token))
             for m in range(lo, hi + 1) if not math.isnan(cosines[m])}
    best = max(rates, key=lambda m: (rates[m], m))
    assert chooser.choose(cosines, ratio, length, (fixed, per_token)).num_skip == best
    for m in rates:
        tokens = expected_tokens(chooser.rate(cosines[m]), length)
        weight = (num_layers - m) + chooser.head_cost
        reference = (num_layers - lo) + chooser.head_cost
        seconds = (fixed + per_token * (1 + length)
                   + length * ratio * weight / reference * (fixed + per_token))
        assert rates[m] == pytest.approx(tokens / seconds)


def test_cheaper_passes_favour_more_skipping_until_acceptance_falls():
    """Acceptance falls slowly at first, then fast: a costly draft (ratio 0.8) pays for
    skipping more, a nearly free one (ratio 0.01) keeps the most accurate draft."""
    cosines = [1.0, 0.99, 0.985, 0.98, 0.975, 0.97, 0.9, 0.7, 0.5]
    chooser = SkipCountChooser(1, 8, [1.0] * 10, head_cost=2.0, explore_every=0)
    chooser.drafted_with(3)
    costly = chooser.choose(cosines, ratio=0.8, length=3, verify=(0.05, 0.0)).num_skip
    free = chooser.choose(cosines, ratio=0.01, length=3, verify=(0.05, 0.0)).num_skip
    assert costly == 5 and free == 1


def test_calibration_fits_the_measured_acceptance():
    """Drafts accepted at cos ** 2 per token (not the prior's cos ** 4): gamma moves to ~2."""
    rng = random.Random(0)
    chooser = SkipCountChooser(1, 8, [1.0] * 10, head_cost=1.0)
    assert chooser.gamma == PRIOR_GAMMA
    for _ in range(400):
        cosine = rng.uniform(0.6, 0.95)
        accepted = 0
        while accepted < 6 and rng.random() < cosine ** 2:
            accepted += 1
        chooser.observe(cosine, drafted=6, accepted=accepted)
    assert chooser.gamma == pytest.approx(2.0, rel=0.15)
    assert chooser.rate(0.9) == pytest.approx(0.81, abs=0.05)


def test_few_observations_keep_the_prior():
    chooser = SkipCountChooser(1, 8, [1.0] * 10, head_cost=1.0)
    chooser.observe(0.9, drafted=3, accepted=3)
    assert chooser.gamma == PRIOR_GAMMA
    chooser.observe(1.0, drafted=3, accepted=0)  # a perfect fit says nothing: ignored
    chooser.observe(0.9, drafted=0, accepted=0)
    assert len(chooser._seen) == 1


def test_exploration_visits_neighbours_on_both_sides_within_range():
    cosines = [1.0] + [0.99 - 0.01 * m for m in range(1, 9)]
    chooser = SkipCountChooser(2, 8, [1.0] * 10, head_cost=1.0, explore_every=2,
                               explore_step=2)
    chosen = [chooser.choose(cosines, 0.01, 3, None) for _ in range(8)]
    plain = {c.num_skip for c in chosen if not c.explored}
    assert plain == {2}
    assert [c.num_skip for c in chosen if c.explored] == [4, 4]  # 2 - 2 is out of range
    assert all(c.explored == (i % 2 == 1) or c.num_skip == 2 for i, c in enumerate(chosen))


def test_no_reachable_m_is_an_error():
    chooser = SkipCountChooser(3, 4, [1.0] * 6, head_cost=1.0)
    with pytest.raises(ValueError, match="no reachable skip count"):
        chooser.choose([1.0, 0.9, 0.8, float("nan"), float("nan")], 0.5, 2, None)


# ------------------------------------------------------------------ in the planner


def _planner_and_step(seeded=(), share=False):
    import numpy as np

    from vllm_clasp.core.options import ClaspOptions
    from vllm_clasp.core.planner import StepInputs, StepPlanner

    options = ClaspOptions(copy_source="none", adaptive=False, share_skip_sets=share).resolve(
        num_layers=10, vocab_size=100)
    assert options.auto_skip and options.skip_range == (1, 6) and options.num_skip == 3
    planner = StepPlanner(options, layer_costs=[1.0] * 10, head_cost=2.0)
    step = StepInputs(req_ids=["a", "b"], token_ids=np.zeros((2, 4), dtype=np.int64),
                      num_tokens=np.array([4, 4]), num_sampled=[1, 1],
                      max_draft=np.array([4, 4]), seeded=frozenset(seeded))
    return planner, step


def _search(cosines):
    """A SkipSearch whose masks skip the first M layers (10 layers, M up to 6)."""
    import torch

    from vllm_clasp.core.optimizer import SkipSearch

    num_layers, J = 10, 6
    skipped = torch.zeros(num_layers, len(cosines), J + 1, dtype=torch.bool)
    for i in range(num_layers):
        skipped[i, :, i + 1:] = i < J  # state (i+1, j) skipped layer i for j > i
    return SkipSearch(skipped, torch.tensor(cosines, dtype=torch.float32))


def test_planner_chooses_m_per_request_and_seeded_requests_keep_the_fixed_m():
    """Request a's fit stays high as M grows (skip more: cheaper drafts), b's collapses
    (skip little); b seeded: the fixed M = round(0.3 * 10) = 3 whatever its fit."""
    planner, step = _planner_and_step()
    sets = planner.skip_sets
    sets.skip_counts.chooser.explore_every = 0
    high = [1.0, 0.999, 0.998, 0.997, 0.996, 0.995, 0.994]
    low = [1.0, 0.97, 0.6, 0.4, 0.3, 0.2, 0.1]
    plan = planner.plan(step)
    masks = planner.skip_masks(plan, step, _search([high, low]), 0.01)
    assert masks.sum(dim=1).tolist() == [6, 1]
    assert [sets.tracker.choice(r).num_skip for r in "ab"] == [6, 1]
    assert planner.stats.search_skip_counts == {6: 1, 1: 1}  # the histogram shows the Ms

    planner, step = _planner_and_step(seeded={1})
    plan = planner.plan(step)
    planner.skip_masks(plan, step, _search([high, low]))
    assert [planner.skip_sets.tracker.choice(r).num_skip for r in "ab"] == [6, 3]


def test_planner_gives_requests_drafting_together_one_set_at_one_m():
    """Shared: a and b draft with one set at the M chosen on their mean fit; one DP run is
    counted and no request holds a set of its own."""
    planner, step = _planner_and_step(share=True)
    planner.skip_sets.skip_counts.chooser.explore_every = 0
    high = [1.0, 0.999, 0.998, 0.997, 0.996, 0.995, 0.994]
    low = [1.0, 0.97, 0.6, 0.4, 0.3, 0.2, 0.1]
    plan = planner.plan(step)
    assert plan.shared_rows == {0, 1} and plan.search_groups == [0, 0]
    masks = planner.skip_masks(plan, step, _search([high, low]))
    assert torch.equal(masks[0], masks[1]) and int(masks[0].sum()) == 1  # mean fit: M = 1
    assert planner.stats.num_dp_runs == 1 and len(planner.skip_sets) == 0


def test_planner_credits_model_drafts_to_the_calibration_and_the_prediction_counters():
    import numpy as np

    planner, step = _planner_and_step()
    plan = planner.plan(step)
    planner.skip_masks(plan, step, _search([[1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]] * 2), 0.01)
    planner.finish(plan, step, {0: np.array([5, 6, 7]), 1: np.array([8, 9, 10])}, 0.01)
    step.num_sampled = [4, 1]  # a: all 3 accepted (+1), b: none
    planner.plan(step)
    stats = planner.stats
    assert stats.num_model_draft_accepted_tokens == 3
    assert stats.num_model_draft_predicted_accepted_of == 3
    rate = 0.9 ** PRIOR_GAMMA
    assert stats.model_draft_predicted_accepted == pytest.approx(2 * (rate + rate ** 2 + rate ** 3))
    assert len(planner.skip_sets.skip_counts.chooser._seen) == 2
