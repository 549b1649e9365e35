"""What a copied draft's token probabilities are worth in accepted tokens (host-free).

A suffix tree gives each copied token a probability q (how often that continuation followed
the matched context). Verification judges a draft position by position until the first
rejection, so each judged position is one trial of "accepted given the prefix was":
position i of a draft with a accepted tokens is a success for i <= a and a failure for
i = a + 1 (a < n); later positions were never judged and teach nothing.

`CopyCalibration` learns P(accepted | q, position) from those trials per draft source, in
cells of q (`Q_EDGES`) and of position (`POSITION_EDGES`), each shrunk towards its q bin
over all positions, and the bin towards q itself (a calibrated tree needs no correction).
So a near-certain copy in a repeat (q ~ 1, accepted every time) stays near-certain while
unsure copies of unseen text are valued at what they yield, which one scale per source
(the product of the q's times a measured factor) could not do: its factor, learnt mostly on
unsure copies, also scaled down the sure ones.

The chance that a draft is accepted up to position i is the product of its calibrated
per-position probabilities (`gains`), what `draft_budget.choose_lengths` weighs against the
cost of verifying each token.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

Q_EDGES = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)
"""Upper edges of the q bins (the last bin is [0.99, 1])."""
POSITION_EDGES = (1, 2, 4, 8)
"""Position cells: 1, 2, 3-4, 5-8, 9+."""
PRIOR_TRIALS = 4.0
"""Pseudo-trials of the parent estimate in each cell (q bin: of q itself)."""
FORGET = 0.995
"""Weight of older trials against a new one (an effective window of ~200 draft positions
per cell), so the estimate follows the traffic."""


class CopyCalibration:
    def __init__(self, prior_trials: float = PRIOR_TRIALS, forget: float = FORGET):
        self.prior_trials = prior_trials
        self.forget = forget
        # source -> [accepted, judged] per (q bin, position cell), and per q bin
        self._cells: dict[str, np.ndarray] = {}  # [Q, P, 2]
        self._bins: dict[str, np.ndarray] = {}  # [Q, 2]

    @staticmethod
    def _q_bin(q: float) -> int:
        return bisect.bisect_right(Q_EDGES, q)

    @staticmethod
    def _position_cell(position: int) -> int:  # position: 1-based
        return bisect.bisect_left(POSITION_EDGES, position)

    def observe(self, source: str, probs: Sequence[float], accepted: int) -> None:
        """A verified copy whose tokens had probabilities `probs` [n]; its first `accepted`
        tokens were kept (0 <= accepted <= n)."""
        n = len(probs)
        if n == 0:
            return
        cells = self._cells.setdefault(
            source, np.zeros((len(Q_EDGES) + 1, len(POSITION_EDGES) + 1, 2)))
        bins = self._bins.setdefault(source, np.zeros((len(Q_EDGES) + 1, 2)))
        cells *= self.forget
        bins *= self.forget
        for position in range(1, min(accepted + 1, n) + 1):  # the judged positions
            trial = np.array([float(position <= accepted), 1.0])
            b = self._q_bin(float(probs[position - 1]))
            cells[b, self._position_cell(position)] += trial
            bins[b] += trial

    def token_probability(self, source: str, q: float, position: int) -> float:
        """P(the token at `position` (1-based) is accepted | the prefix was, its q)."""
        w = self.prior_trials
        b = self._q_bin(q)
        bins = self._bins.get(source)
        if bins is None:
            return float(q)
        accepted, judged = bins[b]
        bin_rate = (accepted + w * q) / (judged + w)
        accepted, judged = self._cells[source][b, self._position_cell(position)]
        return float((accepted + w * bin_rate) / (judged + w))

    def gains(self, source: str, probs: Sequence[float]) -> list[float]:
        """Per position, the probability that the draft is accepted up to it (non-increasing):
        the product of the calibrated per-position probabilities."""
        out, product = [], 1.0
        for position, q in enumerate(probs, start=1):
            product *= self.token_probability(source, float(q), position)
            out.append(product)
        return out
