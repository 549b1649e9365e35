"""Suffix trees, extended by n-gram lookup where it agrees and reaches further (host-free
apart from arctic-inference).

The suffix trees (`suffix_trees`) hold the request's prompt, its output and past responses,
but a speculation stops where the tree's frequency estimate drops below `min_token_prob` or
at `max_spec_factor` x the matched length (a 3-token match proposes at most 3 tokens);
prompt lookup (`ngram_lookup`) copies up to the whole budget after any match of
`prompt_lookup_min` tokens in the request's own context. So: where the trees propose
nothing, or their draft is a prefix of the lookup's longer one, the lookup's draft is taken;
where the two disagree, the trees' (their estimate counts every occurrence, the lookup takes
the latest). Each draft carries the name of the source that made it, so the planner values
it with that source's measured acceptance (`CopiedDraft.source`)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

from vllm_clasp.core.draft_source import CopiedDraft
from vllm_clasp.core.ngram_lookup import NGRAM, NgramLookup
from vllm_clasp.core.suffix_trees import SUFFIX, SuffixTrees

SUFFIX_THEN_NGRAM = "suffix+ngram"


class SuffixThenNgram:
    name = SUFFIX_THEN_NGRAM

    def __init__(self, trees: SuffixTrees, lookup: NgramLookup):
        self.trees, self.lookup = trees, lookup

    @classmethod
    def from_options(cls, options) -> "SuffixThenNgram":
        return cls(SuffixTrees.from_options(options), NgramLookup.from_options(options))

    def update(self, req_id: Hashable, tokens: np.ndarray, num_prompt_tokens: int) -> None:
        self.trees.update(req_id, tokens, num_prompt_tokens)

    def propose(self, req_id: Hashable, tokens: np.ndarray, max_draft: int) -> CopiedDraft:
        """The lookup's draft (source "ngram") where it extends the trees' (or they have
        none), else the trees' (source "suffix"). tokens: [n] the request's tokens so far
        (prompt + output)."""
        trees = self.trees.propose(req_id, tokens, max_draft)
        lookup = self.lookup.propose(req_id, tokens, max_draft)
        n = len(trees.tokens)
        if len(lookup.tokens) > n and np.array_equal(lookup.tokens[:n], trees.tokens):
            lookup.source = NGRAM
            return lookup
        trees.source = SUFFIX
        return trees

    def forget(self, req_ids: Iterable[Hashable]) -> None:
        self.trees.forget(req_ids)
