"""Copied drafts as the planner uses them: the configured copy source for unseeded
requests, n-gram lookup in their own context for seeded ones (`draft_source` holds the
interface and the registry of sources)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

from vllm_clasp.core.draft_source import DraftSource, make_source
from vllm_clasp.core.ngram_lookup import NGRAM, NgramLookup
from vllm_clasp.core.seeded_copies import SeededCopyRecord


class CopiedDrafts:
    """The copy sources a planner uses: `copy_source` for unseeded requests, n-gram lookup
    for seeded ones (their own context only, while their own record says copies pay:
    `seeded_copies`); none with copy_source "none"."""

    def __init__(self, options):  # a ResolvedClaspOptions
        self.source: DraftSource | None = (
            None if options.copy_source == "none" else make_source(options.copy_source, options))
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
            draft = copier.propose(step.req_ids[i], step.token_ids[i, : step.num_tokens[i]],
                                 int(step.max_draft[i]))
            if len(draft.tokens):
                found[i], source[i] = draft.tokens, draft.source or copier.name
                if draft.probs is not None:
                    probs[i] = draft.probs
        return found, source, probs

    def forget(self, req_ids: Iterable[Hashable]) -> None:
        if self.source is not None:
            req_ids = list(req_ids)
            self.source.forget(req_ids)
            self.seeded_record.forget(req_ids)
