"""CLaSp's own counters: DP runs and time, drafting time, skip sets, threshold exits (host-free).

vLLM's spec-decode metrics (acceptance length, per-position acceptance) are counted by its
scheduler and need nothing from here. These counters describe what only CLaSp knows; they are
summarised in a periodic log line and readable by tests and the benchmark.

`take_delta()` hands what changed since its last call to the runner's output; from there it
travels with vLLM's scheduler stats to the front end, where `metrics.ClaspStatLogger` turns it
into Prometheus metrics (`vllm:clasp_*`) and a periodic log line (see docs/metrics.md).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

# Under "vllm." so vLLM's logging configuration (handlers, level) covers it in every process.
logger = logging.getLogger("vllm.clasp")

LOG_INTERVAL_S = 10.0


@dataclass
class ClaspStats:
    num_dp_runs: int = 0
    """DP runs (one per request re-optimisation)."""
    num_dp_batches: int = 0
    """Batched DP invocations (several requests share one)."""
    search_time_s: float = 0.0
    num_model_draft_rounds: int = 0
    """Requests x verification steps that drafted."""
    num_model_draft_tokens: int = 0
    draft_time_s: float = 0.0
    planning_time_s: float = 0.0
    """The proposer's own bookkeeping (planning, copy sources, q), DP and drafting excluded."""
    num_model_draft_accepted_tokens: int = 0
    """Model-draft tokens accepted by verification."""
    model_draft_predicted_accepted: float = 0.0
    """Accepted tokens the choice of M predicted for its drafts ("auto" only)."""
    num_model_draft_predicted_accepted_of: int = 0
    """Accepted tokens of those same drafts: compare with the prediction."""
    num_threshold_exits: int = 0
    """Draft steps whose top-1 probability fell under the draft-exit threshold."""
    num_copy_draft_rounds: int = 0
    """Requests x verification steps that drafted by copying (suffix trees or n-gram lookup)."""
    num_copy_draft_tokens: int = 0
    num_speculation_off_steps: int = 0
    """Steps that verified no draft token (no drafts, or none measured worth verifying)."""
    num_speculation_off_rounds: int = 0
    """Requests x verification steps without a draft."""
    num_unverified_draft_tokens: int = 0
    """Candidate draft tokens left unverified because the cost model measured them not worth
    their verification (adaptive only)."""
    skipped_layers: Counter = field(default_factory=Counter)
    """Distribution of the number of skipped layers per drafting request."""
    num_skip_set_changes: int = 0
    """Re-optimisations (DP runs for a request that had a skip set) that changed the set."""
    num_reoptimizations: int = 0
    """DP runs for a request that already had a skip set."""
    num_skip_set_changed_layers: int = 0
    """Sum over re-optimisations of |old skip set XOR new skip set|."""
    layer_skips: Counter = field(default_factory=Counter)
    """Per layer index: DP runs that chose to skip it."""
    search_skip_counts: Counter = field(default_factory=Counter)
    """Distribution of the number of skipped layers per DP run."""
    tracked_requests: int = 0
    """Requests whose skip set the proposer currently holds (a gauge)."""
    _reported: dict = field(default_factory=dict, repr=False)
    _last_log: float = field(default_factory=time.monotonic, repr=False)

    def record_search(self, masks: torch.Tensor, changed: list[int | None],
                      seconds: float) -> None:  # masks: [B, L] bool, the sets chosen
        self.num_dp_runs += len(changed)
        self.num_dp_batches += 1
        self.search_time_s += seconds
        for layer, count in enumerate(masks.sum(dim=0).tolist()):
            if count:
                self.layer_skips[layer] += count
        self.search_skip_counts.update(masks.sum(dim=1).tolist())
        for count in changed:
            if count is not None:
                self.num_reoptimizations += 1
                self.num_skip_set_changes += count > 0
                self.num_skip_set_changed_layers += count

    def record_copies(self, num_requests: int, num_tokens: int) -> None:
        self.num_copy_draft_rounds += num_requests
        self.num_copy_draft_tokens += num_tokens

    def record_drafts(self, skip: torch.Tensor, lengths: list[int],
                      seconds: float) -> None:  # skip: [R, L] bool
        self.num_model_draft_rounds += len(lengths)
        self.num_model_draft_tokens += sum(lengths)
        self.draft_time_s += seconds
        self.skipped_layers.update(skip.sum(dim=1).tolist())

    def record_model_acceptance(self, drafted: int, accepted: int, predicted: float) -> None:
        self.num_model_draft_accepted_tokens += accepted
        if predicted == predicted:  # not NaN: M was chosen with a prediction
            self.model_draft_predicted_accepted += predicted
            self.num_model_draft_predicted_accepted_of += accepted

    def record_planning(self, seconds: float) -> None:
        self.planning_time_s += seconds

    def record_undrafted(self, num_requests: int, whole_step: bool) -> None:
        self.num_speculation_off_steps += whole_step
        self.num_speculation_off_rounds += num_requests

    def record_unverified(self, num_tokens: int) -> None:
        self.num_unverified_draft_tokens += num_tokens

    def record_exits(self, count: int) -> None:
        self.num_threshold_exits += count

    def as_dict(self) -> dict:
        return {
            "num_dp_runs": self.num_dp_runs,
            "num_dp_batches": self.num_dp_batches,
            "search_time_s": self.search_time_s,
            "num_model_draft_rounds": self.num_model_draft_rounds,
            "num_model_draft_tokens": self.num_model_draft_tokens,
            "draft_time_s": self.draft_time_s,
            "planning_time_s": self.planning_time_s,
            "num_threshold_exits": self.num_threshold_exits,
            "num_model_draft_accepted_tokens": self.num_model_draft_accepted_tokens,
            "model_draft_predicted_accepted": self.model_draft_predicted_accepted,
            "num_model_draft_predicted_accepted_of": self.num_model_draft_predicted_accepted_of,
            "num_copy_draft_rounds": self.num_copy_draft_rounds,
            "num_copy_draft_tokens": self.num_copy_draft_tokens,
            "num_speculation_off_steps": self.num_speculation_off_steps,
            "num_speculation_off_rounds": self.num_speculation_off_rounds,
            "num_unverified_draft_tokens": self.num_unverified_draft_tokens,
            "skipped_layers": dict(self.skipped_layers),
            "num_skip_set_changes": self.num_skip_set_changes,
            "num_reoptimizations": self.num_reoptimizations,
            "num_skip_set_changed_layers": self.num_skip_set_changed_layers,
            "layer_skips": dict(self.layer_skips),
            "search_skip_counts": dict(self.search_skip_counts),
        }

    def take_delta(self) -> dict:
        """What changed since the last call: counters as differences, histograms as
        {str(value): count} differences, plus the `tracked_requests` gauge. Plain types, so
        it crosses process boundaries with vLLM's own serialisers."""
        now = self.as_dict()
        last, self._reported = self._reported, now
        delta: dict = {"tracked_requests": self.tracked_requests}
        for key, value in now.items():
            if isinstance(value, dict):
                before = last.get(key, {})
                changes = {str(k): v - before.get(k, 0) for k, v in value.items()}
                delta[key] = {k: v for k, v in changes.items() if v}
            else:
                delta[key] = value - last.get(key, 0)
        return delta

    def maybe_log(self, num_tracked: int) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_S:
            return
        self._last_log = now
        rounds = max(self.num_model_draft_rounds, 1)
        logger.debug(
            "CLaSp worker: %d DP runs in %d batched searches (%.1f ms per search), %.2f draft tokens "
            "per round (%.1f ms per round), "
            "%d threshold exits, %d steps without drafts, %d requests tracked",
            self.num_dp_runs, self.num_dp_batches,
            1e3 * self.search_time_s / max(self.num_dp_batches, 1),
            self.num_model_draft_tokens / rounds, 1e3 * self.draft_time_s / rounds,
            self.num_threshold_exits, self.num_speculation_off_steps, num_tracked,
        )


def merge_deltas(earlier: dict | None, later: dict) -> dict:
    """Two `take_delta()` results as one: counters and histograms add, gauges take `later`."""
    if not earlier:
        return dict(later)
    merged = dict(earlier)
    for key, value in later.items():
        if key in GAUGES:
            merged[key] = value
        elif isinstance(value, dict):
            bucket = dict(merged.get(key, {}))
            for k, v in value.items():
                bucket[k] = bucket.get(k, 0) + v
            merged[key] = bucket
        else:
            merged[key] = merged.get(key, 0) + value
    return merged


GAUGES = ("tracked_requests",)
