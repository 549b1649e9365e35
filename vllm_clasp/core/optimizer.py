"""CLaSp layer-skip optimiser: the dynamic program of Chen et al. (ACL 2025), host-free.

Plain torch only: no vLLM and no transformers import. The host supplies decoder layers
through a ``run_layer`` callable; see ``tests.support.hf_layers`` for a transformers one.

Terms
-----
skip set
    A boolean mask ``S`` of shape ``[L]`` over the ``L`` decoder layers. ``S[l]`` is True when
    layer ``l`` is skipped as a whole (attention and MLP): the residual stream passes through
    unchanged. The draft model is the verify model with ``S`` applied.
draft pass
    A forward of one token through the layers not in ``S``. It attends to the context's KV
    cache, which the verify pass wrote.
verify pass
    The full model (no layer skipped) over the drafted tokens. It accepts a prefix of the
    drafts. For the last accepted token it yields the residual stream after every layer,
    ``h_0 .. h_L``: the *trajectory*.
re-optimisation
    Running this DP on a trajectory to choose the next skip set. Every skip set has exactly
    ``M`` layers; ``never_skip`` layers are always executed.

Recurrence
----------
``h_0`` is the embedding output. ``h_i = f_{i-1}(h_{i-1})`` is the stream after layer ``i-1``,
taken *before* the final norm (see below). ``g(i, j)`` is the best state after the first ``i``
layers with exactly ``j`` of them skipped::

    g(0, 0) = h_0
    g(i, 0) = h_i                                        (the verify trajectory, not recomputed)
    EXEC    = f_{i-1}(g(i-1, j))                         if (i-1, j) is reachable
    SKIP    = g(i-1, j-1)                                if layer i-1 is skippable and (i-1, j-1) is reachable
    g(i, j) = argmax over {EXEC, SKIP} of cos(., h_i)    (on a tie, SKIP wins, as in Algorithm 1)

``skipped_here[i-1, b, j]`` records whether SKIP won. Backtracking starts at ``(L, M)`` and
follows these parent pointers. The DP for ``j`` never reads larger ``j``. So one table built
for ``J = max_skip`` answers every ``M <= J``, and requests in one batch can ask for
different ``M``.

Final-layer subtlety: ``h_L`` must be the pre-norm residual stream (hidden + residual). Do not
use the normed output. In HF, ``output_hidden_states[-1]`` is after ``model.norm``, so it
compares unlike quantities with ``g(L, j)``.

Batching (the paper's "sequence-parallel" DP): for layer ``i-1`` there is ONE ``run_layer``
call. It covers every (request, j) pair that needs EXEC, with rows in request-major order.

Pruning: at step ``i`` only ``j`` in ``[lo, hi]`` is computed, where
``hi = min(J, #skippable among layers 0..i-1)`` and
``lo = max(1, min_skip - #skippable among layers i..L-1)``. Outside that range a state cannot
reach a wanted final count.

Example
-------
L = 3, J = 1, nothing in never_skip. Step i=1: g(1,1) = h_0 (layer 0 skipped; EXEC impossible
because (0,1) is unreachable). Step i=2: candidates f_1(g(1,1)) = f_1(h_0) and g(1,0) = h_1.
Suppose cos(f_1(h_0), h_2) = 0.9 and cos(h_1, h_2) = 0.8: EXEC wins, so g(2,1) = f_1(h_0).
Step i=3: f_2(g(2,1)) against g(2,0) = h_2, and so on. Backtracking from (3,1) yields
S = [True, False, False] when EXEC wins at steps 2 and 3.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "RunLayer",
    "SkipSearch",
    "search_skip_sets",
    "plan_layer_calls",
    "normalize_never_skip",
]

RunLayer = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""run_layer(layer_index, states [N, d], request_rows [N] long, on the host) -> [N, d]: decoder
layer ``layer_index`` applied to N candidate residual-stream states; row r belongs to request
``request_rows[r]`` (the caller attends it to that request's context)."""


@dataclass
class SkipSearch:
    """Result of one DP run for a batch of B requests."""

    skipped_here: torch.Tensor  # [L, B, J+1] bool: state (i+1, j) was reached by skipping layer i
    final_cosine: torch.Tensor  # [B, J+1] float32: cos(g(L, j), h_L); NaN where unreachable

    @property
    def num_layers(self) -> int:
        return self.skipped_here.shape[0]

    @property
    def max_skip(self) -> int:
        return self.skipped_here.shape[2] - 1

    def _num_skip(self, num_skip: torch.Tensor | int) -> torch.Tensor:
        B = self.final_cosine.shape[0]
        dev = self.final_cosine.device
        m = torch.as_tensor(num_skip, dtype=torch.long, device=dev)  # [] or [B]
        m = m.expand(B) if m.dim() == 0 else m
        if m.shape != (B,):
            raise ValueError(f"num_skip must be an int or a [{B}] tensor, got shape {tuple(m.shape)}")
        bad = (m < 0) | (m > self.max_skip)
        if not bad.any():
            bad = torch.isnan(self.final_cosine.gather(1, m[:, None])[:, 0])  # [B]
        if bad.any():
            raise ValueError(
                f"num_skip {m.tolist()} not reachable: this search covers 0..{self.max_skip} skips "
                f"(reachable counts: {self.reachable_counts()})")
        return m

    def reachable_counts(self) -> list[int]:
        """Skip counts M for which ``skip_mask`` can answer (same for every request)."""
        return (~torch.isnan(self.final_cosine[0])).nonzero()[:, 0].tolist()

    def cosine(self, num_skip: torch.Tensor | int) -> torch.Tensor:
        """[B] float32: the DP's own cos(g(L, M_b), h_L)."""
        m = self._num_skip(num_skip)  # [B]
        return self.final_cosine.gather(1, m[:, None])[:, 0]

    def skip_mask(self, num_skip: torch.Tensor | int) -> torch.Tensor:
        """[B, L] bool with exactly num_skip[b] True per row, by backtracking parent pointers."""
        j = self._num_skip(num_skip).clone()  # [B] skips still to place
        L, B = self.num_layers, j.shape[0]
        b_idx = torch.arange(B, device=j.device)  # [B]
        mask = torch.zeros(B, L, dtype=torch.bool, device=j.device)  # [B, L]
        for i in range(L, 0, -1):
            s = self.skipped_here[i - 1, b_idx, j]  # [B] bool
            mask[:, i - 1] = s
            j -= s.long()
        return mask


def normalize_never_skip(num_layers: int, never_skip=None, device=None) -> torch.Tensor:
    """[L] bool from None, a bool mask of length L, or a sequence of (possibly negative) layer indices."""
    L = num_layers
    if never_skip is None:
        return torch.zeros(L, dtype=torch.bool, device=device)
    t = torch.as_tensor(list(never_skip) if isinstance(never_skip, (set, frozenset)) else never_skip)
    if t.dtype == torch.bool:  # a mask (tensor, numpy array or list of bools)
        mask = t.to(device=device)
    else:  # layer indices
        idx = [int(x) for x in t.reshape(-1).tolist()]
        if any(not -L <= x < L for x in idx):
            raise ValueError(f"never_skip index out of range for {L} layers: {idx}")
        mask = torch.zeros(L, dtype=torch.bool, device=device)
        mask[[x % L for x in idx]] = True
    if mask.shape != (L,):
        raise ValueError(f"never_skip mask must have shape [{L}], got {tuple(mask.shape)}")
    return mask


def plan_layer_calls(num_layers: int, max_skip: int, never_skip=None,
                     min_skip: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Static schedule of the DP, the same for every request: for each layer i, the skip counts
    ``j`` whose state (i+1, j) may come from EXEC (run layer i on g(i, j)), and those that may
    come from SKIP (g(i, j-1)). ``len(plan[i][0]) * B`` is the row count of layer i's call (0: no
    call). It depends only on (L, J, min_skip, never_skip), so a host can size buffers from it.
    """
    L, J = num_layers, int(max_skip)
    skippable = (~normalize_never_skip(L, never_skip)).tolist()  # [L] python bools
    cum = [0]  # cum[i] = skippable layers among 0..i-1
    for s in skippable:
        cum.append(cum[-1] + int(s))
    S = cum[-1]
    lo_final = J if min_skip is None else int(min_skip)
    if not 0 <= lo_final <= J:
        raise ValueError(f"need 0 <= min_skip <= max_skip, got min_skip={min_skip}, max_skip={J}")
    if J > S:
        raise ValueError(f"max_skip={J} exceeds the {S} skippable layers (of {L}; never_skip="
                         f"{[i for i in range(L) if not skippable[i]]})")
    plan = []
    reach = [True] + [False] * J  # reach[j]: state (i-1, j) is computed
    for i in range(1, L + 1):
        hi = min(J, cum[i])
        lo = max(1, lo_final - (S - cum[i]))
        exec_js = [j for j in range(lo, hi + 1) if reach[j]]
        skip_js = [j for j in range(lo, hi + 1) if skippable[i - 1] and reach[j - 1]]
        plan.append((exec_js, skip_js))
        reach = [j == 0 or lo <= j <= hi for j in range(J + 1)]
    return plan


@functools.lru_cache(maxsize=64)
def _cached_schedule(L: int, J: int, never: tuple[bool, ...], min_skip: int | None, device):
    plan = plan_layer_calls(L, J, list(never), min_skip)
    idx = [(torch.tensor(e, dtype=torch.long).to(device),
            torch.tensor(k, dtype=torch.long).to(device)) for e, k in plan]  # ([E], [K]) long
    return plan, idx


def _schedule(L: int, J: int, never_skip, min_skip: int | None, device):
    """plan_layer_calls and its index tensors on `device`, made once per distinct schedule
    (moving them to the device per layer would be a host sync per layer on CUDA)."""
    never = tuple(normalize_never_skip(L, never_skip).tolist())
    return _cached_schedule(L, int(J), never, None if min_skip is None else int(min_skip),
                            torch.device(device))


def search_skip_sets(trajectory: torch.Tensor, run_layer: RunLayer, max_skip: int,
                     never_skip=None, min_skip: int | None = None,
                     num_layers: int | None = None,
                     groups: torch.Tensor | None = None) -> SkipSearch:
    """Run the CLaSp DP for B requests at once.

    trajectory: [L+1, B, d] full-model residual stream (pre final norm) of each request's token;
        trajectory[0] = embeddings, trajectory[i] = output of layer i-1. Or [1, B, d], the
        embeddings only: then layer i-1's call also runs the B trajectory rows (first, request
        order) and the DP computes h_i itself, in the same call as the candidates (one call
        per layer in all, instead of a separate pass for the trajectory).
    max_skip: J, the largest skip count any request will ask for.
    min_skip: the smallest skip count any request will ask for (default J); prunes only.
    never_skip: layers that always run (None, [L] bool, or indices).
    groups: [B] long group index per request (None: each request its own group). Requests of
        a group share every SKIP/EXEC decision, taken on the sum of their cosines, so the
        group gets one skip set per M: the set a batch draft pass that runs the group's rows
        together pays for once (its cost is the union of the rows' kept layers).

    Host syncs: none per layer. The static schedule's index tensors are made once per
    (L, J, min_skip, never_skip, device); ``request_rows`` is handed to ``run_layer`` on the
    host, so a caller that builds attention metadata from it needs no device-to-host copy.
    """
    L1, B, d = trajectory.shape
    online = L1 == 1
    if online:
        if num_layers is None:
            raise ValueError("num_layers is required when the trajectory holds h_0 only")
        L1 = num_layers + 1
    L, J = L1 - 1, int(max_skip)
    dev, dtype = trajectory.device, trajectory.dtype
    plan, idx = _schedule(L, J, never_skip, min_skip, dev)  # validates J, min_skip
    if groups is not None:
        groups = torch.as_tensor(groups, dtype=torch.long).to(dev)  # [B]
        if groups.shape != (B,):
            raise ValueError(f"groups must have shape [{B}], got {tuple(groups.shape)}")
        num_groups = int(groups.max()) + 1 if B else 0

    skipped_here = torch.zeros(L, B, J + 1, dtype=torch.bool, device=dev)  # [L, B, J+1]
    final_cos = torch.full((B, J + 1), float("nan"), dtype=torch.float32, device=dev)  # [B, J+1]
    final_cos[:, 0] = 1.0
    if J == 0:
        return SkipSearch(skipped_here, final_cos)

    cur = torch.zeros(B, J + 1, d, dtype=dtype, device=dev)  # [B, J+1, d] g(i-1, .)
    nxt = torch.zeros_like(cur)  # [B, J+1, d] g(i, .)
    cur[:, 0] = trajectory[0]
    neg_inf = torch.full((B, J + 1), float("-inf"), dtype=torch.float32, device=dev)  # [B, J+1]
    b_rows = torch.arange(B)  # [B] host: request rows handed to run_layer

    h = trajectory[0]  # [B, d] h_{i-1} when computing online
    for i in range(1, L + 1):
        layer = i - 1
        (exec_js, skip_js), (ej, sj) = plan[layer], idx[layer]  # ej [E], sj [K]
        E = len(exec_js)
        states = cur[:, ej].reshape(B * E, d)  # [B*E, d] request-major
        rows = b_rows.repeat_interleave(E)  # [B*E]
        if online:  # the trajectory rows ride along in the same call
            states, rows = torch.cat([h, states]), torch.cat([b_rows, rows])
        out = run_layer(layer, states, rows) if len(rows) else states  # [(B+)B*E, d]
        if online:
            h, out = out[:B].to(dtype), out[B:]
        else:
            h = trajectory[i]
        target = h.float()  # [B, d]
        cos_exec = neg_inf.clone()  # [B, J+1]
        cos_skip = neg_inf.clone()  # [B, J+1]
        nxt[:, 0] = h
        if exec_js:
            out = out.reshape(B, E, d).to(dtype)  # [B, E, d]
            nxt[:, ej] = out
            cos_exec[:, ej] = F.cosine_similarity(out.float(), target[:, None], dim=-1)  # [B, E]
        if skip_js:
            cand = cur[:, sj - 1]  # [B, K, d]
            cos_skip[:, sj] = F.cosine_similarity(cand.float(), target[:, None], dim=-1)  # [B, K]
            if groups is None:
                take = cos_skip[:, sj] >= cos_exec[:, sj]  # [B, K] bool: SKIP wins (ties too)
            else:  # one decision per group, on its summed cosines ([G, K], then [B, K])
                summed = torch.zeros(2, num_groups, len(skip_js), device=dev)
                summed[0].index_add_(0, groups, cos_skip[:, sj])
                summed[1].index_add_(0, groups, cos_exec[:, sj])
                take = (summed[0] >= summed[1])[groups]
            nxt[:, sj] = torch.where(take[..., None], cand, nxt[:, sj])
            skipped_here[layer][:, sj] = take
        cur, nxt = nxt, cur
        if i == L:
            best = torch.maximum(cos_exec, cos_skip)[:, 1:]  # [B, J]
            final_cos[:, 1:] = torch.where(torch.isinf(best), torch.nan, best)
    return SkipSearch(skipped_here, final_cos)
