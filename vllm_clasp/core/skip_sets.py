"""The layer-skip lifecycle: which skip set each model draft uses, when the DP re-chooses it,
at which M, and what the DP runs chose (host-free).

A request that drafts with the layer-skipped model alone in its step drafts with its own set
(the paper's DP, per request, re-run every LOI of its drafting steps: `SkipSetTracker`). When
several unseeded requests draft together and `share_skip_sets` is on, they draft with one
shared set: a batch draft pass reads each kept layer once for all rows that keep it, so it
costs the union of the rows' kept layers, and per-request sets would keep almost every layer
between them. The shared set comes from one DP over the group's summed fit
(`search_skip_sets(groups=...)`), re-run every LOI steps the group drafted, at one M chosen
on the group's mean fit. Seeded requests keep their own sets (their drafts must depend on
their own tokens only). M per set: `SkipCountPolicy`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import torch

from vllm_clasp.core.optimizer import SkipSearch
from vllm_clasp.core.options import ResolvedClaspOptions
from vllm_clasp.core.skip_count import SkipCountChoice, SkipCountPolicy
from vllm_clasp.core.skip_state import SkipSetTracker
from vllm_clasp.core.stats import ClaspStats

SHARED = "shared"
"""The key of the shared skip set in `SkipSets.shared`."""
DP_LOG_SIZE = 4096


class SkipSets:
    def __init__(self, options: ResolvedClaspOptions, stats: ClaspStats,
                 layer_costs: Sequence[float] | None = None, head_cost: float = 0.0):
        self.options = options
        self.stats = stats
        self.tracker = SkipSetTracker(options.loi)  # request id -> its own set
        self.shared = SkipSetTracker(options.loi)  # SHARED -> the set drafting groups share
        self.skip_counts = SkipCountPolicy(options.num_skip, options.auto_skip,
                                           options.skip_range, layer_costs, head_cost)
        self.dp_log: deque[dict] = deque(maxlen=DP_LOG_SIZE)
        """The latest DP runs (M chosen, fit per M, layers skipped): `vllm-clasp layers`."""

    def __len__(self) -> int:
        """Requests holding their own set."""
        return len(self.tracker)

    def forget(self, req_ids: Iterable[str]) -> None:
        self.tracker.drop(req_ids)

    def due(self, req_ids: Sequence[str], model_rows: list[int], seeded: frozenset[int]
            ) -> tuple[list[int], frozenset[int]]:
        """Count a drafting step for every set the model rows use; returns (the rows to
        search before drafting, ascending; the rows that draft with the shared set)."""
        shared = frozenset()
        if self.options.share_skip_sets:
            unseeded = frozenset(i for i in model_rows if i not in seeded)
            shared = unseeded if len(unseeded) >= 2 else frozenset()
        own = [i for i in model_rows if i not in shared]
        self.tracker.record_verification(req_ids[i] for i in own)
        search = [i for i in own if self.tracker.is_due(req_ids[i])]
        if shared:
            self.shared.record_verification([SHARED])
            if self.shared.is_due(SHARED):
                search = sorted(search + sorted(shared))
        return search, shared

    @staticmethod
    def groups(search_rows: list[int], shared_rows: frozenset[int]) -> list[int] | None:
        """[len(search_rows)] the DP group of each searched row: 0 for the shared set's rows,
        one of its own for every other row; None when nobody shares."""
        if not shared_rows:
            return None
        own = iter(range(1, len(search_rows) + 1))
        return [0 if i in shared_rows else next(own) for i in search_rows]

    def choose(self, search_rows: list[int], shared_rows: frozenset[int],
               seeded: frozenset[int], search: SkipSearch, ratio: float, length: float,
               cost) -> tuple[torch.Tensor, list[SkipCountChoice]]:
        """(masks [len(search_rows), L] bool, the M choice per row): each searched row's
        set at the M chosen from the DP's table; the shared rows' one M on their mean fit."""
        cosines = search.final_cosine.cpu()  # [B, J+1]
        own = [k for k, i in enumerate(search_rows) if i not in shared_rows]
        together = [k for k, i in enumerate(search_rows) if i in shared_rows]
        table = cosines[own]
        if together:
            table = torch.cat([table, cosines[together].mean(0, keepdim=True)])
        chosen = self.skip_counts.choose(
            table, [search_rows[k] in seeded for k in own] + [False] * bool(together),
            ratio, length, cost)
        choices: list = [None] * len(search_rows)
        for k, choice in zip(own, chosen):
            choices[k] = choice
        for k in together:
            choices[k] = chosen[-1]
        masks = search.skip_mask(torch.tensor([c.num_skip for c in choices],
                                              device=search.final_cosine.device))
        return masks.cpu(), choices

    def record(self, req_ids: Sequence[str], search_rows: list[int],
               shared_rows: frozenset[int], masks: torch.Tensor,
               choices: Sequence[SkipCountChoice | None], seconds: float) -> None:
        """Store what the DP chose (masks [len(search_rows), L] bool; the shared rows all
        hold the shared set, stored once)."""
        changed, sets, shared_done = [], [], False
        for i, mask, choice in zip(search_rows, masks, choices):
            if i in shared_rows:
                if shared_done:
                    continue
                shared_done = True
                changed.append(self.shared.update(SHARED, mask, choice))
            else:
                changed.append(self.tracker.update(req_ids[i], mask, choice))
            sets.append(mask)
            self.dp_log.append({"m": int(mask.sum()), "layers": mask.nonzero()[:, 0].tolist(),
                                "cosines": list(choice.cosines) if choice else [],
                                "requests": len(shared_rows) if i in shared_rows else 1})
        self.stats.record_search(torch.stack(sets), changed, seconds)

    def masks(self, req_ids: Sequence[str], model_rows: list[int],
              shared_rows: frozenset[int]) -> torch.Tensor:
        """[len(model_rows), L] bool: the set each model row drafts with."""
        return torch.stack([self.shared.skip_mask(SHARED) if i in shared_rows
                            else self.tracker.skip_mask(req_ids[i]) for i in model_rows])

    def drafted(self, req_ids: Sequence[str], model_rows: list[int],
                shared_rows: frozenset[int]) -> dict[int, SkipCountChoice | None]:
        """The model rows drafted: row -> how the M of its set was chosen."""
        choices = {i: self.shared.choice(SHARED) if i in shared_rows
                   else self.tracker.choice(req_ids[i]) for i in model_rows}
        for choice in choices.values():
            self.skip_counts.drafted_with(choice)
        return choices

    def observe(self, choice: SkipCountChoice | None, drafted: int, accepted: int) -> float:
        """A verified model draft drafted with a set whose M was chosen by `choice`; returns
        the accepted tokens predicted for it (NaN without a prediction)."""
        return self.skip_counts.observe(choice, drafted, accepted)
