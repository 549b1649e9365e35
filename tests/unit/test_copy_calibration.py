"""`core.copy_calibration`: what a copied token's tree probability is worth in acceptance,
and the copy-length decisions it drives (host-free, plain arrays)."""

from __future__ import annotations

import random

import pytest

from vllm_clasp.core.copy_calibration import CopyCalibration
from vllm_clasp.core.draft_budget import choose_lengths


def test_without_trials_the_tree_probabilities_stand():
    calibration = CopyCalibration()
    assert calibration.gains("suffix", [0.9, 0.5, 1.0]) == pytest.approx([0.9, 0.45, 0.45])


def test_only_judged_positions_are_trials():
    """A draft of 5 with 2 accepted: positions 1-2 succeeded, 3 failed, 4-5 never judged."""
    calibration = CopyCalibration(prior_trials=1e-9, forget=1.0)
    calibration.observe("s", [0.5] * 5, accepted=2)
    assert calibration.token_probability("s", 0.5, 1) == pytest.approx(1.0)
    assert calibration.token_probability("s", 0.5, 2) == pytest.approx(1.0)
    assert calibration.token_probability("s", 0.5, 3) == pytest.approx(0.0, abs=1e-6)
    # Position 5 has no trial of its own: its cell falls back to the q bin (2 of 3 accepted).
    assert calibration.token_probability("s", 0.5, 5) == pytest.approx(2 / 3)
    calibration.observe("s", [0.5] * 3, accepted=3)  # fully accepted: all 3 judged
    assert calibration.token_probability("s", 0.5, 3) == pytest.approx(0.5)


def test_near_certain_copies_stay_near_certain_beside_unsure_ones():
    """Mostly unsure copies that fail (unseen text) and a repeat whose copies are always
    accepted: the repeat's 8-token copy keeps a high value, the unsure one a low one (one
    scale per source valued both at the same fraction of their tree probabilities)."""
    calibration = CopyCalibration()
    for _ in range(300):
        calibration.observe("suffix", [0.3, 0.3], accepted=0)
    for _ in range(40):
        calibration.observe("suffix", [1.0] * 8, accepted=8)
    assert calibration.gains("suffix", [1.0] * 8)[-1] > 0.9
    assert calibration.gains("suffix", [0.3])[0] < 0.1


@pytest.mark.parametrize("seed", range(3))
def test_learns_a_miscalibrated_tree(seed):
    """Tokens whose tree probability q is accepted with probability q^2: the learnt value of
    each q bin is within sampling error of q^2 (statistical)."""
    rng = random.Random(seed)
    calibration = CopyCalibration(forget=1.0)
    for _ in range(4000):
        probs = [rng.choice([0.3, 0.7, 0.97]) for _ in range(rng.randint(1, 6))]
        accepted = 0
        while accepted < len(probs) and rng.random() < probs[accepted] ** 2:
            accepted += 1
        calibration.observe("s", probs, accepted)
    for q in (0.3, 0.7, 0.97):
        for position in (1, 3):
            assert calibration.token_probability("s", q, position) == pytest.approx(
                q * q, abs=0.06), (q, position)


def test_a_near_certain_copy_is_verified_in_full_when_tokens_are_cheap():
    """Batch 1 on a memory-bound device: a verified token costs 1 % of a step."""
    calibration = CopyCalibration()
    for _ in range(50):
        calibration.observe("suffix", [0.99] * 12, accepted=12)
    gains = calibration.gains("suffix", [0.99] * 12)
    assert choose_lengths([12], [0.5], fixed=0.030, per_token=0.0003,
                          token_gains=[gains], overhead=0.004) == [12]


def test_a_copy_is_trimmed_where_extra_tokens_cost_more_than_they_yield():
    """A compute-bound batch (a verified token costs a fifth of a step's fixed part): the
    unsure tail of a copy is not verified, its sure head is."""
    calibration = CopyCalibration()
    for _ in range(200):
        calibration.observe("suffix", [0.99, 0.99, 0.3, 0.3], accepted=2)
    gains = calibration.gains("suffix", [0.99, 0.99, 0.3, 0.3])
    lengths = choose_lengths([4] * 8, [0.5] * 8, fixed=0.05, per_token=0.01,
                             token_gains=[gains] * 8)
    assert lengths == [2] * 8
