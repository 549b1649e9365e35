"""How many layers each request's draft skips (M), chosen per DP run (host-free).

The paper fixes M by hand. One DP run already yields, for every M in a range, the best skip
set and its fit: the cosine of the skipped stack's final state against the full model's
(`SkipSearch.final_cosine`). Per request the chooser turns that into expected tokens per
second at each M and takes the best:

* **acceptance**: a model draft token is accepted with probability alpha(M) = cos(M) ** gamma,
  gamma calibrated online so that the predicted acceptance of the drafts verified so far
  matches the measured one (`observe`; before any measurement gamma = `PRIOR_GAMMA`);
* **cost**: a draft pass at M runs the kept layers and the draft head:
  `pass(M) = ratio * (kept_cost(M) + head_cost) / (kept_cost(M_ref) + head_cost)` of a
  verification step, with `ratio` the draft-pass cost measured at the Ms in use (M_ref their
  mean) and each layer's and the head's cost proportional to their weights (a memory-bound
  decode reads every weight once);
* a round drafts `length` tokens (the measured mean model-draft length) and verifies them:
  `E(M) = 1 + sum_i alpha(M) ** i` tokens in `T(M) = verify(1 + length) + length * pass(M)`.

Every `explore_every`-th choice takes a neighbouring M instead (alternately above and below
the best, `explore_step` away), so the calibration sees acceptance at more than one M.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

PRIOR_GAMMA = 4.0
"""alpha = cos ** 4 before any measurement: cos 0.95 -> 0.81, 0.9 -> 0.66, 0.8 -> 0.41."""
CALIBRATION_WINDOW = 512
"""Verified model drafts kept for the calibration (the most recent)."""


@dataclass(frozen=True)
class SkipCountChoice:
    num_skip: int  # M
    cosine: float  # the DP's cos(g(L, M), h_L)
    predicted_rate: float  # alpha(M) predicted when chosen
    explored: bool = False
    cosines: tuple[float, ...] = field(default=(), repr=False)  # [J+1] the DP's fit per M


def expected_tokens(rate: float, length: float) -> float:
    """1 + expected accepted tokens of a `length`-token draft accepted at `rate` per token."""
    whole = int(length)
    return 1.0 + sum(rate ** i for i in range(1, whole + 1)) + (length - whole) * rate ** (whole + 1)


class SkipCountChooser:
    def __init__(self, lo: int, hi: int, layer_costs: Sequence[float], head_cost: float,
                 explore_every: int = 8, explore_step: int | None = None,
                 reference: int | None = None):
        """lo..hi: the Ms to choose from; layer_costs [L]: each decoder layer's cost and
        head_cost the draft head's, in any common unit (e.g. weights); reference: the M the
        draft-pass ratio is taken to be measured at before any draft (default: lo..hi's
        middle)."""
        if not 0 <= lo <= hi:
            raise ValueError(f"need 0 <= lo <= hi, got {lo}, {hi}")
        self.lo, self.hi = lo, hi
        self.layer_costs, self.head_cost = list(layer_costs), float(head_cost)
        self.explore_every = explore_every
        self.explore_step = explore_step or max(1, (hi - lo) // 6)
        self.gamma = PRIOR_GAMMA
        self._seen: deque[tuple[float, int, int]] = deque(maxlen=CALIBRATION_WINDOW)
        self._choices = 0
        self._used: deque[int] = deque(maxlen=64)  # recent Ms drafted with (cost reference)
        self._reference = (lo + hi) / 2 if reference is None else reference

    # ------------------------------------------------------------------ the model
    def rate(self, cosine: float) -> float:
        """Predicted per-token acceptance of a draft whose DP fit is `cosine`."""
        if not cosine > 0:
            return 0.0
        return min(cosine, 1.0) ** self.gamma

    def pass_cost(self, num_skip: float, ratio: float) -> float:
        """A draft pass at M, in verification steps, given `ratio` measured at the Ms used."""
        reference = sum(self._used) / len(self._used) if self._used else self._reference
        return ratio * self._weight(num_skip) / self._weight(reference)

    def _weight(self, num_skip: float) -> float:
        """Kept layers' cost + head's at M skipped layers (the cheapest layers' cost is not
        known before the DP, so the mean layer cost stands for every layer)."""
        mean = sum(self.layer_costs) / len(self.layer_costs)
        return (len(self.layer_costs) - num_skip) * mean + self.head_cost

    def tokens_per_second(self, cosine: float, num_skip: int, ratio: float, length: float,
                          verify: tuple[float, float]) -> float:
        """E(M) / T(M) for one request's round (`verify`: (fixed, per-token) seconds)."""
        fixed, per_token = verify[:2]
        step = fixed + per_token
        seconds = fixed + per_token * (1 + length) + length * self.pass_cost(num_skip, ratio) * step
        return expected_tokens(self.rate(cosine), length) / seconds

    # ------------------------------------------------------------------ choosing
    def choose(self, cosines: Sequence[float], ratio: float, length: float,
               verify: tuple[float, float] | None) -> SkipCountChoice:
        """cosines[M] for M = 0..len-1 (NaN: unreachable): the M of most tokens per second
        in lo..hi (or a neighbour, on an exploration turn)."""
        verify = verify or (1.0, 0.0)  # no fit yet: a memory-bound step
        candidates = [m for m in range(self.lo, min(self.hi, len(cosines) - 1) + 1)
                      if not math.isnan(cosines[m])]
        if not candidates:
            raise ValueError(f"no reachable skip count in {self.lo}..{self.hi}")
        best = max(candidates, key=lambda m: (
            self.tokens_per_second(cosines[m], m, ratio, length, verify), m))
        self._choices += 1
        explored = False
        if self.explore_every and self._choices % self.explore_every == 0:
            turn = (self._choices // self.explore_every) % 2
            step = self.explore_step if turn else -self.explore_step
            neighbour = min(max(best + step, candidates[0]), candidates[-1])
            explored, best = neighbour != best, neighbour
        return SkipCountChoice(best, float(cosines[best]), self.rate(cosines[best]), explored,
                               tuple(cosines))

    # ------------------------------------------------------------------ calibration
    def drafted_with(self, num_skip: int) -> None:
        """A model draft ran at M (the pass-cost reference follows the Ms in use)."""
        self._used.append(num_skip)

    def observe(self, cosine: float, drafted: int, accepted: int) -> None:
        """A verified model draft of a request whose skip set had fit `cosine`."""
        if drafted <= 0 or not 0 < cosine < 1:
            return
        tried = accepted + 1 if accepted < drafted else drafted
        self._seen.append((cosine, tried, accepted))
        self.gamma = self._fit_gamma()

    def _fit_gamma(self) -> float:
        """gamma with sum(tried * cos ** gamma) == sum(accepted) over the window (bisection
        on log gamma; the left side falls as gamma grows, since every cos < 1)."""
        accepted = sum(a for _, _, a in self._seen)
        tried = sum(t for _, t, _ in self._seen)
        if tried < 16:  # too few judged tokens: shrink towards the prior
            return PRIOR_GAMMA
        target = min(max(accepted, 0.5), tried - 0.5)
        lo, hi = math.log(0.05), math.log(200.0)
        for _ in range(40):
            mid = (lo + hi) / 2
            g = math.exp(mid)
            if sum(t * c ** g for c, t, _ in self._seen) > target:
                lo = mid
            else:
                hi = mid
        return math.exp((lo + hi) / 2)


class SkipCountPolicy:
    """M per request at each DP run: the chooser's for unseeded requests with "auto", the
    fixed M otherwise (seeded requests' drafts must not depend on measured time)."""

    def __init__(self, fixed: int, auto: bool, skip_range: tuple[int, int],
                 layer_costs: Sequence[float] | None = None, head_cost: float = 0.0):
        self.fixed, self.auto = fixed, auto
        self.chooser = (SkipCountChooser(*skip_range, layer_costs or [1.0], head_cost,
                                         reference=fixed) if auto else None)
        self.acceptance_by_m: dict[int, list[int]] = {}
        """M -> [draft tokens judged, accepted]: measured acceptance per M (the report's)."""

    def choose(self, cosines, seeded: Sequence[bool], ratio: float, length: float,
               verify: tuple[float, float] | None) -> list[SkipCountChoice]:
        """cosines: [B, J+1] the DP's final cosine per M (NaN: unreachable)."""
        rows = cosines.tolist() if hasattr(cosines, "tolist") else list(cosines)
        out = []
        for row, is_seeded in zip(rows, seeded):
            if self.chooser is None or is_seeded:
                m = min(self.fixed, len(row) - 1)
                rate = self.chooser.rate(row[m]) if self.chooser else float("nan")
                out.append(SkipCountChoice(m, float(row[m]), rate, cosines=tuple(row)))
            else:
                out.append(self.chooser.choose(row, ratio, length, verify))
        return out

    def drafted_with(self, choice: SkipCountChoice | None) -> None:
        if self.chooser is not None and choice is not None:
            self.chooser.drafted_with(choice.num_skip)

    def observe(self, choice: SkipCountChoice | None, drafted: int, accepted: int) -> float:
        """Calibrate on a verified model draft; returns the accepted tokens that were
        predicted for it when its M was chosen (NaN without a prediction)."""
        if choice is not None and drafted > 0:
            counts = self.acceptance_by_m.setdefault(choice.num_skip, [0, 0])
            counts[0] += accepted + 1 if accepted < drafted else drafted
            counts[1] += accepted
        if self.chooser is None or choice is None:
            return float("nan")
        self.chooser.observe(choice.cosine, drafted, accepted)
        return expected_tokens(choice.predicted_rate, drafted) - 1.0
