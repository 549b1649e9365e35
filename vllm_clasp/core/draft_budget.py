"""How many draft tokens to verify per request, from measured costs and acceptance (host-free).

Verifying a draft token costs time whether it is accepted or not, and how much depends on the
batch: a batch-1 step on a memory-bound device verifies 8 tokens for about the price of 1,
while a large batch is compute-bound and pays for every token. So per batch-size bucket the
verification step time is modelled as

    seconds = fixed + overhead * [any draft token verified] + per_token * tokens_verified

(the overhead: vLLM's speculative path, paid once per step that verifies drafts) fitted by exponentially weighted least squares over the steps seen (`StepCostFit`), and each
request's drafts of each source (prompt lookup, the layer-skipped model) are accepted at a
measured rate alpha (`AcceptanceRates`): a draft's i-th token is accepted with probability
alpha^i, the first rejection ending the draft. A step that verifies tokens worth E expected
output tokens in T seconds makes E/T tokens per second; adding a token of expected gain g and
cost per_token raises that iff g * T > E * per_token. `choose_lengths` adds tokens in order of
expected gain while that holds, so a memory-bound step (per_token ~ 0) verifies every draft,
and a compute-bound one only the drafts likely to be accepted.

Model drafts cost time before any token is verified: the layer-skipped passes (a fixed part
per pass and a part per request, predicted from the verification fit times a measured
ratio) and a share of the DP. `choose_rows` picks the requests that maximise E/T with them.

The fit needs steps with different token counts; drafts and the batch size provide them, and
`DraftBudget` verifies every candidate on every `explore_every`-th step of a bucket and until
some bucket's fit exists, so an over-estimated per-token cost is noticed; on those steps one request
(the most promising) drafts with the model, so the draft cost stays measured. While the
fitted decisions between two model explorations chose no model draft at all, the model's
exploration interval doubles (up to `MAX_EXPLORE_EVERY`): where model drafts cannot pay,
exploring them costs ~nothing, while copies are still verified in full every
`explore_every`-th step. A bucket without a fit of its own decides with the nearest fitted
bucket's; only while no bucket has one (a fresh engine) does a step verify every candidate, and
explore model drafts on every `UNFITTED_MODEL_EVERY`-th step that verifies no copy (a step with
copies already gives the fit the spread it needs).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

MODEL_DRAFT_MARGIN = 1.10
"""Model drafts must promise 10 % more tokens per second than not drafting: the requests a
comparison picks are those whose acceptance estimate is luckiest (the winner's curse), and
on the reference CPU, with a 3 % margin, model drafts chosen as paying measured 2 % slower
than not drafting (benchmarks.md, 2026-11-30). Where they pay (the paper: 24-70 % on GPUs with
8B+ models) a 10 % margin leaves them on."""
UNFITTED_MODEL_EVERY = 4
"""While no bucket has a fit, every step verifies every candidate but only every 4th drafts
with the model (for one request), and only where the step verifies no copy: a fit can take
15-20 steps at batch 8 (it needs steps with and without drafts, or with different token
counts), and a model draft on each of them cost ~3 % of a batch-8 run's wall time on the
reference CPU, where model drafts do not pay; on every 4th, with its DP, still 10 % of a
fresh engine's first batch of 8 (2026-12-06). Copies give the fit its spread without the
model; where there are none (copy source off, or text nothing repeats) the model explores.
The draft cost stays measured."""
MAX_EXPLORE_EVERY = 1024
"""Longest interval between exploration steps of a bucket (after backing off)."""
FORGET = 0.98
"""Weight of an older step relative to the next one (an effective window of ~50 steps)."""
MIN_STEPS = 8
PRIOR_WEIGHT = 4.0
"""Pseudo-trials of the source-wide rate in a request's own acceptance estimate."""


def batch_bucket(batch_size: int) -> int:
    """1, 2, 4, 8, ...: the power of two at or below batch_size."""
    return 1 << (max(batch_size, 1).bit_length() - 1)


def expected_accepted(rate: float, length: float) -> float:
    """Expected accepted tokens of a draft of `length` tokens accepted at `rate` each."""
    whole = int(length)
    gain = sum(rate ** i for i in range(1, whole + 1))
    return gain + (length - whole) * rate ** (whole + 1)


class StepCostFit:
    """Exponentially weighted least squares of a step's seconds on
    `fixed + overhead * [any draft token verified] + per_token * tokens verified`.

    The jump is vLLM's speculative path: a step that verifies any draft token runs the
    rejection sampler and multi-token attention once. Measured on the reference CPU at batch
    1 it is most of what verifying costs (suffix drafts of 1.7 tokens and trimmed ones of 1.4
    cost the same per step), so a per-token slope alone mistook it for a per-token cost."""

    def __init__(self, forget: float = FORGET):
        self.forget = forget
        self.steps = 0
        self._xtx = np.zeros((3, 3))  # weighted sums of x x^T, x = [1, drafted, tokens]
        self._xty = np.zeros(3)

    def observe(self, tokens: int, seconds: float, drafted: bool | None = None) -> None:
        """A step that verified `tokens` in `seconds`; `drafted`: whether any of them was a
        draft token (None: unknown, taken as tokens > 1)."""
        drafted = tokens > 1 if drafted is None else drafted
        x = np.array([1.0, float(drafted), float(tokens)])
        self._xtx = self.forget * self._xtx + np.outer(x, x)
        self._xty = self.forget * self._xty + x * seconds
        self.steps += 1

    def estimate(self) -> tuple[float, float, float] | None:
        """(fixed seconds, seconds per token, seconds of the speculative path when any draft
        token is verified), or None before MIN_STEPS steps or while the token counts do not
        vary enough to see a slope."""
        if self.steps < MIN_STEPS:
            return None
        weight, with_drafts = self._xtx[0, 0], self._xtx[1, 1]
        if min(with_drafts, weight - with_drafts) >= 2.0:  # both kinds of step seen
            beta = self._solve([0, 1, 2])
            if beta is not None and beta[2] < 0:
                beta = self._solve([0, 1])
            if beta is not None and beta[1] >= 0:
                return max(beta[0], 0.0), max(beta[2], 0.0), beta[1]
        mean_n = self._xtx[0, 2] / weight
        if self._xtx[2, 2] / weight - mean_n * mean_n < 0.25:  # spread < ~0.5: noise
            return None
        beta = self._solve([0, 2])
        return max(beta[0], 0.0), max(beta[2], 0.0), 0.0

    def _solve(self, columns: list[int]) -> np.ndarray | None:
        """Least squares on the given features; [3] coefficients (0 for the others)."""
        a = self._xtx[np.ix_(columns, columns)] + 1e-12 * np.eye(len(columns))
        try:
            solved = np.linalg.solve(a, self._xty[columns])
        except np.linalg.LinAlgError:
            return None
        beta = np.zeros(3)
        beta[columns] = solved
        return beta


class AcceptanceRates:
    """Per request and draft source: the rate at which its draft tokens are accepted, shrunk
    towards the source-wide rate while the request has few observations of its own."""

    def __init__(self, prior: float = 0.5, prior_weight: float = PRIOR_WEIGHT):
        self.prior, self.prior_weight = prior, prior_weight
        # [accepted, tried] per source, per request and overall
        self._requests: dict[Hashable, dict[str, list[float]]] = {}
        self._sources: dict[str, list[float]] = {}

    def observe(self, req_id: Hashable, source: str, drafted: int, accepted: int) -> None:
        """A verified draft of `drafted` tokens of which the first `accepted` were kept."""
        if drafted <= 0:
            return
        tried = accepted + 1 if accepted < drafted else drafted  # positions that were judged
        for counts in (self._requests.setdefault(req_id, {}).setdefault(source, [0.0, 0.0]),
                       self._sources.setdefault(source, [0.0, 0.0])):
            counts[0] += accepted
            counts[1] += tried
        source_counts = self._sources[source]
        if source_counts[1] > 1000:  # keep the source-wide rate current
            source_counts[0] *= 0.5
            source_counts[1] *= 0.5

    def source_rate(self, source: str) -> float:
        accepted, tried = self._sources.get(source, (0.0, 0.0))
        return (accepted + self.prior * self.prior_weight) / (tried + self.prior_weight)

    def rate(self, req_id: Hashable, source: str) -> float:
        accepted, tried = self._requests.get(req_id, {}).get(source, (0.0, 0.0))
        w = self.prior_weight
        return (accepted + self.source_rate(source) * w) / (tried + w)

    def drop(self, req_ids: Iterable[Hashable] | None) -> None:
        for req_id in req_ids or ():
            self._requests.pop(req_id, None)

    def __len__(self) -> int:
        return len(self._requests)


def choose_lengths(
    candidates: Sequence[int],  # per request: draft tokens available (0 = none)
    rates: Sequence[float],  # per request: acceptance rate of those tokens
    fixed: float,
    per_token: float,
    token_gains: Sequence[Sequence[float] | None] | None = None,
    overhead: float = 0.0,
    weights: Sequence[float] | None = None,
) -> list[int]:
    """Per request, how many of its candidate tokens to verify (a prefix of each draft).

    token_gains[r] (optional, non-increasing): the probability that row r's draft is
    accepted up to each position, replacing rate ** position (e.g. from a suffix tree's
    token probabilities). overhead: seconds a step pays once when it verifies any draft
    token (vLLM's speculative path); the best choice with drafts is compared with none.
    weights[r] (optional, > 0; default 1): what one of row r's tokens is worth (`closed_batch`);
    the choice maximises weighted expected tokens per second."""
    if per_token <= 0 and overhead <= 0:
        return list(candidates)
    lengths = [0] * len(candidates)
    weights = [1.0] * len(candidates) if weights is None else list(weights)
    expected = float(sum(weights))  # each request's verified token (or bonus) is certain
    plain = expected / (fixed + per_token * len(candidates))
    seconds = fixed + per_token * len(candidates) + overhead  # as if any draft is verified
    token_gains = token_gains or [None] * len(candidates)
    gains = sorted(
        (((rate ** position if given is None else given[position - 1]) * weight, row)
         for row, (count, rate, given, weight)
         in enumerate(zip(candidates, rates, token_gains, weights))
         for position in range(1, count + 1)),
        reverse=True,
    )  # a row's gains fall with the position, so every prefix of this order is a draft prefix
    for gain, row in gains:
        if gain * seconds <= expected * per_token:
            break
        lengths[row] += 1
        expected += gain
        seconds += per_token
    if overhead > 0 and expected / seconds <= plain:
        return [0] * len(candidates)  # the drafts do not pay for the speculative path
    return lengths


def choose_rows(
    gains: Sequence[float],  # per candidate request: expected accepted tokens of its draft
    pass_cost: float,  # seconds the draft passes cost once any request drafts
    row_cost: float,  # seconds per drafting request: its share of the passes, DP, verifying
    expected: float,  # tokens the step is already expected to produce
    seconds: float,  # what the step already costs
    margin: float = 1.0,
) -> list[bool]:
    """Which requests to draft for, maximising expected tokens per second. For a given number
    k of requests the best are the k of highest gain, so every k is tried (0 included); any
    k > 0 must beat not drafting by the factor `margin`."""
    order = sorted(range(len(gains)), key=lambda r: -gains[r])
    best_k, best_rate, gain = 0, expected / seconds * margin, 0.0
    for k, row in enumerate(order, start=1):
        gain += gains[row]
        rate = (expected + gain) / (seconds + pass_cost + row_cost * k)
        if rate > best_rate:
            best_k, best_rate = k, rate
    chosen = [False] * len(gains)
    for row in order[:best_k]:
        chosen[row] = True
    return chosen


class DraftBudget:
    """`choose_lengths` and `choose_rows` with per-bucket fits, exploration, and an off
    switch.

    A model draft pass over r requests costs about `ratio` x a verification step of r tokens
    (the kept layers, the draft head): one pass per draft token, so a draft of mean length l
    costs l x ratio x (fixed + per_token * r). `ratio` is measured on every model draft
    against the bucket's verification fit; the DP adds its measured seconds per request
    divided by LOI (a request is searched once per LOI drafting steps)."""

    def __init__(self, explore_every: int = 32, enabled: bool = True, loi: int = 16,
                 draft_ratio: float = 0.8):
        self.explore_every = explore_every
        self.enabled = enabled
        self.loi = loi
        self.fits: dict[int, StepCostFit] = {}
        self._steps: dict[int, int] = {}
        self._interval: dict[int, int] = {}  # bucket -> steps between explorations now
        self._explored_at: dict[int, int] = {}  # bucket -> step of the last exploration
        self._drafted: dict[int, bool] = {}  # bucket -> a fitted decision drafted since then
        self._bucket = 1  # the current step's
        self._fitted = False  # whether the current step's bucket has a fit that estimates
        self.draft_ratio = draft_ratio
        """EW of measured model-draft seconds over the verification fit's prediction."""
        self.search_row_seconds = 0.0
        """EW of DP seconds per searched request."""
        self.model_draft_length = 2.0
        """EW mean length of the model's drafts (they stop at the draft-exit threshold)."""

    def observe(self, batch_size: int, tokens_verified: int, seconds: float) -> None:
        if self.enabled and seconds > 0:
            self.fits.setdefault(batch_bucket(batch_size), StepCostFit()).observe(
                tokens_verified, seconds, drafted=tokens_verified > batch_size)

    def observe_model(self, batch_size: int, lengths: Sequence[int], seconds: float) -> None:
        """A step of `batch_size` requests drafted with the model (`lengths` per drafting
        request) in `seconds`."""
        if not self.enabled or not lengths or max(lengths) == 0:
            return
        self.model_draft_length += 0.1 * (sum(lengths) / len(lengths) - self.model_draft_length)
        fit = self.fits.get(batch_bucket(batch_size))
        cost = None if fit is None else fit.estimate()
        if cost is not None:
            fixed, per_token, _ = cost
            predicted = max(lengths) * fixed + per_token * sum(lengths)
            if predicted > 0:
                self.draft_ratio += 0.2 * (seconds / predicted - self.draft_ratio)

    def observe_search(self, rows: int, seconds: float) -> None:
        if self.enabled and rows > 0:
            per_row = seconds / rows
            self.search_row_seconds = (per_row if self.search_row_seconds == 0 else
                                       self.search_row_seconds
                                       + 0.2 * (per_row - self.search_row_seconds))

    def start_step(self, batch_size: int) -> tuple[float, float, float] | None:
        """The cost fit to decide this step with; None: verify every candidate, and draft with
        the model for one request only (an exploration step, or no fit yet)."""
        if not self.enabled:
            return None
        self._bucket = bucket = batch_bucket(batch_size)
        self._steps[bucket] = steps = self._steps.get(bucket, 0) + 1
        estimate = self._estimate(bucket)
        self._fitted = estimate is not None
        if steps % self.explore_every == 0:
            return None
        return estimate

    def _estimate(self, bucket: int) -> tuple[float, float, float] | None:
        """The bucket's own fit, else the nearest fitted bucket's (in powers of two; the
        larger on a tie, its per-token cost the more cautious), else None. Every bucket's
        model is the same line in the tokens verified, so a neighbour's fit is a far better
        guess than none: without it a batch that drains from 8 requests to 1 verified every
        candidate on each new bucket's first 8-20 steps (vLLM's `suffix` policy, 0.81x plain
        in a batch of 8 short prompts on the reference CPU)."""
        nearest_first = sorted(
            self.fits, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), -b))
        for other in nearest_first:  # the bucket itself first (distance 0)
            estimate = self.fits[other].estimate()
            if estimate is not None:
                return estimate
        return None

    def _model_exploration_due(self) -> bool:
        """On an exploration step with a fit: whether a model draft is explored too. The
        interval doubles (to MAX_EXPLORE_EVERY) while the fitted decisions since the last
        model exploration chose no model draft, and falls back once one did."""
        bucket, steps = self._bucket, self._steps.get(self._bucket, 0)
        interval = self._interval.get(bucket, self.explore_every)
        if steps - self._explored_at.get(bucket, 0) < interval:
            return False
        self._explored_at[bucket] = steps
        self._interval[bucket] = (self.explore_every if self._drafted.get(bucket)
                                  else min(2 * interval, MAX_EXPLORE_EVERY))
        self._drafted[bucket] = False
        return True

    def _unfitted_model_exploration_due(self) -> bool:
        """While no bucket has a fit (a fresh engine): a model draft on the bucket's steps
        1, 5, 9, ... (UNFITTED_MODEL_EVERY). Once any bucket has one, every bucket decides with
        it (`_estimate`) and explores on the fitted schedule."""
        steps = max(self._steps.get(self._bucket, 0), 1)
        return (steps - 1) % UNFITTED_MODEL_EVERY == 0

    def lengths(self, cost: tuple[float, float, float] | None, candidates: Sequence[int],
                rates: Sequence[float],
                token_gains: Sequence[Sequence[float] | None] | None = None,
                weights: Sequence[float] | None = None) -> list[int]:
        if cost is None:
            return list(candidates)
        fixed, per_token, overhead = cost
        return choose_lengths(candidates, rates, fixed, per_token, token_gains=token_gains,
                              overhead=overhead, weights=weights)

    def model_rows(self, cost: tuple[float, float, float] | None, gains: Sequence[float],
                   expected: float, seconds: float, copies: bool = False) -> list[bool]:
        """Which candidate requests get model drafts (`gains`: their expected accepted
        tokens; `expected`, `seconds`: the step so far; `copies`: whether the step already
        verifies copied drafts, i.e. already pays the speculative path's overhead)."""
        if not self.enabled:
            return [True] * len(gains)
        if cost is None:  # explore cheaply: the most promising request only
            if self._fitted and not self._model_exploration_due():
                return [False] * len(gains)
            if not self._fitted and (copies or not self._unfitted_model_exploration_due()):
                return [False] * len(gains)
            best = max(range(len(gains)), key=lambda r: gains[r])
            return [r == best for r in range(len(gains))]
        fixed, per_token, overhead = cost
        length = self.model_draft_length
        chosen = choose_rows(
            gains,
            pass_cost=length * self.draft_ratio * fixed + (0.0 if copies else overhead),
            row_cost=(length * (self.draft_ratio + 1) * per_token
                      + self.search_row_seconds / self.loi),
            expected=expected, seconds=seconds, margin=MODEL_DRAFT_MARGIN,
        )
        if any(chosen):
            self._drafted[self._bucket] = True
        return chosen
