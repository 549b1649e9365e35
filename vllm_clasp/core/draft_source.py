"""Copy draft sources: one interface (`DraftSource`) and the registry of sources (host-free).

A copy source proposes drafts from text already seen: free to make (no model pass) and
deterministic, so its q is a point mass and rejection sampling stays exact. Every
tensor-parallel rank sees the same tokens in the same order, so every rank copies the same
drafts and nothing is broadcast.

Adding a source: one module with a class that satisfies `DraftSource` and has
`from_options(ResolvedClaspOptions)`, plus one row in `SOURCES` (its name becomes a value of
`clasp_copy_source`; docs/configuration.md lists the values).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class CopiedDraft:
    tokens: np.ndarray  # [<= max_draft] int64
    probs: np.ndarray | None = None  # [len(tokens)] the source's estimate per token, if any
    source: str | None = None  # the source that made it, where a source combines others


@runtime_checkable
class DraftSource(Protocol):
    name: str

    def update(self, req_id: Hashable, tokens: np.ndarray, num_prompt_tokens: int) -> None:
        """The request's tokens so far ([n] prompt + output), every step it decodes."""

    def propose(self, req_id: Hashable, tokens: np.ndarray, max_draft: int) -> CopiedDraft:
        """At most `max_draft` tokens to follow `tokens` ([n] prompt + output)."""

    def forget(self, req_ids: Iterable[Hashable]) -> None:
        """Finished or preempted requests (a resumed request starts anew)."""


@dataclass(frozen=True)
class SourceEntry:
    factory: str  # "module:Class"; the class has from_options(ResolvedClaspOptions)
    library: str | None = None  # a module it needs installed (None: nothing)


SOURCES: dict[str, SourceEntry] = {
    # SuffixDecoding (arXiv 2411.04975) through arctic-inference, as vLLM's `suffix` method.
    "suffix": SourceEntry("vllm_clasp.core.suffix_trees:SuffixTrees", "arctic_inference"),
    # Prompt lookup in the request's own context (vLLM's `ngram` method's idea).
    "ngram": SourceEntry("vllm_clasp.core.ngram_lookup:NgramLookup"),
    # The suffix trees, extended by n-gram lookup where it agrees and reaches further.
    "suffix+ngram": SourceEntry("vllm_clasp.core.suffix_then_ngram:SuffixThenNgram",
                                "arctic_inference"),
}
"""Copy sources by `clasp_copy_source` value, in the order "auto" prefers them."""


def available(name: str) -> bool:
    """Whether source `name`'s library is installed."""
    library = SOURCES[name].library
    return library is None or importlib.util.find_spec(library) is not None


def make_source(name: str, options) -> DraftSource:
    """Source `name` built for `options` (a ResolvedClaspOptions)."""
    module, cls = SOURCES[name].factory.split(":")
    return getattr(importlib.import_module(module), cls).from_options(options)
