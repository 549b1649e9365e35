"""CLaSp's own counters: DP runs and time, drafting time, skip sets, threshold exits (host-free).

vLLM's spec-decode metrics (acceptance length, per-position acceptance) are counted by its
scheduler and need nothing from here. These counters describe what only CLaSp knows; they are
summarised in a periodic log line and readable by tests and the benchmark.
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
    num_searches: int = 0
    """DP runs (one per request re-optimisation)."""
    num_search_calls: int = 0
    """Batched DP invocations (several requests share one)."""
    search_time_s: float = 0.0
    num_draft_rounds: int = 0
    """Requests x verification steps that drafted."""
    num_draft_tokens: int = 0
    draft_time_s: float = 0.0
    num_threshold_exits: int = 0
    """Draft steps whose top-1 probability fell under the draft-exit threshold."""
    num_prompt_lookup_rounds: int = 0
    """Requests x verification steps that drafted by prompt lookup instead of the model."""
    num_prompt_lookup_tokens: int = 0
    num_plain_steps: int = 0
    """Steps on which the adaptive controller turned drafting off (it measured slower)."""
    num_plain_rounds: int = 0
    skipped_layers: Counter = field(default_factory=Counter)
    """Distribution of the number of skipped layers per drafting request."""
    _last_log: float = field(default_factory=time.monotonic, repr=False)

    def record_search(self, num_requests: int, seconds: float) -> None:
        self.num_searches += num_requests
        self.num_search_calls += 1
        self.search_time_s += seconds

    def record_prompt_lookup(self, num_requests: int, num_tokens: int) -> None:
        self.num_prompt_lookup_rounds += num_requests
        self.num_prompt_lookup_tokens += num_tokens

    def record_drafts(self, skip: torch.Tensor, lengths: list[int],
                      seconds: float) -> None:  # skip: [R, L] bool
        self.num_draft_rounds += len(lengths)
        self.num_draft_tokens += sum(lengths)
        self.draft_time_s += seconds
        self.skipped_layers.update(skip.sum(dim=1).tolist())

    def record_plain_step(self, num_requests: int) -> None:
        self.num_plain_steps += 1
        self.num_plain_rounds += num_requests

    def record_exits(self, count: int) -> None:
        self.num_threshold_exits += count

    def as_dict(self) -> dict:
        return {
            "num_searches": self.num_searches,
            "num_search_calls": self.num_search_calls,
            "search_time_s": self.search_time_s,
            "num_draft_rounds": self.num_draft_rounds,
            "num_draft_tokens": self.num_draft_tokens,
            "draft_time_s": self.draft_time_s,
            "num_threshold_exits": self.num_threshold_exits,
            "num_prompt_lookup_rounds": self.num_prompt_lookup_rounds,
            "num_prompt_lookup_tokens": self.num_prompt_lookup_tokens,
            "num_plain_steps": self.num_plain_steps,
            "num_plain_rounds": self.num_plain_rounds,
            "skipped_layers": dict(self.skipped_layers),
        }

    def maybe_log(self, num_tracked: int) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_S:
            return
        self._last_log = now
        rounds = max(self.num_draft_rounds, 1)
        logger.info(
            "CLaSp: %d DP runs in %d batched searches (%.1f ms per search), %.2f draft tokens "
            "per round (%.1f ms per round), "
            "%d threshold exits, %d steps without drafts, %d requests tracked",
            self.num_searches, self.num_search_calls,
            1e3 * self.search_time_s / max(self.num_search_calls, 1),
            self.num_draft_tokens / rounds, 1e3 * self.draft_time_s / rounds,
            self.num_threshold_exits, self.num_plain_steps, num_tracked,
        )
