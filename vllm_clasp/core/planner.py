"""One verification step's drafting decisions, from plain arrays (host-free).

Per step, for the requests that decode (a *row* is a request's index in the runner's input
batch), the planner decides in this order:

1. credit the previous plan: what its verification accepted per request and draft source
   (`AcceptanceRates`), and the step's time without the model's work (`DraftBudget.observe`);
2. copied drafts (free to make; `copy_sources`: suffix trees over prompts and past responses,
   or n-gram lookup in the request's own context), each trimmed to the prefix worth verifying;
3. which of the other rows get a layer-skipped model draft (`DraftBudget.model_rows`), and
   which of those are due for a DP run (`SkipSets`: per-request or shared skip sets);
4. after the caller ran the DP and the draft passes: how much of every draft to verify,
   jointly, since they share the verification step.

The caller makes three calls per step: `plan` (a `Plan`, never changed afterwards),
`skip_masks` (with the DP's result when the plan asked for one) and `finish` (the drafts to
verify).

Copies may be as long as K (`num_speculative_tokens`); layer-skip drafts at most
`max_model_draft_tokens`, the lookahead KV slots their passes write.

Seeded requests take a policy that depends on their own tokens only (n-gram lookup in their
own context while their own record says copies pay, every copied token verified, no model
drafts under the budget; `seeded_copies`): their sampled output depends on what is drafted for
them, and a seed must pin it (docs/design.md).

Under tensor parallelism every rank plans on the same inputs; each decision that depends on
measured time is passed through `broadcast` (rank 0's value everywhere), so all ranks run the
same layers. With one rank `broadcast` is the identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_clasp.core.closed_batch import ClosedBatch
from vllm_clasp.core.copy_calibration import CopyCalibration
from vllm_clasp.core.copy_sources import CopiedDrafts
from vllm_clasp.core.draft_budget import AcceptanceRates, DraftBudget, expected_accepted
from vllm_clasp.core.optimizer import SkipSearch
from vllm_clasp.core.options import ResolvedClaspOptions
from vllm_clasp.core.skip_count import SkipCountChoice
from vllm_clasp.core.skip_sets import SkipSets
from vllm_clasp.core.stats import ClaspStats

MODEL = "model"
"""Draft sources, each with its own acceptance rates: MODEL and the copy sources' names."""

Broadcast = Callable[[torch.Tensor], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class StepInputs:
    """What the runner knows when a verification step's output is in (row = input-batch row)."""

    req_ids: Sequence[str]  # [n]
    token_ids: np.ndarray  # [n, >= max(num_tokens)] int: each row's tokens so far
    num_tokens: np.ndarray  # [n] int: tokens so far; the last one has no KV yet
    num_sampled: Sequence[int]  # [n]: tokens the verification just produced (0: none)
    max_draft: np.ndarray  # [n] int: most draft tokens the row may verify (>= 0)
    num_prompt_tokens: np.ndarray | None = None  # [n] int (None: no copy source needs it)
    seeded: frozenset[int] = frozenset()  # rows whose request has a seed
    has_prefill: bool = False  # a new request's prefill ran in the step just verified
    tokens_left: np.ndarray | None = None  # [n] int: tokens each may still generate (None: unknown)


@dataclass(frozen=True)
class Plan:
    """The planner's decisions for one step before any model work (not changed afterwards)."""

    rows: list[int]  # rows that decode this step (each verifies at least its own token)
    copied: dict[int, np.ndarray]  # row -> copied draft worth verifying (before model drafts)
    copy_source: dict[int, str]  # row -> the source of its copy
    copy_probs: dict[int, np.ndarray]  # row -> its source's probability per copied token
    model_rows: list[int]  # rows to draft with the layer-skipped model (ascending)
    search_rows: list[int]  # of model_rows: due for a DP run before drafting
    cost: tuple[float, float, float] | None  # (fixed, per token, overhead); None: verify all
    shared_rows: frozenset[int] = frozenset()  # of model_rows: drafting with the shared set
    started: float = 0.0  # clock() when planning started
    weights: dict[int, float] = field(default_factory=dict)  # row -> token worth (`ClosedBatch`)

    @property
    def search_groups(self) -> list[int] | None:
        """[len(search_rows)] DP group per searched row (`SkipSets.groups`); None: no sharing."""
        return SkipSets.groups(self.search_rows, self.shared_rows)


@dataclass(frozen=True)
class Drafts:
    """What `finish` decided: the tokens each row verifies."""

    tokens: list[list[int]]  # [n] per input-batch row (empty: verifies its own token only)
    copied: dict[int, np.ndarray]  # rows whose draft is a copy (q is a point mass there)


@dataclass
class _Ledger:
    """What a finished plan verifies, credited when the next step sees the result."""

    batch_size: int
    started: float
    model_seconds: float
    verified_tokens: int  # one per row + every draft token verified
    drafted: dict[str, tuple[str, int]] = field(default_factory=dict)  # req -> (source, tokens)
    copy_probs: dict[str, np.ndarray] = field(default_factory=dict)  # req -> its verified copy's q
    choices: dict[str, SkipCountChoice | None] = field(default_factory=dict)  # req -> its M's

    @classmethod
    def of(cls, plan: Plan, step: StepInputs, drafts: Drafts, model_seconds: float,
           choices: dict[int, SkipCountChoice | None]) -> "_Ledger":
        """What `plan` verifies, once its drafts are final; choices: model row -> how the
        M of the set it drafted with was chosen."""
        tokens, copied = drafts.tokens, drafts.copied
        return cls(
            batch_size=len(plan.rows), started=plan.started, model_seconds=model_seconds,
            verified_tokens=len(plan.rows) + sum(len(tokens[i]) for i in plan.rows),
            drafted={step.req_ids[i]: (plan.copy_source[i] if i in copied else MODEL,
                                       len(tokens[i]))
                     for i in plan.rows if tokens[i]},
            copy_probs={step.req_ids[i]: plan.copy_probs[i][: len(d)]
                        for i, d in copied.items() if i in plan.copy_probs},
            choices={step.req_ids[i]: choice for i, choice in choices.items()},
        )


class StepPlanner:
    def __init__(self, options: ResolvedClaspOptions, stats: ClaspStats | None = None,
                 broadcast: Broadcast = _identity, clock: Callable[[], float] = time.perf_counter,
                 budget: DraftBudget | None = None, layer_costs: Sequence[float] | None = None,
                 head_cost: float = 0.0):
        """layer_costs [L], head_cost: each decoder layer's and the draft head's cost (e.g.
        their weights), for the choice of M under "auto" (`core.skip_count`)."""
        self.options = options
        self.stats = stats if stats is not None else ClaspStats()
        self.broadcast = broadcast
        self.clock = clock
        self.skip_sets = SkipSets(options, self.stats, layer_costs, head_cost)
        self.acceptance = AcceptanceRates()
        self.budget = budget or DraftBudget(enabled=options.adaptive, loi=options.loi)
        self.copies = CopiedDrafts(options)
        self.calibration = CopyCalibration()
        self.closed_batch = ClosedBatch()
        self._ledger: _Ledger | None = None
        self._model_seconds = 0.0  # the current step's DP and drafting time

    # ------------------------------------------------------------------ request lifetime
    def forget(self, req_ids: Iterable[str] | None) -> None:
        """Drop finished or preempted requests' state (a resumed request is searched anew)."""
        req_ids = list(req_ids or ())
        self.skip_sets.forget(req_ids)
        self.acceptance.drop(req_ids)
        self.copies.forget(req_ids)
        self.closed_batch.forget(req_ids)
        self.stats.tracked_requests = len(self.skip_sets)

    # ------------------------------------------------------------------ the three calls
    def plan(self, step: StepInputs) -> Plan | None:
        """Credit the last plan, then decide lookups and model rows; None: nobody decodes."""
        rows = [i for i, n in enumerate(step.num_sampled[: len(step.req_ids)]) if n]
        self._credit(step, len(rows))
        if not rows:
            return None
        started = self.clock()
        self._model_seconds = 0.0
        cost = self._step_cost(len(rows))
        weights = self.closed_batch.weights(step.req_ids, rows, step.tokens_left)
        self.stats.record_ahead(sum(1 for w in weights.values() if w < 1))
        self.copies.update(step, rows)
        may_draft = [i for i in rows if step.max_draft[i] > 0]  # room left to draft
        found, copy_source, probs = self.copies.find(step, may_draft)
        copied = self._trim(step, cost, found, copy_source, probs, weights)
        copy_source = {i: copy_source[i] for i in copied}
        candidates = ([i for i in may_draft if i not in copied]
                      if self.options.max_model_draft_tokens else [])
        model_rows = self._model_rows(step, cost, candidates, copied, copy_source, len(rows),
                                      weights)
        search_rows, shared_rows = self.skip_sets.due(step.req_ids, model_rows, step.seeded)
        return Plan(rows, copied, copy_source, probs, model_rows, search_rows, cost,
                    shared_rows, started, weights)

    def skip_masks(self, plan: Plan, step: StepInputs, search: SkipSearch | None = None,
                   search_seconds: float = 0.0) -> torch.Tensor:
        """[len(plan.model_rows), L] bool: the set each model row drafts with. `search`:
        the DP's result for plan.search_rows (run in `search_seconds`), which is required
        when the plan asked for one: each searched set is chosen at its M from the DP's
        table (rank 0's choice on every rank) and stored first."""
        if plan.search_rows:
            if search is None:
                raise ValueError("this plan asks for a DP run over its search_rows first")
            started = self.clock()
            masks, choices = self.skip_sets.choose(
                plan.search_rows, plan.shared_rows, step.seeded, search,
                self.budget.draft_ratio, self.budget.model_draft_length, plan.cost)
            masks = self.broadcast(masks)
            seconds = search_seconds + self.clock() - started
            self.skip_sets.record(step.req_ids, plan.search_rows, plan.shared_rows, masks,
                                  choices, seconds)
            self.budget.observe_search(len(plan.search_rows), seconds)
            self._model_seconds += seconds
        return self.skip_sets.masks(step.req_ids, plan.model_rows, plan.shared_rows)

    def finish(self, plan: Plan, step: StepInputs, made: dict[int, np.ndarray],
               seconds: float) -> Drafts:
        """The draft tokens each row verifies. `made`: row -> the model's draft (for
        plan.model_rows, drafted in `seconds`); verified jointly with the copies."""
        copied = plan.copied
        choices = {}
        if made:
            choices = self.skip_sets.drafted(step.req_ids, plan.model_rows, plan.shared_rows)
            lengths = [len(made[i]) for i in plan.model_rows]
            self.stats.record_drafts(
                self.skip_sets.masks(step.req_ids, plan.model_rows, plan.shared_rows),
                lengths, seconds)
            self.budget.observe_model(len(plan.rows), lengths, seconds)
            self._model_seconds += seconds
            kept = self._trim(step, plan.cost, {**copied, **made},
                              {**plan.copy_source, **dict.fromkeys(made, MODEL)},
                              plan.copy_probs, plan.weights)
            copied = {i: kept[i] for i in copied if i in kept}
            made = {i: kept[i] for i in made if i in kept}
        tokens: list[list[int]] = [[] for _ in step.req_ids]
        for i, draft in [*copied.items(), *made.items()]:
            tokens[i] = draft.tolist()
        drafts = Drafts(tokens, copied)
        self.stats.record_copies(len(copied), sum(len(d) for d in copied.values()))
        undrafted = sum(1 for i in plan.rows if not tokens[i])
        if undrafted:
            self.stats.record_undrafted(undrafted, whole_step=undrafted == len(plan.rows))
        self._ledger = _Ledger.of(plan, step, drafts, self._model_seconds, choices)
        return drafts

    @property
    def model_seconds(self) -> float:
        """The last planned step's DP and drafting time."""
        return self._model_seconds

    # ------------------------------------------------------------------ the decisions
    def _credit(self, step: StepInputs, num_rows: int) -> None:
        """Credit what this verification produced to the previous plan's decisions."""
        last, self._ledger = self._ledger, None
        if last is None:
            return
        index = {req_id: i for i, req_id in enumerate(step.req_ids)}
        for req_id, (source, drafted) in last.drafted.items():
            i = index.get(req_id)
            if i is not None and i < len(step.num_sampled) and step.num_sampled[i]:
                accepted = step.num_sampled[i] - 1  # the last one is the bonus/correction
                self.acceptance.observe(req_id, source, drafted, accepted)
                if req_id in last.copy_probs:
                    self.calibration.observe(source, last.copy_probs[req_id], accepted)
                if source == MODEL:
                    predicted = self.skip_sets.observe(last.choices.get(req_id),
                                                       drafted, accepted)
                    self.stats.record_model_acceptance(drafted, accepted, predicted)
        if step.has_prefill or num_rows != last.batch_size:
            return  # a prefill in the step, or a changed batch, would distort its time
        seconds = self.clock() - last.started
        self.budget.observe(last.batch_size, last.verified_tokens,
                            max(seconds - last.model_seconds, 0.0))

    def _step_cost(self, batch_size: int) -> tuple[float, float, float] | None:
        """This step's verification cost model (fixed, per token, overhead of verifying any
        draft), rank 0's on every rank; None: verify every candidate token (no fit yet, an
        exploration step, or adaptivity off)."""
        cost = self.budget.start_step(batch_size)
        shared = self.broadcast(torch.tensor(
            [0.0] * 4 if cost is None else [1.0, *cost], dtype=torch.float64))
        return tuple(float(x) for x in shared[1:]) if shared[0] else None

    def _model_rows(self, step: StepInputs, cost, candidates: list[int],
                    copied: dict[int, np.ndarray], copy_source: dict[int, str],
                    num_rows: int, weights: dict[int, float] | None = None) -> list[int]:
        """The rows of `candidates` worth a model draft, rank 0's choice on every rank.
        Seeded rows never under the budget (whether a model draft pays is measured in time,
        and a seed must pin the output: `seeded_copies`); with the budget off every row.
        `weights`: row -> what its tokens are worth (empty: 1 each; `ClosedBatch`)."""
        weights = weights or {}
        if not self.budget.enabled:
            return sorted(candidates)
        free = [i for i in candidates if i not in step.seeded]
        if not free:
            return []
        rate = self.acceptance.rate
        gains = [weights.get(i, 1.0)
                 * expected_accepted(rate(step.req_ids[i], MODEL), self.budget.model_draft_length)
                 for i in free]
        expected = seconds = 1.0
        if cost is not None:
            fixed, per_token, overhead = cost
            expected = (sum(weights.values()) if weights else num_rows) + sum(
                weights.get(i, 1.0)
                * expected_accepted(rate(step.req_ids[i], copy_source[i]), len(draft))
                for i, draft in copied.items())
            seconds = (fixed + per_token * (num_rows + sum(len(d) for d in copied.values()))
                       + (overhead if copied else 0.0))
        chosen = self.budget.model_rows(cost, gains, expected, seconds, copies=bool(copied))
        chosen = self.broadcast(torch.tensor(chosen)).tolist()
        return sorted(i for i, keep in zip(free, chosen) if keep)

    def _trim(self, step: StepInputs, cost, candidates: dict[int, np.ndarray],
              sources: dict[int, str], probs: dict[int, np.ndarray],
              weights: dict[int, float] | None = None) -> dict[int, np.ndarray]:
        """The prefix of each row's draft worth verifying (seeded rows: all of it); rows left
        with none are dropped. Keeps the order of `candidates`. A draft whose source gave
        token probabilities (suffix trees) is valued by them (`CopyCalibration`), others
        by their source's measured acceptance rate; each row's tokens at its weight
        (`ClosedBatch`; empty: 1)."""
        order = [i for i, draft in candidates.items() if len(draft) and i not in step.seeded]
        lengths = {i: len(draft) for i, draft in candidates.items()}
        if cost is not None and order:
            chosen = self.budget.lengths(
                cost, [lengths[i] for i in order],
                [self.acceptance.rate(step.req_ids[i], sources[i]) for i in order],
                [self.calibration.gains(sources[i], probs[i][: lengths[i]])
                 if i in probs and sources[i] != MODEL else None for i in order],
                [weights.get(i, 1.0) for i in order] if weights else None)
            chosen = self.broadcast(torch.tensor(chosen, dtype=torch.long)).tolist()
            self.stats.record_unverified(sum(lengths[i] for i in order) - sum(chosen))
            lengths.update(zip(order, chosen))
        return {i: draft[: lengths[i]] for i, draft in candidates.items() if lengths[i] > 0}
