"""Copied drafts: tokens taken from text already seen, free to make (no model pass).

Two sources, one interface (`CopySource`):

* `SuffixTrees`: arctic-inference's `SuffixDecodingCache`, the library vLLM's own `suffix`
  method uses (`vllm/v1/spec_decode/suffix_decoding.py`, SuffixDecoding, arXiv 2411.04975):
  a suffix tree over each request's prompt plus a global tree over past responses of all
  requests, so a request can copy from what earlier requests generated. Driven the way vLLM
  drives it: a request starts with its prompt, its response grows with every step's tokens,
  it stops when it finishes (its response stays in the global tree until FIFO eviction).
* `NgramLookup`: prompt lookup over the request's own context (`prompt_lookup`). Used where
  arctic-inference is missing, when asked for, and for seeded requests whatever the source:
  their output depends on what is drafted, so their drafts must depend on their own context
  only, never on what other requests generated before (docs/design.md, "Seeds").

A copied draft is deterministic, so its q is a point mass and rejection sampling stays exact.
Every tensor-parallel rank sees the same tokens in the same order and so copies the same
drafts; nothing is broadcast.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np

from vllm_clasp.core.options import SuffixOptions
from vllm_clasp.core.prompt_lookup import prompt_lookup
from vllm_clasp.core.seeded_copies import SeededCopyRecord

SUFFIX, NGRAM = "suffix", "ngram"


@dataclass
class CopiedDraft:
    tokens: np.ndarray  # [<= max_draft] int64
    probs: np.ndarray | None = None  # [len(tokens)] the source's estimate per token, if any


class NgramLookup:
    """Prompt lookup (`prompt_lookup`): stateless."""

    name = NGRAM

    def __init__(self, max_ngram: int, min_ngram: int):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def update(self, req_id: Hashable, tokens: np.ndarray, num_prompt_tokens: int) -> None:
        pass

    def draft(self, req_id: Hashable, tokens: np.ndarray, max_draft: int) -> CopiedDraft:
        """tokens: [n] the request's tokens so far (prompt + output)."""
        found = prompt_lookup(tokens, self.max_ngram, self.min_ngram, max_draft)
        return CopiedDraft(found.astype(np.int64, copy=False))

    def forget(self, req_ids: Iterable[Hashable]) -> None:
        pass


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

    def draft(self, req_id: Hashable, tokens: np.ndarray, max_draft: int) -> CopiedDraft:
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


CopySource = NgramLookup | SuffixTrees


class CopiedDrafts:
    """The copy sources a planner uses: `copy_source` for unseeded requests, n-gram lookup
    for seeded ones (their own context only, while their own record says copies pay:
    `seeded_copies`); none with copy_source "none"."""

    def __init__(self, options):  # a ResolvedClaspOptions
        self.source = make_copy_source(options.copy_source, options.prompt_lookup_max,
                                       options.prompt_lookup_min, options.suffix)
        self.seeded = None if self.source is None else (
            self.source if self.source.name == NGRAM
            else NgramLookup(options.prompt_lookup_max, options.prompt_lookup_min))
        self.seeded_record = None if self.seeded is None else SeededCopyRecord(
            options.prompt_lookup_max, options.prompt_lookup_min)

    def update(self, step, rows: list[int]) -> None:
        """Feed every decoding request's new tokens to the source (suffix trees keep each
        prompt and the responses so far; seeded requests' records replay their new tokens).
        step: a planner's StepInputs."""
        if self.source is None:
            return
        for i in rows:
            tokens = step.token_ids[i, : step.num_tokens[i]]
            prompt = 0 if step.num_prompt_tokens is None else int(step.num_prompt_tokens[i])
            if i in step.seeded:
                self.seeded_record.update(step.req_ids[i], tokens, prompt)
            elif self.source is not self.seeded:  # n-gram lookup keeps no state
                self.source.update(step.req_ids[i], tokens, prompt)

    def find(self, step, rows: list[int]
             ) -> tuple[dict[int, np.ndarray], dict[int, str], dict[int, np.ndarray]]:
        """({row: copied draft}, {row: its source's name}, {row: the source's probability
        of each draft token, where it gives one}) for the rows that have a draft."""
        found, source, probs = {}, {}, {}
        if self.source is None:
            return found, source, probs
        for i in rows:
            copier = self.seeded if i in step.seeded else self.source
            if i in step.seeded and not self.seeded_record.pays(step.req_ids[i]):
                continue
            draft = copier.draft(step.req_ids[i], step.token_ids[i, : step.num_tokens[i]],
                                 int(step.max_draft[i]))
            if len(draft.tokens):
                found[i], source[i] = draft.tokens, copier.name
                if draft.probs is not None:
                    probs[i] = draft.probs
        return found, source, probs

    def forget(self, req_ids: Iterable[Hashable]) -> None:
        if self.source is not None:
            req_ids = list(req_ids)
            self.source.forget(req_ids)
            self.seeded_record.forget(req_ids)


def make_copy_source(kind: str, prompt_lookup_max: int, prompt_lookup_min: int,
                     suffix: SuffixOptions) -> CopySource | None:
    """The source a resolved `copy_source` names ("suffix", "ngram", "none": None)."""
    if kind == SUFFIX:
        return SuffixTrees(suffix)
    if kind == NGRAM:
        return NgramLookup(prompt_lookup_max, prompt_lookup_min)
    return None
