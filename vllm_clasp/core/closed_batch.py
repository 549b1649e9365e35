"""What a request's accepted draft token is worth when nobody joins the batch (host-free).

The draft budget (`draft_budget.choose_lengths`, `choose_rows`) maximises the expected tokens
per second of each step. That is the right value while requests keep joining: a request that
finishes early frees its place for the next one, and every user's latency counts. When the
requests running started together and nobody joins (offline `LLM.generate` with fewer prompts
than `max_num_seqs`, a burst), the batch ends when its last request ends: a token accepted
for a request that is ahead of the others shortens nothing but that request, while every
draft token verified makes the step slower for all. On the reference CPU at batch 8 (short
prompts, 96 tokens) copies verified for every request were accepted as predicted and paid by
tokens per second, but saved 5 of 96 steps while a step with drafts cost 30 % more; vLLM's own
`suffix` loses the same way.

So once no request has joined for `CLOSED_AFTER` steps, a request's draft tokens are weighed
at 1 if it is on the batch's critical path (within `CRITICAL_SLACK` tokens of the most tokens
left to generate: EOS is unknown, so the longest budget is the critical path) and at
`AHEAD_WEIGHT` otherwise. On a memory-bound GPU step a verified token costs ~nothing, so
requests ahead are still verified; on a compute-bound one only the critical path is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

CLOSED_AFTER = 8
"""Steps without a request joining after which the batch counts as closed."""
CRITICAL_SLACK = 2
"""A request within this many tokens of the most tokens left is on the critical path."""
AHEAD_WEIGHT = 0.25
"""Weight of a draft token for a request ahead of the critical path in a closed batch: what
it still buys is that request's own latency."""


class ClosedBatch:
    """Per step: whether the batch is closed, and each row's weight."""

    def __init__(self, closed_after: int = CLOSED_AFTER, slack: int = CRITICAL_SLACK,
                 ahead_weight: float = AHEAD_WEIGHT):
        self.closed_after, self.slack, self.ahead_weight = closed_after, slack, ahead_weight
        self._known: set[str] = set()
        self._step = 0
        self._last_join = 0

    def weights(self, req_ids: Sequence[str], rows: Sequence[int],
                tokens_left: np.ndarray | None) -> dict[int, float]:
        """{row: weight} for the decoding `rows` (empty: every row weighs 1). `tokens_left`
        [n] int: tokens each request may still generate (None: unknown)."""
        self._step += 1
        joined = [req_ids[i] for i in rows if req_ids[i] not in self._known]
        if joined:
            self._known.update(joined)
            self._last_join = self._step
        if (tokens_left is None or len(rows) < 2
                or self._step - self._last_join < self.closed_after):
            return {}
        left = np.asarray(tokens_left)[list(rows)]  # [R]
        critical = left >= left.max() - self.slack
        if critical.all():
            return {}
        return {i: 1.0 if c else self.ahead_weight for i, c in zip(rows, critical)}

    def forget(self, req_ids: Iterable[str]) -> None:
        self._known.difference_update(req_ids)
