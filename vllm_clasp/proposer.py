"""`ClaspProposer`: CLaSp drafting inside vLLM's V1 model runner.

After each verification step the runner (patched in `patches.py`) calls `propose_for_runner`:

1. forget requests that finished or were preempted (also done by the patched
   `execute_model` on steps that reach no drafting, see `forget`);
2. run the DP for requests that are due (new, or LOI verification steps since their last run):
   the last accepted token is re-run through the full stack (read-only on the KV cache) to get
   its trajectory h_0..h_L, and candidates of all due requests go through each layer in one
   call (`optimizer.search_skip_sets`);
3. draft up to K tokens per request with its own skip set; in a batch each layer runs once per
   draft step on the rows that keep it; a row stops when its draft's top-1 probability falls
   under the threshold. Sampled requests hand their draft probabilities to the runner, whose
   rejection sampler then keeps the output distribution exact.

Under tensor parallelism every rank runs this same code on the same inputs; skip masks and the
per-step draft tokens are broadcast from rank 0, so all ranks run identical layer calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from vllm_clasp.decoder_stack import DecoderStack
from vllm_clasp.draft_budget import AcceptanceRates, DraftBudget, expected_accepted
from vllm_clasp.draft_sampling import sample_draft_tokens
from vllm_clasp.optimizer import search_skip_sets
from vllm_clasp.paged_rows import PagedRows
from vllm_clasp.prompt_lookup import prompt_lookup
from vllm_clasp.skip_state import SkipSetTracker
from vllm_clasp.stats import ClaspStats

logger = logging.getLogger("vllm.clasp.proposer")  # covered by vLLM's logging setup

LOOKUP, MODEL = "lookup", "model"  # draft sources, each with its own acceptance rates


@dataclass
class _Step:
    """What a step decided, credited when the next step sees its verification."""

    batch_size: int
    started: float  # perf_counter at the start of the proposal
    model_seconds: float  # DP + drafting time inside the step
    verified_tokens: int  # tokens the verification step checks: one per row + drafts
    drafted: dict  # req_id -> (source, draft tokens verified)


class ClaspProposer:
    _seeded: frozenset[int] | set[int] = frozenset()  # this step's input-batch rows with a seed

    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.vllm_config = vllm_config
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.options = spec.clasp_options()
        self.max_model_len = vllm_config.model_config.max_model_len
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.runner = None
        self.stack: DecoderStack | None = None
        self.rows: PagedRows | None = None
        self.tracker: SkipSetTracker | None = None
        self.stats = ClaspStats()

    # The custom_class factory vLLM uses to build us checks for a callable `propose`.
    def propose(self, *args, **kwargs):
        raise RuntimeError("ClaspProposer is driven by propose_for_runner (see patches.py)")

    def bind_runner(self, runner) -> None:
        self.runner = runner

    def load_model(self, model) -> None:
        self.stack = DecoderStack(model)
        self.resolved = self.options.resolve(self.stack.num_layers, self.vocab_size)
        draft_vocab = self.vocab_size
        if self.resolved.draft_vocab_size < self.vocab_size and self.stack.use_draft_vocab(
            self.resolved.draft_vocab_size
        ):
            draft_vocab = self.resolved.draft_vocab_size
        self.never_skip = torch.tensor(self.resolved.never_skip)  # [L] bool
        self.tracker = SkipSetTracker(self.resolved.loi)
        # Measured decisions (per batch-size bucket, from step-time fits, the measured cost of
        # model drafts and each request's acceptance): which requests prompt lookup found
        # nothing for get model drafts, and how many draft tokens each step verifies.
        self.budget = DraftBudget(enabled=self.resolved.adaptive, loi=self.resolved.loi)
        self.acceptance = AcceptanceRates()
        self._last_step: _Step | None = None
        logger.info(
            "CLaSp: drafting with the target's own %d layers, skipping %d per request "
            "(never skipped: %s), K=%d, LOI=%d, draft-exit threshold %.2f, draft vocab %s",
            self.stack.num_layers, self.resolved.num_skip,
            [i for i, never in enumerate(self.resolved.never_skip) if never],
            self.num_speculative_tokens, self.resolved.loi, self.resolved.draft_exit_threshold,
            draft_vocab,
        )

    def forget(self, scheduler_output) -> None:
        """Drop the state of requests that finished or were preempted. Called at the start
        of every step (patched `execute_model`), also the step that only reports the last
        requests finished and drafts nothing, so an idle engine holds no CLaSp state."""
        if self.tracker is None:
            return
        for gone in (scheduler_output.finished_req_ids, scheduler_output.preempted_req_ids):
            self.tracker.drop(gone)
            self.acceptance.drop(gone)
        self.stats.tracked_requests = len(self.tracker)

    # ------------------------------------------------------------------ the runner's entry
    @torch.inference_mode()
    def propose_for_runner(self, scheduler_output, sampled_token_ids: list[list[int]]):
        runner = self.runner
        if self.rows is None:
            self.rows = PagedRows(runner)
        batch = runner.input_batch
        req_ids = list(batch.req_ids)
        self.forget(scheduler_output)
        if len(self.tracker) > len(runner.requests):
            self.tracker.retain(runner.requests.keys())
        if len(self.acceptance) > len(runner.requests):
            self.acceptance.retain(runner.requests.keys())
        self.stats.tracked_requests = len(self.tracker)

        drafts: list[list[int]] = [[] for _ in req_ids]
        num_tokens = batch.num_tokens_no_spec[: len(req_ids)]  # numpy [n]
        budget = np.minimum(self.num_speculative_tokens, self.max_model_len - num_tokens)
        rows = [
            i for i, sampled in enumerate(sampled_token_ids[: len(req_ids)])
            if sampled and budget[i] > 0
        ]
        self._observe_last_step(scheduler_output, sampled_token_ids, req_ids, rows)
        if not rows:
            return drafts
        started_step = time.perf_counter()
        step_rows, num_rows = rows, len(rows)
        cost = self._step_cost(num_rows)
        # A seeded request's sampled tokens depend on what was drafted for it (the rejection
        # sampler draws from its generator per draft token), so its drafting must not follow
        # measured timings: seeded rows take the fixed policy (lookup drafts where the context
        # repeats, model drafts otherwise, every draft token verified) whatever the budget says.
        self._seeded = set(batch.sampling_metadata.generators or ())  # input-batch rows

        # Prompt-lookup drafts cost nothing to make: candidates wherever the context repeats,
        # verified as far as their measured acceptance pays for the verification.
        token_ids = batch.token_ids_cpu
        copied: dict[int, np.ndarray] = {}
        if self.resolved.prompt_lookup_max:
            for i in rows:
                draft = prompt_lookup(
                    token_ids[i, : num_tokens[i]], self.resolved.prompt_lookup_max,
                    self.resolved.prompt_lookup_min, int(budget[i]),
                )
                if len(draft):
                    copied[i] = draft
            copied = self._truncate(cost, copied, dict.fromkeys(copied, LOOKUP))
        rows = [i for i in rows if i not in copied]

        # Model drafts for the rest cost a fraction of a step each before any verification:
        # only for the requests whose expected accepted tokens are worth that.
        if rows:
            rows = self._model_rows(cost, rows, copied, num_rows)
        # LOI counts the verification steps a request drafted with its skip set; steps without
        # model drafts would otherwise make every occasional model draft pay for a DP run.
        self.tracker.record_verification(req_ids[i] for i in rows)

        probs, made, model_seconds = None, {}, 0.0
        if rows:
            due = [i for i in rows if self.tracker.is_due(req_ids[i])]
            if due:
                started = time.perf_counter()
                masks = self._search(due, num_tokens)  # [B, L] bool
                changed = [self.tracker.update(req_ids[i], mask) for i, mask in zip(due, masks)]
                seconds = time.perf_counter() - started
                self.stats.record_search(masks, changed, seconds)
                self.budget.observe_search(len(due), seconds)
                model_seconds += seconds

            started = time.perf_counter()
            skip = torch.stack([self.tracker.skip_mask(req_ids[i]) for i in rows])  # [R, L]
            tokens, probs, lengths = self._draft(
                torch.tensor(rows, dtype=torch.long),
                torch.from_numpy(num_tokens[rows].astype(np.int64)),
                torch.from_numpy(budget[rows].astype(np.int64)), skip,
            )
            seconds = time.perf_counter() - started
            self.stats.record_drafts(skip, lengths, seconds)
            self.budget.observe_model(num_rows, lengths, seconds)
            model_seconds += seconds
            # The drafting time is spent; verifying the tokens is still to decide, jointly
            # with the copied drafts, which share the verification step.
            made = {i: tokens[r, : lengths[r]].numpy() for r, i in enumerate(rows)}
            kept = self._truncate(cost, {**copied, **made},
                                  {**dict.fromkeys(copied, LOOKUP), **dict.fromkeys(made, MODEL)})
            copied = {i: kept[i] for i in copied if i in kept}
            made = {i: kept[i] for i in made if i in kept}
        for i, draft in [*copied.items(), *made.items()]:
            drafts[i] = draft.tolist()
        self.stats.record_prompt_lookup(len(copied), sum(len(d) for d in copied.values()))

        undrafted = sum(1 for i in step_rows if not drafts[i])
        if undrafted:
            self.stats.record_undrafted(undrafted, whole_step=undrafted == num_rows)
        self._last_step = _Step(
            batch_size=num_rows, started=started_step,
            model_seconds=model_seconds,
            verified_tokens=num_rows + sum(len(drafts[i]) for i in step_rows),
            drafted={req_ids[i]: (LOOKUP if i in copied else MODEL, len(drafts[i]))
                     for i in step_rows if drafts[i]},
        )
        if not batch.sampling_metadata.all_greedy:
            self._hand_over_draft_probs(req_ids, rows, probs, copied)
        self.stats.maybe_log(len(self.tracker))
        return drafts

    def _step_cost(self, batch_size: int) -> tuple[float, float] | None:
        """This step's verification cost model, rank 0's on every rank; None: verify every
        candidate token (no fit yet, an exploration step, or adaptivity off)."""
        cost = self.budget.start_step(batch_size)
        if self.tp_size == 1:
            return cost
        shared = self._broadcast(torch.tensor(
            [0.0, 0.0, 0.0] if cost is None else [1.0, *cost], dtype=torch.float64))
        return (float(shared[1]), float(shared[2])) if shared[0] else None

    def _truncate(self, cost, candidates: dict[int, np.ndarray],
                  sources: dict[int, str]) -> dict[int, np.ndarray]:
        """The prefix of each row's draft worth verifying; rows left with none are dropped."""
        order = [i for i, draft in candidates.items() if len(draft)]
        fixed = {i: candidates[i] for i in order if i in self._seeded}
        order = [i for i in order if i not in self._seeded]
        if cost is None or not order:
            return {i: candidates[i] for i in candidates if i in fixed or i in order}
        req_ids = self.runner.input_batch.req_ids
        lengths = self.budget.lengths(
            cost, [len(candidates[i]) for i in order],
            [self.acceptance.rate(req_ids[i], sources[i]) for i in order],
        )
        lengths = self._broadcast(torch.tensor(lengths, dtype=torch.long)).tolist()
        self.stats.record_unverified(sum(len(candidates[i]) for i in order) - sum(lengths))
        kept = {i: candidates[i][:k] for i, k in zip(order, lengths) if k > 0}
        return {i: fixed[i] if i in fixed else kept[i] for i in candidates
                if i in fixed or i in kept}  # in the candidates' order

    def _model_rows(self, cost, rows: list[int], copied: dict[int, np.ndarray],
                    num_rows: int) -> list[int]:
        """The rows (of `rows`, those without a copied draft) worth a model draft, rank 0's
        choice on every rank; seeded rows always (see `propose_for_runner`)."""
        seeded = [i for i in rows if i in self._seeded]
        rows = [i for i in rows if i not in self._seeded]
        if not rows or not self.budget.enabled:
            return sorted(seeded + rows)
        req_ids = self.runner.input_batch.req_ids
        length = self.budget.model_draft_length
        gains = [expected_accepted(self.acceptance.rate(req_ids[i], MODEL), length)
                 for i in rows]
        expected = seconds = 1.0
        if cost is not None:
            fixed, per_token = cost
            expected = num_rows + sum(
                expected_accepted(self.acceptance.rate(req_ids[i], LOOKUP), len(draft))
                for i, draft in copied.items())
            seconds = fixed + per_token * (num_rows + sum(len(d) for d in copied.values()))
        chosen = self.budget.model_rows(cost, gains, expected, seconds)
        chosen = self._broadcast(torch.tensor(chosen)).tolist()
        return sorted(seeded + [i for i, keep in zip(rows, chosen) if keep])

    def _observe_last_step(self, scheduler_output, sampled_token_ids, req_ids, rows) -> None:
        """Credit what this verification produced to the previous step's decisions."""
        last, self._last_step = self._last_step, None
        if last is None:
            return
        index = {req_id: i for i, req_id in enumerate(req_ids)}
        for req_id, (source, drafted) in last.drafted.items():
            i = index.get(req_id)
            if i is not None and i < len(sampled_token_ids) and sampled_token_ids[i]:
                accepted = len(sampled_token_ids[i]) - 1  # the last one is the bonus/correction
                self.acceptance.observe(req_id, source, drafted, accepted)
        if scheduler_output.scheduled_new_reqs or len(rows) != last.batch_size:
            return  # a prefill in the step, or a changed batch, would distort its time
        seconds = time.perf_counter() - last.started
        self.budget.observe(last.batch_size, last.verified_tokens,
                            max(seconds - last.model_seconds, 0.0))

    def _hand_over_draft_probs(self, req_ids, rows, probs, copied) -> None:
        """The runner's rejection sampler reads q from `_draft_probs` [n, K, vocab]."""
        device = self.rows.device
        full = torch.zeros(
            len(req_ids), self.num_speculative_tokens, self.vocab_size,
            dtype=torch.float32, device=device,
        )
        if probs is not None:
            full[torch.tensor(rows, device=device), :, : probs.shape[-1]] = probs
        for i, draft in copied.items():  # a copied draft is deterministic: q is a point mass
            full[i, torch.arange(len(draft), device=device),
                 torch.from_numpy(draft.astype(np.int64)).to(device)] = 1.0
        self.runner._draft_probs = full
        self.runner._draft_prob_req_ids = list(req_ids)

    # ------------------------------------------------------------------ DP
    def _search(self, batch_rows: list[int], num_tokens: np.ndarray) -> torch.Tensor:
        """[B, L] skip masks for `batch_rows` from their last accepted token's trajectory."""
        stack, rows = self.stack, self.rows
        token_ids = self.runner.input_batch.token_ids_cpu
        last = num_tokens[batch_rows] - 2  # position of the last accepted (cached) token
        positions = torch.from_numpy(last.astype(np.int64))  # [B]
        row_index = torch.tensor(batch_rows, dtype=torch.long)  # [B]
        tokens = torch.from_numpy(token_ids[batch_rows, last].astype(np.int64))  # [B]

        def run(layer: int, states: torch.Tensor, req_rows: torch.Tensor) -> torch.Tensor:
            req_rows_cpu = req_rows.cpu()
            metadata, positions_dev, _ = rows.build(
                row_index[req_rows_cpu], positions[req_rows_cpu], stack.attention_names[layer]
            )
            with self._forward_context(metadata, len(req_rows_cpu), slot_mapping={}):
                return stack.run_layer(layer, positions_dev, states)

        # Only h_0 is given: each layer's call also carries the B trajectory rows, so the
        # full-model trajectory and the candidates share one call per layer.
        embeddings = stack.embed(tokens.to(rows.device))  # [B, d]
        search = search_skip_sets(
            embeddings.unsqueeze(0), run, max_skip=self.resolved.num_skip,
            never_skip=self.never_skip, num_layers=stack.num_layers,
        )
        masks = search.skip_mask(self.resolved.num_skip).cpu()  # [B, L]
        return self._broadcast(masks)

    # ------------------------------------------------------------------ drafting
    def _draft(
        self,
        batch_rows: torch.Tensor,  # [R] int64: rows of the runner's input batch
        num_tokens: torch.Tensor,  # [R] int64: tokens so far (the last one has no KV yet)
        budget: torch.Tensor,  # [R] int64: most tokens each row may draft
        skip: torch.Tensor,  # [R, L] bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        stack, rows = self.stack, self.rows
        R, K = len(batch_rows), int(budget.max())
        sampling = self.runner.input_batch.sampling_metadata
        temperature = None if sampling.all_greedy else sampling.temperature  # [n] device
        generators = sampling.generators or {}
        threshold = self.resolved.draft_exit_threshold

        token_ids = self.runner.input_batch.token_ids_cpu
        last_tokens = token_ids[batch_rows.numpy(), num_tokens.numpy() - 1].astype(np.int64)
        current = torch.from_numpy(last_tokens).to(rows.device)  # [R]
        out_tokens = torch.zeros(R, self.num_speculative_tokens, dtype=torch.long)
        out_probs = None
        lengths = [0] * R
        active = torch.arange(R)  # rows still drafting (CPU)
        keep = ~skip  # [R, L]

        for step in range(K):
            positions = num_tokens[active] - 1 + step  # [A]
            active_dev = active.to(rows.device)
            metadata, slots, plan = self._layer_plan(batch_rows[active], positions, keep[active])
            stream = stack.embed(current[active_dev])  # [A, d]
            with self._forward_context(metadata, len(active), slot_mapping=slots):
                for layer, (sub, positions_dev) in plan.items():
                    if sub is None:
                        stream = stack.run_layer(layer, positions_dev, stream)
                    else:
                        stream[sub] = stack.run_layer(layer, positions_dev, stream[sub])
            logits = stack.draft_logits(stack.final_norm(stream))  # [A, V']
            rows_temp = (
                None if temperature is None
                else temperature[batch_rows[active].to(temperature.device)]
            )
            row_generators = {
                a: generators[int(batch_rows[row])]
                for a, row in enumerate(active.tolist()) if int(batch_rows[row]) in generators
            }
            sample = sample_draft_tokens(logits, rows_temp, row_generators)
            decided = torch.stack([sample.token_ids.double(), sample.top1_prob.double()]).cpu()  # 1 sync
            decided = self._broadcast(decided)
            new_tokens, confidence = decided[0].long(), decided[1]
            out_tokens[active, step] = new_tokens
            if temperature is not None:
                if out_probs is None:
                    out_probs = torch.zeros(
                        R, self.num_speculative_tokens, logits.shape[-1],
                        dtype=torch.float32, device=logits.device,
                    )
                out_probs[active.to(logits.device), step] = sample.probs
            for row in active.tolist():
                lengths[row] = step + 1
            go_on = (confidence >= threshold) & (budget[active] > step + 1)
            self.stats.record_exits(int((confidence < threshold).sum()))
            current[active_dev] = new_tokens.to(rows.device)
            active = active[go_on]
            if len(active) == 0:
                break
        return out_tokens, out_probs, lengths

    def _layer_plan(
        self,
        batch_rows: torch.Tensor,  # [A] int64: input-batch rows drafting this step
        positions: torch.Tensor,  # [A] int64: their query positions
        keep: torch.Tensor,  # [A, L] bool: layer runs for that row
    ):
        """Attention metadata and slots per layer, built once per distinct row subset.

        Returns (metadata by layer name, slots by layer name, {layer: (rows or None, positions)})
        in layer order; rows is None when every active row runs the layer.
        """
        stack, rows = self.stack, self.rows
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
            built, positions_dev, slot = rows.build(batch_rows[sub], positions[sub], names)
            metadata.update(built)
            slots.update(dict.fromkeys(names, slot))
            whole = len(sub) == len(batch_rows)
            for layer in layers:
                plan[layer] = (None if whole else sub.to(rows.device), positions_dev)
        return metadata, slots, dict(sorted(plan.items()))

    # ------------------------------------------------------------------ plumbing
    def _forward_context(self, metadata, num_tokens: int, slot_mapping):
        from vllm.forward_context import set_forward_context

        return set_forward_context(
            metadata, self.vllm_config, num_tokens=num_tokens, slot_mapping=slot_mapping
        )

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's value on every tensor-parallel rank (identical control flow everywhere)."""
        if self.tp_size == 1:
            return tensor
        from vllm.distributed import get_tp_group

        device_tensor = tensor.to(self.rows.device)
        get_tp_group().broadcast(device_tensor, src=0)
        return device_tensor.cpu()
