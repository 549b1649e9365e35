"""The DP and the layer-skipped draft passes, on vLLM's paged KV cache.

`SkipForward.search` re-runs each due request's last accepted token through the full stack
(read-only on the KV cache: its layers are left out of the slot mapping) and lets
`core.optimizer.search_skip_sets` pick the skip set, all requests' candidates of a layer in one
call (paper §3.2). `SkipForward.draft` drafts up to K tokens per request with its own skip
set: per draft step each layer runs once on the rows that keep it, writing their K/V into the
lookahead slots the scheduler reserved (the next verification overwrites them); a row stops
when its draft's top-1 probability falls under the draft-exit threshold (paper §3.3).

Under tensor parallelism the chosen masks (`StepPlanner.choose_skip_sets`) and each draft
step's tokens are broadcast from rank 0, so every rank runs identical layer calls.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vllm_clasp.core.draft_sampling import sample_draft_tokens
from vllm_clasp.core.optimizer import SkipSearch, search_skip_sets
from vllm_clasp.core.options import ResolvedClaspOptions
from vllm_clasp.core.stats import ClaspStats
from vllm_clasp.vllm.adapter_rows import AdapterRows
from vllm_clasp.vllm.decoder_stack import DecoderStack
from vllm_clasp.vllm.paged_rows import PagedRows


class SkipForward:
    def __init__(self, stack: DecoderStack, vllm_config, options: ResolvedClaspOptions,
                 max_draft_tokens: int,
                 broadcast: Callable[[torch.Tensor], torch.Tensor]):
        self.stack = stack
        self.vllm_config = vllm_config
        self.options = options
        self.max_draft_tokens = max_draft_tokens  # the longest layer-skip draft (>= 1)
        self.broadcast = broadcast
        self.never_skip = torch.tensor(options.never_skip)  # [L] bool
        self.paged: PagedRows | None = None  # the runner's KV cache, bound at start-up
        self.adapters: AdapterRows | None = None  # the runner's LoRA mapping, bound too

    def bind(self, runner) -> None:
        """Build the paged-cache access for this runner's KV cache (ValueError if CLaSp
        cannot draft on it); called once the runner's KV cache exists."""
        self.paged = PagedRows(runner)
        self.adapters = AdapterRows(runner)

    @torch.inference_mode()  # as the draft runs: the compiled graphs guard on it
    def warm_compiled(self, hidden_size: int, dtype: torch.dtype) -> None:
        """Compile the shared layer function for one row and for several (its two shape
        classes) before the first request, on a dummy stream without attention metadata
        (vLLM's warm-up convention: attention returns at once and writes no K/V)."""
        compiled = self.stack.compiled
        for rows in (1, 2):
            positions = torch.zeros(rows, dtype=torch.long, device=self.paged.device)
            stream = torch.zeros(rows, hidden_size, dtype=dtype, device=self.paged.device)
            with self._forward_context(None, rows, slot_mapping={}):
                compiled.warm(positions, stream)

    # ------------------------------------------------------------------ DP
    def search(
        self,
        batch_rows: list[int],  # [B] input-batch rows due for a DP run
        token_ids: np.ndarray,  # [n, >= max(num_tokens)] the batch's tokens
        num_tokens: np.ndarray,  # [n] tokens so far per row
        groups: list[int] | None = None,  # [B] rows of one group share one skip set
    ) -> SkipSearch:
        """The DP over each row's last accepted token's trajectory, for every M in the
        configured range (rank-local: the caller chooses M and broadcasts the masks).
        No host sync per layer: the DP hands each layer's rows over on the host."""
        stack, paged, adapters = self.stack, self.paged, self.adapters
        last = num_tokens[batch_rows] - 2  # position of the last accepted (cached) token
        positions = torch.from_numpy(last.astype(np.int64))  # [B]
        row_index = torch.tensor(batch_rows, dtype=torch.long)  # [B]
        tokens = torch.from_numpy(token_ids[batch_rows, last].astype(np.int64))  # [B]

        def run_rows(layer: int, states: torch.Tensor, req_rows: torch.Tensor) -> torch.Tensor:
            rows = row_index[req_rows]  # [n] input-batch row of each candidate (host)
            metadata, positions_dev, _ = paged.build(
                rows, positions[req_rows], stack.attention_names[layer]
            )
            adapters.select(rows)
            with self._forward_context(metadata, len(req_rows), slot_mapping={}):
                return stack.run_layer(layer, positions_dev, states)

        def run(layer: int, states: torch.Tensor, req_rows: torch.Tensor) -> torch.Tensor:
            limit = adapters.max_rows  # LoRA's metadata holds at most this many rows
            if limit is None or len(req_rows) <= limit:
                return run_rows(layer, states, req_rows)
            return torch.cat([run_rows(layer, states[i:i + limit], req_rows[i:i + limit])
                              for i in range(0, len(req_rows), limit)])

        # Only h_0 is given: each layer's call also carries the B trajectory rows, so the
        # full-model trajectory and the candidates share one call per layer.
        adapters.select(row_index)
        embeddings = stack.embed(tokens.to(paged.device))  # [B, d]
        lo, hi = self.options.skip_range
        return search_skip_sets(
            embeddings.unsqueeze(0), run, max_skip=hi, min_skip=lo,
            never_skip=self.never_skip, num_layers=stack.num_layers,
            groups=None if groups is None else torch.tensor(groups, dtype=torch.long),
        )

    # ------------------------------------------------------------------ drafting
    def draft(
        self,
        batch_rows: torch.Tensor,  # [R] int64: rows of the runner's input batch
        last_tokens: torch.Tensor,  # [R] int64: each row's last token (no KV yet)
        num_tokens: torch.Tensor,  # [R] int64: tokens so far
        max_draft: torch.Tensor,  # [R] int64 (>= 1): most tokens each row may draft
        skip: torch.Tensor,  # [R, L] bool
        sampling,  # the runner's SamplingMetadata: temperature [n], generators by row
        stats: ClaspStats,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """(tokens [R, K'] int64, q [R, K', V'] float32 or None when all greedy, lengths [R]),
        K' = max_draft_tokens.

        Each draft step runs the active rows' kept layers on one token each; a row stops
        after its draft's top-1 probability falls under the threshold, or at max_draft."""
        R = len(batch_rows)
        temperature = None if sampling.all_greedy else sampling.temperature  # [n] device
        threshold = self.options.draft_exit_threshold
        current = last_tokens.to(self.paged.device)  # [R]
        out_tokens = torch.zeros(R, self.max_draft_tokens, dtype=torch.long)
        out_probs = None  # [R, K, V'] once a sampled row drafts
        lengths = [0] * R
        active = torch.arange(R)  # rows still drafting (CPU)
        keep = ~skip  # [R, L]
        for step in range(int(max_draft.max())):
            new_tokens, confidence, probs = self._draft_step(
                batch_rows[active], num_tokens[active] - 1 + step, keep[active],
                current[active.to(self.paged.device)], temperature, sampling.generators or {},
            )
            out_tokens[active, step] = new_tokens
            if temperature is not None:
                if out_probs is None:
                    out_probs = probs.new_zeros(R, self.max_draft_tokens, probs.shape[-1])
                out_probs[active.to(probs.device), step] = probs
            for row in active.tolist():
                lengths[row] = step + 1
            stats.record_pass(compiled=self.stack.runs_compiled)
            stats.record_exits(int((confidence < threshold).sum()))
            current[active.to(self.paged.device)] = new_tokens.to(self.paged.device)
            active = active[(confidence >= threshold) & (max_draft[active] > step + 1)]
            if len(active) == 0:
                break
        return out_tokens, out_probs, lengths

    def _draft_step(
        self,
        batch_rows: torch.Tensor,  # [A] int64: input-batch rows still drafting
        positions: torch.Tensor,  # [A] int64: the position each row drafts from
        keep: torch.Tensor,  # [A, L] bool: layers each row runs
        tokens: torch.Tensor,  # [A] int64 (device): each row's current token
        temperature: torch.Tensor | None,  # [n] float32 (device), None when all greedy
        generators: dict,  # input-batch row -> torch.Generator (seeded requests)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draft token per row: (tokens [A] int64, top-1 probs [A], q [A, V'])."""
        stack, adapters = self.stack, self.adapters
        metadata, slots, plan = self._layer_plan(batch_rows, positions, keep)
        adapters.select(batch_rows)
        stream = stack.embed(tokens)  # [A, d]
        with self._forward_context(metadata, len(batch_rows), slot_mapping=slots):
            for layer, (sub, positions_dev, rows) in plan.items():
                adapters.select(rows)
                if sub is None:
                    stream = stack.run_layer(layer, positions_dev, stream)
                else:
                    stream[sub] = stack.run_layer(layer, positions_dev, stream[sub])
        adapters.select(batch_rows)
        logits = stack.draft_logits(stack.final_norm(stream))  # [A, V']
        rows_temperature = (None if temperature is None
                            else temperature[batch_rows.to(temperature.device)])
        row_generators = {a: generators[row] for a, row in enumerate(batch_rows.tolist())
                          if row in generators}
        sample = sample_draft_tokens(logits, rows_temperature, row_generators)
        decided = torch.stack([sample.token_ids.double(), sample.top1_prob.double()]).cpu()
        decided = self.broadcast(decided)  # [2, A]: tokens and confidences, one sync
        return decided[0].long(), decided[1], sample.probs

    def _layer_plan(
        self,
        batch_rows: torch.Tensor,  # [A] int64: input-batch rows drafting this step
        positions: torch.Tensor,  # [A] int64: their query positions
        keep: torch.Tensor,  # [A, L] bool: layer runs for that row
    ):
        """Attention metadata and slots per layer, built once per distinct row subset.

        Returns (metadata by layer name, slots by layer name, {layer: (sub, positions, rows)})
        in layer order: sub [A'] (device) indexes the active rows that run the layer, None
        when all do; rows [A'] (CPU) are their input-batch rows.
        """
        stack, paged = self.stack, self.paged
        layers_by_subset: dict[bytes, list[int]] = {}
        for layer in range(stack.num_layers):
            column = keep[:, layer]
            if bool(column.any()):
                layers_by_subset.setdefault(column.numpy().tobytes(), []).append(layer)
        metadata, slots, plan = {}, {}, {}
        for layers in layers_by_subset.values():
            column = keep[:, layers[0]]
            sub = column.nonzero().squeeze(1)  # [A'] indices into the active rows
            names = [stack.all_attention_names[layer] for layer in layers]
            built, positions_dev, built_slots = paged.build(batch_rows[sub], positions[sub], names)
            metadata.update(built)
            slots.update(built_slots)
            whole = len(sub) == len(batch_rows)
            sub_dev = None if whole else sub.to(paged.device)
            rows = batch_rows[sub]  # [A'] their input-batch rows (CPU)
            for layer in layers:
                plan[layer] = (sub_dev, positions_dev, rows)
        return metadata, slots, dict(sorted(plan.items()))

    def _forward_context(self, metadata, num_tokens: int, slot_mapping):
        from vllm.forward_context import set_forward_context

        return set_forward_context(
            metadata, self.vllm_config, num_tokens=num_tokens, slot_mapping=slot_mapping
        )
