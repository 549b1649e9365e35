"""Whether a seeded request's own-context copies pay, decided from its own tokens (host-free).

A seeded request's sampled tokens depend on what is drafted for it, so what it drafts must
depend on nothing but its own tokens (not on measured time, other requests or preemption),
or the seed would not pin its output. Copies (n-gram lookup in its own context) meet that;
whether they pay does not, by default: a step that verifies a copy pays vLLM's speculative
path once (on the reference CPU at batch 1 about 15 % of a step), and at temperature 1 a
copy is accepted less often than in greedy decoding.

`SeededCopyRecord` keeps, per request, how often n-gram lookup in the request's own context
predicted the next output token that was actually produced (replayed over its output, one
trial per output position where the lookup proposes a draft). A seeded request copies only
while fewer than `MIN_TRIALS` trials exist or at least `MIN_HIT_RATE` of them hit: fixed at
configuration, a function of the request's tokens alone, so it is the same alone, in any
batch, after preemption (the record is replayed from the tokens) and across restarts.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import numpy as np

from vllm_clasp.core.prompt_lookup import prompt_lookup

MIN_TRIALS = 4
MIN_HIT_RATE = 0.25
"""Break-even near 0.13 on the reference CPU at batch 1 (a copy step's extra cost over the
expected accepted tokens of a draft whose first token hits at this rate), with a margin."""


class SeededCopyRecord:
    def __init__(self, max_ngram: int, min_ngram: int):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._records: dict[Hashable, list[int]] = {}  # req -> [checked up to, hits, trials]

    def update(self, req_id: Hashable, tokens: np.ndarray, num_prompt_tokens: int) -> None:
        """Replay the lookup over the output tokens not yet checked. tokens: [n] prompt +
        output so far."""
        record = self._records.setdefault(req_id, [num_prompt_tokens, 0, 0])
        for position in range(max(record[0], num_prompt_tokens, 1), len(tokens)):
            draft = prompt_lookup(tokens[:position], self.max_ngram, self.min_ngram, 1)
            if len(draft):
                record[2] += 1
                record[1] += int(draft[0] == tokens[position])
        record[0] = max(record[0], len(tokens))

    def pays(self, req_id: Hashable) -> bool:
        _, hits, trials = self._records.get(req_id, (0, 0, 0))
        return trials < MIN_TRIALS or hits >= MIN_HIT_RATE * trials

    def forget(self, req_ids: Iterable[Hashable]) -> None:
        for req_id in req_ids:
            self._records.pop(req_id, None)
