"""CLaSp's metrics in the front end: Prometheus `vllm:clasp_*` and a periodic log line.

The worker's counters (`stats.ClaspStats`) reach here as a delta per engine step in
`SchedulerStats.clasp` (patches 7-10). vLLM builds this logger next to its own for CLaSp
configs with stats on (patches 11, 12), so `/metrics` of `vllm serve` and `LLM.get_metrics()` show
them beside vLLM's `vllm:spec_decode_*` metrics. Names and meanings: docs/metrics.md.
"""

from __future__ import annotations

import logging
import threading

from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_clasp.core.stats import COUNTERS  # (key, metric, help) per counter

logger = logging.getLogger("vllm.clasp")

LABELS = ("model_name", "engine")

class _Collectors:
    """Process-wide Prometheus collectors (several engines share them through labels)."""

    _lock = threading.Lock()
    _instance: _Collectors | None = None

    def __init__(self, num_layers_hint: int = 64):
        from prometheus_client import Counter, Gauge, Histogram

        self.counters = {
            row.key: Counter(row.metric, row.help, labelnames=LABELS, registry=None)
            for row in COUNTERS
        }
        self.layer_skips = Counter(
            "vllm:clasp_layer_skipped", "DP runs that chose to skip this decoder layer.",
            labelnames=(*LABELS, "layer"), registry=None,
        )
        self.skipped_layers = Histogram(
            "vllm:clasp_skipped_layers", "Layers skipped per request, one observation per DP run.",
            labelnames=LABELS, buckets=[float(n) for n in range(num_layers_hint + 1)],
            registry=None,
        )
        self.tracked = Gauge(
            "vllm:clasp_tracked_requests",
            "Requests whose CLaSp state (skip set, LOI count) the proposer holds.",
            labelnames=LABELS, multiprocess_mode="mostrecent", registry=None,
        )
        self.all = [*self.counters.values(), self.layer_skips, self.skipped_layers, self.tracked]

    @classmethod
    def get(cls, num_layers_hint: int) -> _Collectors:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls(num_layers_hint)
            cls._instance.ensure_registered()
            return cls._instance

    def ensure_registered(self) -> None:
        """vLLM's Prometheus logger unregisters every `vllm:` collector when an engine
        starts; register ours (again) into the registry `/metrics` reads."""
        from prometheus_client import REGISTRY

        for collector in self.all:
            if collector not in REGISTRY._collector_to_names:
                REGISTRY.register(collector)


class ClaspStatLogger(StatLoggerBase):
    """One per engine (vLLM wraps per-engine loggers for data parallelism)."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.engine_index = engine_index
        labels = (str(vllm_config.model_config.served_model_name), str(engine_index))
        self._labels = labels
        num_layers = vllm_config.model_config.get_total_num_hidden_layers()
        self._collectors = _Collectors.get(num_layers)
        self._interval: dict = {}
        self._tracked = 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        delta = getattr(scheduler_stats, "clasp", None) if scheduler_stats else None
        if not delta:
            return
        from vllm_clasp.core.stats import merge_deltas

        collectors = self._collectors
        collectors.ensure_registered()  # a later engine in this process may have unregistered us
        for key, counter in collectors.counters.items():
            value = delta.get(key, 0)
            if value:
                counter.labels(*self._labels).inc(value)
        for layer, count in delta.get("layer_skips", {}).items():
            collectors.layer_skips.labels(*self._labels, str(layer)).inc(count)
        histogram = collectors.skipped_layers.labels(*self._labels)
        for skipped, count in delta.get("search_skip_counts", {}).items():
            for _ in range(int(count)):
                histogram.observe(float(skipped))
        self._tracked = int(delta.get("tracked_requests", 0))
        collectors.tracked.labels(*self._labels).set(self._tracked)
        self._interval = merge_deltas(self._interval, delta)

    def log(self) -> None:
        """One line per logging interval (beside vLLM's own), when CLaSp did anything."""
        d, self._interval = self._interval, {}
        if not d:
            return
        rounds = d.get("num_model_draft_rounds", 0)
        drafted = rounds + d.get("num_copy_draft_rounds", 0) + d.get("num_speculation_off_rounds", 0)
        searches = d.get("num_dp_batches", 0)
        logger.info(
            "Engine %03d CLaSp: %d DP runs (%.1f ms per batched search), model drafts on "
            "%.0f%% of request-steps (%.2f tokens, %.1f ms each), copied drafts on "
            "%.0f%%, speculation off on %.0f%%; %d threshold exits, %d skip-set changes, "
            "%d requests tracked",
            self.engine_index, d.get("num_dp_runs", 0),
            1e3 * d.get("search_time_s", 0.0) / max(searches, 1),
            100 * rounds / max(drafted, 1), d.get("num_model_draft_tokens", 0) / max(rounds, 1),
            1e3 * d.get("draft_time_s", 0.0) / max(rounds, 1),
            100 * d.get("num_copy_draft_rounds", 0) / max(drafted, 1),
            100 * d.get("num_speculation_off_rounds", 0) / max(drafted, 1),
            d.get("num_threshold_exits", 0), d.get("num_skip_set_changes", 0), self._tracked,
        )

    def log_engine_initialized(self) -> None:
        pass
