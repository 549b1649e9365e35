"""The n-gram copy source: prompt lookup in the request's own context (host-free, stateless).

Used where arctic-inference is missing, when asked for, and for seeded requests whatever the
source: their output depends on what is drafted, so their drafts must depend on their own
context only, never on what other requests generated before (docs/design.md)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

from vllm_clasp.core.draft_source import CopiedDraft
from vllm_clasp.core.prompt_lookup import prompt_lookup

NGRAM = "ngram"


class NgramLookup:
    name = NGRAM

    def __init__(self, max_ngram: int, min_ngram: int):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    @classmethod
    def from_options(cls, options) -> "NgramLookup":
        return cls(options.prompt_lookup_max, options.prompt_lookup_min)

    def update(self, req_id: Hashable, tokens: np.ndarray, num_prompt_tokens: int) -> None:
        pass

    def propose(self, req_id: Hashable, tokens: np.ndarray, max_draft: int) -> CopiedDraft:
        """tokens: [n] the request's tokens so far (prompt + output)."""
        found = prompt_lookup(tokens, self.max_ngram, self.min_ngram, max_draft)
        return CopiedDraft(found.astype(np.int64, copy=False))

    def forget(self, req_ids: Iterable[Hashable]) -> None:
        pass
