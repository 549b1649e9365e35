"""Tests of vllm_clasp.core.skip_state.SkipSetTracker: the per-request DP schedule (host-free)."""

from __future__ import annotations

import pytest
import torch

from vllm_clasp.core.skip_state import SkipSetTracker


def mask(*skipped: int, num_layers: int = 8) -> torch.Tensor:  # [num_layers] bool
    out = torch.zeros(num_layers, dtype=torch.bool)
    out[list(skipped)] = True
    return out


@pytest.mark.parametrize("loi", [0, -1])
def test_loi_must_be_positive(loi):
    with pytest.raises(ValueError, match="loi must be >= 1"):
        SkipSetTracker(loi)


def test_new_request_is_due():
    tracker = SkipSetTracker(loi=3)
    assert tracker.is_due("a")
    assert "a" not in tracker and len(tracker) == 0


@pytest.mark.parametrize("loi", [1, 2, 3, 8])
def test_due_again_after_loi_verifications(loi):
    tracker = SkipSetTracker(loi=loi)
    tracker.update("a", mask(1, 2))
    for step in range(loi):
        assert not tracker.is_due("a"), f"due after {step} verifications with LOI {loi}"
        tracker.record_verification(["a"])
    assert tracker.is_due("a")
    # Staying due while not re-optimised.
    tracker.record_verification(["a"])
    assert tracker.is_due("a")
    # A DP run resets the schedule.
    tracker.update("a", mask(1, 2))
    assert not tracker.is_due("a")


def test_verification_counts_only_the_listed_tracked_requests():
    tracker = SkipSetTracker(loi=2)
    tracker.update("a", mask(1))
    tracker.update("b", mask(2))
    tracker.record_verification(["a", "untracked"])
    tracker.record_verification(["a"])
    assert tracker.is_due("a")
    assert not tracker.is_due("b")
    assert "untracked" not in tracker  # recording does not create state
    tracker.record_verification(iter(["b", "b"]))  # any iterable; each occurrence counts
    assert tracker.is_due("b")


def test_skip_mask_is_a_copy():
    tracker = SkipSetTracker(loi=4)
    original = mask(3, 5)
    tracker.update("a", original)
    original[0] = True  # the caller reusing its tensor does not change the stored set
    assert torch.equal(tracker.skip_mask("a"), mask(3, 5))
    with pytest.raises(KeyError):
        tracker.skip_mask("missing")


def test_update_counts_changes():
    tracker = SkipSetTracker(loi=1)
    tracker.update("a", mask(1, 2, 3))  # first set: not a change
    assert (tracker.num_changes, tracker.num_layers_changed) == (0, 0)
    tracker.update("a", mask(1, 2, 3))  # same set: not a change
    assert (tracker.num_changes, tracker.num_layers_changed) == (0, 0)
    tracker.update("a", mask(1, 2, 4))  # 3 -> 4: two layers differ
    assert (tracker.num_changes, tracker.num_layers_changed) == (1, 2)
    tracker.update("b", mask(6))  # another request's first set
    assert (tracker.num_changes, tracker.num_layers_changed) == (1, 2)
    tracker.update("b", mask(0, 5))  # 6 -> {0, 5}: three layers differ
    assert (tracker.num_changes, tracker.num_layers_changed) == (2, 5)
    assert isinstance(tracker.num_changes, int) and isinstance(tracker.num_layers_changed, int)


def test_update_after_drop_is_a_first_set():
    tracker = SkipSetTracker(loi=1)
    tracker.update("a", mask(1))
    tracker.drop(["a"])
    tracker.update("a", mask(2))
    assert tracker.num_changes == 0


def test_drop():
    tracker = SkipSetTracker(loi=2)
    for req in "abc":
        tracker.update(req, mask(1))
    tracker.drop(["a", "zzz"])  # unknown ids are fine
    assert "a" not in tracker and len(tracker) == 2
    assert tracker.is_due("a")  # a preempted-then-resumed request is optimised afresh
    tracker.drop(None)  # vLLM may hand None
    tracker.drop(set())
    assert len(tracker) == 2
    tracker.drop({"b", "c"})
    assert len(tracker) == 0
