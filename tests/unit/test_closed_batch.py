"""Closed batches: a draft token is worth less to a request ahead of the critical path."""

from __future__ import annotations

import numpy as np

from vllm_clasp.core.closed_batch import AHEAD_WEIGHT, CLOSED_AFTER, ClosedBatch
from vllm_clasp.core.draft_budget import choose_lengths


def test_rows_weigh_one_until_nobody_has_joined_for_a_while():
    batch = ClosedBatch()
    ids, left = ["a", "b", "c"], np.array([90, 80, 90])
    assert all(batch.weights(ids, [0, 1, 2], left) == {} for _ in range(CLOSED_AFTER))
    assert batch.weights(ids, [0, 1, 2], left) == {0: 1.0, 1: AHEAD_WEIGHT, 2: 1.0}
    # a request joins: the batch is open again for CLOSED_AFTER steps
    ids, left = ["a", "b", "c", "d"], np.array([90, 80, 90, 200])
    assert batch.weights(ids, [0, 1, 2, 3], left) == {}
    for _ in range(CLOSED_AFTER - 1):
        assert batch.weights(ids, [0, 1, 2, 3], left) == {}
    assert batch.weights(ids, [0, 1, 2, 3], left) == {
        0: AHEAD_WEIGHT, 1: AHEAD_WEIGHT, 2: AHEAD_WEIGHT, 3: 1.0}


def test_the_critical_path_has_slack_and_a_lone_or_level_batch_weighs_one():
    batch = ClosedBatch(closed_after=1, slack=2)
    assert batch.weights(["a", "b"], [0, 1], np.array([50, 48])) == {}  # within the slack
    assert batch.weights(["a", "b"], [0, 1], np.array([50, 47])) == {0: 1.0, 1: AHEAD_WEIGHT}
    assert batch.weights(["a", "b"], [0], np.array([50, 47])) == {}  # one row decoding
    assert batch.weights(["a", "b"], [0, 1], None) == {}  # budgets unknown


def test_a_forgotten_request_that_comes_back_counts_as_joining():
    batch = ClosedBatch(closed_after=2)
    for _ in range(3):
        batch.weights(["a", "b"], [0, 1], np.array([9, 5]))
    batch.forget(["b"])
    assert batch.weights(["a", "b"], [0, 1], np.array([9, 5])) == {}  # "b" rejoined
    assert batch.weights(["a", "b"], [0, 1], np.array([9, 5])) == {}
    assert batch.weights(["a", "b"], [0, 1], np.array([9, 5])) == {0: 1.0, 1: AHEAD_WEIGHT}


def test_a_compute_bound_step_verifies_only_the_critical_paths_copy():
    """Batch 8 on the reference CPU (fixed 19 ms, 1.9 ms a token): two copies accepted at
    0.6, one for the request with the most tokens left, one for a request ahead."""
    cost = dict(fixed=0.019, per_token=0.0019)
    rates = [0.6, 0.6]
    assert choose_lengths([3, 3], rates, **cost) == [2, 2]  # open batch: tokens per second
    assert choose_lengths([3, 3], rates, **cost, weights=[1.0, AHEAD_WEIGHT]) == [3, 0]
    # a memory-bound step (a verified token ~free) still verifies the request ahead
    assert choose_lengths([3, 3], rates, fixed=0.006, per_token=0.00002,
                          weights=[1.0, AHEAD_WEIGHT]) == [3, 3]
