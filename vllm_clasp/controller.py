"""Turning speculation off where it does not pay, by measurement (host-free).

Whether drafting pays depends on the model, the hardware, the batch size and the text: a
draft step costs a fraction of a full step, and verifying k tokens costs more than verifying
one once a batch is large enough to be compute-bound. So the proposer treats "draft" and
"don't draft" as two arms per batch-size bucket and measures each arm's output tokens per
second of wall time (the interval from one proposal to the next covers drafting,
verification and the engine's own overhead). It plays the better arm and re-tries the other
one every `explore_every` steps, so a change in the text or the load is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_SAMPLES = 4
EMA_WEIGHT = 0.2


def batch_bucket(batch_size: int) -> int:
    """1, 2, 4, 8, ...: the power of two at or below batch_size."""
    return 1 << (max(batch_size, 1).bit_length() - 1)


@dataclass
class _Arm:
    samples: int = 0
    tokens_per_s: float = 0.0

    def observe(self, tokens_per_s: float) -> None:
        if self.samples == 0:
            self.tokens_per_s = tokens_per_s
        else:
            self.tokens_per_s += EMA_WEIGHT * (tokens_per_s - self.tokens_per_s)
        self.samples += 1


@dataclass
class _Bucket:
    arms: dict[bool, _Arm] = field(default_factory=lambda: {True: _Arm(), False: _Arm()})
    steps: int = 0


class SpeculationController:
    def __init__(self, explore_every: int = 32, enabled: bool = True):
        self.explore_every = explore_every
        self.enabled = enabled
        self._buckets: dict[int, _Bucket] = {}
        self.num_off_decisions = 0
        """Steps on which speculation was turned off because it measured slower."""

    def should_draft(self, batch_size: int) -> bool:
        if not self.enabled:
            return True
        bucket = self._buckets.setdefault(batch_bucket(batch_size), _Bucket())
        bucket.steps += 1
        draft, plain = bucket.arms[True], bucket.arms[False]
        if draft.samples < MIN_SAMPLES:
            return True
        if plain.samples < MIN_SAMPLES:
            return False
        better = draft.tokens_per_s >= plain.tokens_per_s
        if bucket.steps % self.explore_every == 0:
            return not better
        if not better:
            self.num_off_decisions += 1
        return better

    def observe(self, batch_size: int, drafted: bool, tokens: int, seconds: float) -> None:
        """One step's outcome: `tokens` produced in `seconds` with or without drafts."""
        if not self.enabled or seconds <= 0:
            return
        bucket = self._buckets.setdefault(batch_bucket(batch_size), _Bucket())
        bucket.arms[drafted].observe(tokens / seconds)

    def summary(self) -> dict[int, dict[str, float]]:
        return {
            size: {"draft_tokens_per_s": b.arms[True].tokens_per_s,
                   "plain_tokens_per_s": b.arms[False].tokens_per_s}
            for size, b in sorted(self._buckets.items())
        }
