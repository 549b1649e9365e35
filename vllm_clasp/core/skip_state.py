"""Per-request skip sets and their re-optimisation schedule (host-free).

Each running request owns one skip set, chosen by the DP from its own context. A request is
*due* for a DP run when it has none yet (new, or resumed after preemption) or when LOI
verification steps have passed since its last one. State is dropped when the request finishes
or is preempted, so a resumed request is optimised afresh, never from a stale set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from vllm_clasp.core.skip_count import SkipCountChoice


@dataclass
class RequestSkipSet:
    skip_mask: torch.Tensor  # [num_layers] bool, True = layer skipped by the draft
    steps_since_search: int = 0
    choice: SkipCountChoice | None = None  # how M was chosen ("auto"), None: a fixed M


class SkipSetTracker:
    def __init__(self, loi: int):
        if loi < 1:
            raise ValueError(f"loi must be >= 1, got {loi}")
        self.loi = loi
        self._states: dict[str, RequestSkipSet] = {}
        self.num_changes = 0
        """Re-optimisations that changed a request's skip set."""
        self.num_layers_changed = 0
        """Sum over re-optimisations of |old set XOR new set|."""

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._states

    def is_due(self, req_id: str) -> bool:
        state = self._states.get(req_id)
        return state is None or state.steps_since_search >= self.loi

    def skip_mask(self, req_id: str) -> torch.Tensor:  # [num_layers] bool
        return self._states[req_id].skip_mask

    def choice(self, req_id: str) -> SkipCountChoice | None:
        state = self._states.get(req_id)
        return None if state is None else state.choice

    def update(self, req_id: str, skip_mask: torch.Tensor,
               choice: SkipCountChoice | None = None) -> int | None:
        """Store a new skip set; returns how many layers changed (None for a first set)."""
        old = self._states.get(req_id)
        self._states[req_id] = RequestSkipSet(skip_mask.clone(), choice=choice)
        if old is None:
            return None
        changed = int((old.skip_mask != skip_mask).sum())
        self.num_layers_changed += changed
        self.num_changes += changed > 0
        return changed

    def record_verification(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            state = self._states.get(req_id)
            if state is not None:
                state.steps_since_search += 1

    def drop(self, req_ids: Iterable[str] | None) -> None:
        for req_id in req_ids or ():
            self._states.pop(req_id, None)
