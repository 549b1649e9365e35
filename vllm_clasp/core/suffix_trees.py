"""The suffix-tree copy source: arctic-inference's `SuffixDecodingCache`, the library vLLM's
own `suffix` method uses (`vllm/v1/spec_decode/suffix_decoding.py`, SuffixDecoding, arXiv
2411.04975), driven the way vLLM drives it (host-free apart from that library).

A suffix tree over each request's prompt plus a global tree over past responses of all
requests, so a request can copy from what earlier requests generated: a request starts with
its prompt, its response grows with every step's tokens, it stops when it finishes (its
response stays in the global tree until FIFO eviction)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

from vllm_clasp.core.draft_source import CopiedDraft
from vllm_clasp.core.options import SuffixOptions

SUFFIX = "suffix"


class SuffixTrees:
    """`SuffixDecodingCache` with vLLM's per-request lifecycle.

    Raises ImportError (with how to install it) when arctic-inference is missing."""

    name = SUFFIX

    def __init__(self, options: SuffixOptions):
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        self.options = options
        self.cache = SuffixDecodingCache(max_tree_depth=options.max_tree_depth,
                                         max_cached_requests=options.max_cached_requests)
        self._seen: dict[Hashable, int] = {}  # active request -> tokens already in its trees

    @classmethod
    def from_options(cls, options) -> "SuffixTrees":
        return cls(options.suffix)

    def update(self, req_id: Hashable, tokens: np.ndarray, num_prompt_tokens: int) -> None:
        """Start `req_id` with its prompt (tokens[:num_prompt_tokens]) if it is new, then
        append its output tokens not yet seen. tokens: [n] prompt + output so far."""
        tokens = np.asarray(tokens, dtype=np.int32)  # what the library accepts
        seen = self._seen.get(req_id)
        if seen is None:
            if req_id in self.cache.cached_requests:  # resumed after preemption: start anew
                self.cache.evict_cached_response(req_id)
            self.cache.start_request(req_id, tokens[:num_prompt_tokens])
            seen = num_prompt_tokens
        if len(tokens) > seen:
            self.cache.add_active_response(req_id, tokens[seen:])
        self._seen[req_id] = max(seen, len(tokens))

    def propose(self, req_id: Hashable, tokens: np.ndarray, max_draft: int) -> CopiedDraft:
        """The most likely continuation of the request's last `max_tree_depth` tokens, at
        most `max_draft` tokens (call `update` first)."""
        if max_draft <= 0 or req_id not in self._seen:
            return CopiedDraft(np.zeros(0, dtype=np.int64))
        pattern = np.asarray(tokens[max(0, len(tokens) - self.options.max_tree_depth):],
                             dtype=np.int32)
        found = self.cache.speculate(
            req_id, pattern, max_spec_tokens=max_draft,
            max_spec_factor=self.options.max_spec_factor,
            min_token_prob=self.options.min_token_prob,
        )
        return CopiedDraft(np.asarray(found.token_ids, dtype=np.int64),
                           np.asarray(found.probs, dtype=np.float64))

    def forget(self, req_ids: Iterable[Hashable]) -> None:
        """Finished or preempted requests: their prompt trees go, their responses stay in the
        global tree (until evicted)."""
        for req_id in req_ids:
            if self._seen.pop(req_id, None) is not None:
                self.cache.stop_request(req_id)
