"""Suffix trees, extended by n-gram lookup where it agrees and reaches further (host-free
apart from arctic-inference).

The suffix trees (`suffix_trees`) hold the request's prompt, its output and past responses,
but a speculation stops where the tree's frequency estimate drops below `min_token_prob` or
at `max_spec_factor` x the matched length (a 3-token match proposes at most 3 tokens);
prompt lookup (`ngram_lookup`) copies up to the whole budget after any match of
`prompt_lookup_min` tokens in the request's own context. So: where the trees propose
nothing, or their draft is a prefix of the lookup's longer one, the lookup's draft is taken;
where the two disagree, the trees' (their estimate counts every occurrence, the lookup takes
the latest). Each draft carries the name of what made it ("suffix", or "suffix+ngram" for
an extended one), so the planner values it with that maker's measured acceptance
(`CopiedDraft.source`)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

from vllm_clasp.core.draft_source import CopiedDraft
from vllm_clasp.core.ngram_lookup import NgramLookup
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
        """The lookup's draft where it extends the trees' (or they have none), else the
        trees' (source "suffix"). An extended draft is valued as its own source
        ("suffix+ngram": seeded requests' lookups count as "ngram"); it keeps the trees'
        probabilities for the tokens they proposed and repeats the last one for the tokens
        the lookup added, so near-certain copies stay near-certain and the calibration learns
        what the added positions are worth. tokens: [n] the request's tokens so far (prompt +
        output)."""
        trees = self.trees.propose(req_id, tokens, max_draft)
        trees.source = SUFFIX
        n = len(trees.tokens)
        if n >= max_draft:
            return trees
        lookup = self.lookup.propose(req_id, tokens, max_draft)
        if len(lookup.tokens) <= n or not np.array_equal(lookup.tokens[:n], trees.tokens):
            return trees
        probs = None
        if n and trees.probs is not None:
            probs = np.concatenate([trees.probs[:n],
                                    np.full(len(lookup.tokens) - n, trees.probs[n - 1])])
        return CopiedDraft(lookup.tokens, probs, SUFFIX_THEN_NGRAM)

    def forget(self, req_ids: Iterable[Hashable]) -> None:
        self.trees.forget(req_ids)
