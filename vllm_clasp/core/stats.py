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
from dataclasses import dataclass

import torch

# Under "vllm." so vLLM's logging configuration (handlers, level) covers it in every process.
logger = logging.getLogger("vllm.clasp")

LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class CounterRow:
    key: str  # the attribute of ClaspStats and the key of as_dict() / take_delta()
    metric: str  # the Prometheus counter (`_total` appended by prometheus_client)
    help: str


COUNTERS = (
    CounterRow("num_dp_runs", "vllm:clasp_dp_runs",
               "Skip sets CLaSp's DP (re)computed: one per request, or one for the set "
               "requests drafting together share, per run."),
    CounterRow("num_dp_batches", "vllm:clasp_dp_batches",
               "Batched DP invocations (the due requests of one step share one)."),
    CounterRow("search_time_s", "vllm:clasp_dp_seconds", "Wall time spent in the DP, in seconds."),
    CounterRow("draft_time_s", "vllm:clasp_draft_seconds",
               "Wall time spent drafting with the layer-skipped model, in seconds."),
    CounterRow("planning_time_s", "vllm:clasp_planning_seconds",
               "Wall time of CLaSp's per-step bookkeeping (planning, copied drafts), DP and "
               "drafting excluded, in seconds."),
    CounterRow("num_model_draft_rounds", "vllm:clasp_model_draft_rounds",
               "Request x verification steps drafted by the layer-skipped model."),
    CounterRow("num_model_draft_tokens", "vllm:clasp_model_draft_tokens",
               "Tokens drafted by the layer-skipped model."),
    CounterRow("num_model_draft_accepted_tokens", "vllm:clasp_model_draft_accepted_tokens",
               "Tokens drafted by the layer-skipped model and accepted by verification."),
    CounterRow("num_draft_passes", "vllm:clasp_draft_passes",
               "Layer-skipped forward passes (one per draft position, every drafting row of "
               "the step at once): clasp_draft_seconds / this is the cost of one pass."),
    CounterRow("num_compiled_draft_passes", "vllm:clasp_compiled_draft_passes",
               "Layer-skipped passes whose decoder layers ran compiled (one torch.compile'd "
               "function for all layers, clasp_compile_layers); the other passes ran them "
               "eagerly."),
    CounterRow("num_model_draft_steps", "vllm:clasp_model_draft_steps",
               "Verification steps with at least one layer-skipped model draft."),
    CounterRow("draft_union_kept_layers", "vllm:clasp_draft_union_kept_layers",
               "Per step with model drafts, the decoder layers kept by at least one drafting "
               "request, summed: a batch draft pass reads each such layer once, so it costs "
               "this union (divide by clasp_model_draft_steps for the mean)."),
    CounterRow("draft_mean_kept_layers", "vllm:clasp_draft_mean_kept_layers",
               "Per step with model drafts, the mean number of layers a drafting request "
               "keeps, summed (compare with clasp_draft_union_kept_layers)."),
    CounterRow("model_draft_predicted_accepted", "vllm:clasp_auto_skip_predicted_accepted_tokens",
               "Accepted model-draft tokens predicted when M was chosen (clasp_skip_layers auto)."),
    CounterRow("num_model_draft_predicted_accepted_of",
               "vllm:clasp_auto_skip_measured_accepted_tokens",
               "Accepted tokens of the same drafts, measured: compare with the prediction."),
    CounterRow("num_copy_draft_rounds", "vllm:clasp_copy_draft_rounds",
               "Request x verification steps drafted by copying (suffix trees or n-gram "
               "lookup; clasp_copy_source)."),
    CounterRow("num_copy_draft_tokens", "vllm:clasp_copy_draft_tokens",
               "Tokens drafted by copying."),
    CounterRow("num_threshold_exits", "vllm:clasp_threshold_exits",
               "Drafts cut short because the draft's top-1 probability fell under the "
               "threshold."),
    CounterRow("num_speculation_off_steps", "vllm:clasp_speculation_off_steps",
               "Steps that verified no draft token (nothing to draft, or nothing measured "
               "worth it)."),
    CounterRow("num_speculation_off_rounds", "vllm:clasp_speculation_off_rounds",
               "Request x verification steps without a draft."),
    CounterRow("num_ahead_rounds", "vllm:clasp_ahead_rounds",
               "Request x verification steps in a closed batch (nobody joined for 8 steps) "
               "with the request ahead of the critical path, its draft tokens weighed at "
               "0.25 (core.closed_batch)."),
    CounterRow("num_unverified_draft_tokens", "vllm:clasp_unverified_draft_tokens",
               "Draft tokens left unverified because measured costs and acceptance said they "
               "would not pay for their verification (clasp_adaptive)."),
    CounterRow("num_reoptimizations", "vllm:clasp_reoptimizations",
               "DP runs for skip sets that already existed (every LOI drafting steps)."),
    CounterRow("num_skip_set_changes", "vllm:clasp_skip_set_changes",
               "Re-optimisations that changed the skip set."),
    CounterRow("num_skip_set_changed_layers", "vllm:clasp_skip_set_changed_layers",
               "Layers entering or leaving skip sets at re-optimisations (|old XOR new|, "
               "summed)."),
)
"""Every counter CLaSp keeps: ClaspStats' attributes, as_dict()'s keys and the Prometheus
counters (`vllm.metrics`) all come from this table."""

HISTOGRAMS = ("skipped_layers", "layer_skips", "search_skip_counts")
"""Counts by value: layers skipped per drafting request, DP runs skipping each layer, layers
skipped per DP run."""


class ClaspStats:
    """The worker's counters (COUNTERS, HISTOGRAMS) and the `tracked_requests` gauge."""

    def __init__(self):
        for row in COUNTERS:
            setattr(self, row.key, 0)  # ints; seconds and means become floats when added
        self.skipped_layers: Counter = Counter()
        self.layer_skips: Counter = Counter()
        self.search_skip_counts: Counter = Counter()
        self.tracked_requests = 0
        self._reported: dict = {}
        self._last_log = time.monotonic()

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
        if len(lengths):
            keep = ~skip  # [R, L]
            self.num_model_draft_steps += 1
            self.draft_union_kept_layers += int(keep.any(dim=0).sum())
            self.draft_mean_kept_layers += float(keep.sum(dim=1).float().mean())

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

    def record_ahead(self, num_requests: int) -> None:
        self.num_ahead_rounds += num_requests

    def record_unverified(self, num_tokens: int) -> None:
        self.num_unverified_draft_tokens += num_tokens

    def record_pass(self, compiled: bool) -> None:
        self.num_draft_passes += 1
        self.num_compiled_draft_passes += compiled

    def record_exits(self, count: int) -> None:
        self.num_threshold_exits += count

    def as_dict(self) -> dict:
        return {**{row.key: getattr(self, row.key) for row in COUNTERS},
                **{key: dict(getattr(self, key)) for key in HISTOGRAMS}}

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
