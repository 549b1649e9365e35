"""Prompt-lookup drafts (host-free): copy what followed the last n-gram's previous occurrence.

CLaSp can combine these free drafts with its own: a request whose context repeats its last
n tokens (summaries, retrieval answers, code edits) drafts the continuation of that earlier
occurrence at no model cost; the others draft with the layer-skipped model. A copied draft is
deterministic (q is a point mass), so rejection sampling stays exact.
"""

from __future__ import annotations

import numpy as np


def prompt_lookup(
    tokens: np.ndarray,  # [n] the request's tokens so far (prompt + output)
    max_ngram: int,
    min_ngram: int,
    max_draft: int,
) -> np.ndarray:  # [<= max_draft] the draft, empty when no n-gram repeats
    """Longest n-gram first (max_ngram down to min_ngram); the latest earlier occurrence wins."""
    length = len(tokens)
    if max_draft <= 0:
        return tokens[:0]
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n:]
        # Windows starting at 0 .. length-n-1: every occurrence except the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        matches = np.flatnonzero((windows == suffix).all(axis=1))
        if len(matches):
            start = matches[-1] + n
            return tokens[start:start + max_draft]
    return tokens[:0]
