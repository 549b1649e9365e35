"""`ClaspProposer`: the adapter between vLLM's V1 model runner and CLaSp's host-free core.

After each verification step the patched runner (`patches.py`) calls `propose_for_runner`
with itself; the adapter

1. reads the runner's state into plain arrays (`core.planner.StepInputs`);
2. asks the planner for the step's plan: prompt-lookup drafts, which requests get a
   layer-skipped model draft, which of those are due for a DP run;
3. runs the DP and the draft passes the plan asks for (`skip_forward.SkipForward`);
4. lets the planner decide how much of each draft to verify, and returns the drafts plus,
   for sampled batches, the draft probabilities q [n, K, V] for vLLM's rejection sampler.

The adapter holds no runner; the patch writes what it returns into the runner.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from vllm_clasp.core.draft_sampling import rejection_sampler_probs
from vllm_clasp.core.options import SUFFIX_INSTALL_HINT
from vllm_clasp.core.planner import Plan, StepInputs, StepPlanner
from vllm_clasp.core.stats import ClaspStats
from vllm_clasp.vllm.collective import tp_broadcast
from vllm_clasp.vllm.decoder_stack import DecoderStack
from vllm_clasp.vllm.runner_inputs import step_inputs
from vllm_clasp.vllm.skip_forward import SkipForward

logger = logging.getLogger("vllm.clasp.proposer")  # covered by vLLM's logging setup


class ClaspProposer:
    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.vllm_config = vllm_config
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.resolved = spec.resolved_options()  # resolved once, with the config
        self.copy_source_asked = spec.clasp_options().copy_source
        self.max_model_len = vllm_config.model_config.max_model_len
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self._hidden_size = vllm_config.model_config.get_hidden_size()
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.device: torch.device | None = None  # the runner's, set by bind() at start-up
        self.stats = ClaspStats()
        self.planner: StepPlanner | None = None
        self.forward: SkipForward | None = None

    # The custom_class factory vLLM uses to build us checks for a callable `propose`.
    def propose(self, *args, **kwargs):
        raise RuntimeError("ClaspProposer is driven by propose_for_runner (see patches.py)")

    def load_model(self, model) -> None:
        stack = DecoderStack(model)
        resolved = self.resolved
        if stack.num_layers != resolved.num_layers:
            raise ValueError(f"CLaSp: the loaded model has {stack.num_layers} decoder layers, "
                             f"its config {resolved.num_layers}")
        draft_vocab = self.vocab_size
        if resolved.draft_vocab_size < self.vocab_size and stack.use_draft_vocab(
            resolved.draft_vocab_size
        ):
            draft_vocab = resolved.draft_vocab_size
        self.planner = StepPlanner(resolved, self.stats, broadcast=self._broadcast,
                                   layer_costs=stack.layer_weights(),
                                   head_cost=draft_vocab * self._hidden_size / self.tp_size)
        self.max_model_draft = resolved.max_model_draft_tokens
        self.forward = SkipForward(stack, self.vllm_config, resolved,
                                   max(self.max_model_draft, 1), broadcast=self._broadcast)
        if self.copy_source_asked == "auto" and resolved.copy_source == "ngram":
            logger.warning("CLaSp: arctic-inference is not installed, so drafts are copied with "
                           "n-gram lookup instead of suffix trees (%s)", SUFFIX_INSTALL_HINT)
        logger.info(
            "CLaSp: drafting with the target's own %d layers, skipping %s per request "
            "(never skipped: %s), up to %d model-draft tokens, copies from %s, K=%d, LOI=%d, "
            "draft-exit threshold %.2f, draft vocab %s",
            stack.num_layers,
            ("%d-%d (auto)" % resolved.skip_range) if resolved.auto_skip else resolved.num_skip,
            [i for i, never in enumerate(resolved.never_skip) if never],
            resolved.max_model_draft_tokens, resolved.copy_source,
            self.num_speculative_tokens, resolved.loi, resolved.draft_exit_threshold,
            draft_vocab,
        )

    def forget(self, scheduler_output) -> None:
        """Drop the state of requests that finished or were preempted. Called at the start
        of every step (patched `execute_model`), also the step that only reports the last
        requests finished and drafts nothing, so an idle engine holds no CLaSp state."""
        if self.planner is None:
            return
        for gone in (scheduler_output.finished_req_ids, scheduler_output.preempted_req_ids):
            self.planner.forget(gone)

    def _compile_layers(self, stack: DecoderStack) -> str | None:
        """Compile the draft's layer calls where vLLM compiles the model, with vLLM's
        backend and inductor options (`CompilationConfig.backend`,
        `.inductor_compile_config`); None, or why they run eagerly."""
        from vllm.config import CompilationMode

        config = self.vllm_config.compilation_config
        if self.max_model_draft == 0:
            return "no layer-skip drafts (clasp_max_model_draft_tokens is 0)"
        if not self.resolved.compile_layers:
            return "clasp_compile_layers is false"
        if config.mode == CompilationMode.NONE:
            return "vLLM runs this model eagerly (enforce_eager, or compilation mode 0)"
        if self.vllm_config.lora_config is not None:
            return "LoRA adapters (their per-call token mappings run eagerly)"
        backend = config.backend or "inductor"
        stack.compile_layers(backend, dict(config.inductor_compile_config)
                             if backend == "inductor" else None)
        return None

    def bind(self, runner) -> None:
        """Check and bind the runner's KV cache once it exists (patched
        `initialize_kv_cache`), so a model CLaSp cannot draft on fails at start-up; then
        compile the draft's layer calls (logged: which path runs, and why)."""
        self.device = runner.device
        if self.forward is None:
            return
        self.forward.bind(runner)
        stack = self.forward.stack
        eager_reason = self._compile_layers(stack)
        if stack.compiled is not None:
            started = time.perf_counter()
            self.forward.warm_compiled(self._hidden_size, self.vllm_config.model_config.dtype)
            eager_reason = stack.compiled.reason
            if eager_reason is None:
                logger.info("CLaSp: draft layers compiled (torch.compile, backend %s): one "
                            "function for all %d decoder layers, each checked against eager "
                            "on its first call; %.1f s", stack.compiled.backend,
                            stack.num_layers, time.perf_counter() - started)
                return
        if self.max_model_draft:
            logger.info("CLaSp: draft layers run eagerly: %s", eager_reason)

    def state(self, take_dp_log: bool = False) -> dict:
        """What tools may read (`worker_state.read`): counters, acceptance per M, and with
        take_dp_log the DP runs since the last such call (then cleared)."""
        skip_sets = self.planner.skip_sets if self.planner is not None else None
        dp_log = []
        if take_dp_log and skip_sets is not None:
            dp_log = list(skip_sets.dp_log)
            skip_sets.dp_log.clear()
        return {"stats": self.stats.as_dict(), "dp_log": dp_log,
                "acceptance_by_m": {} if skip_sets is None else {
                    int(m): list(v) for m, v in skip_sets.skip_counts.acceptance_by_m.items()}}

    def take_metrics(self) -> dict:
        """CLaSp's counters changed since the last call (`ClaspStats.take_delta`)."""
        return self.stats.take_delta()

    # ------------------------------------------------------------------ the runner's entry
    @torch.inference_mode()
    def propose_for_runner(self, runner, scheduler_output, sampled_token_ids: list[list[int]]
                           ) -> tuple[list[list[int]], torch.Tensor | None]:
        """(draft tokens per input-batch row, q [n, k, V] float32 for sampled batches)."""
        started = time.perf_counter()
        drafts, draft_probs, model_seconds = self._propose(runner, scheduler_output,
                                                           sampled_token_ids)
        self.stats.record_planning(time.perf_counter() - started - model_seconds)
        self.stats.maybe_log(len(self.planner.skip_sets))
        return drafts, draft_probs

    def _propose(self, runner, scheduler_output, sampled_token_ids):
        """(drafts, q or None, seconds of DP and drafting)."""
        step = step_inputs(runner, scheduler_output, sampled_token_ids,
                           self.num_speculative_tokens, self.max_model_len)
        plan = self.planner.plan(step)
        if plan is None:
            return [[] for _ in step.req_ids], None, 0.0
        made, probs, seconds = {}, None, 0.0
        if plan.model_rows:
            search, search_seconds = None, 0.0
            if plan.search_rows:
                started = time.perf_counter()
                search = self.forward.search(plan.search_rows, step.token_ids, step.num_tokens,
                                             plan.search_groups)
                search_seconds = time.perf_counter() - started
            masks = self.planner.skip_masks(plan, step, search, search_seconds)
            made, probs, seconds = self._model_drafts(runner, plan, step, masks)
        drafts = self.planner.finish(plan, step, made, seconds)
        draft_probs = None  # a step without draft tokens samples as plain decoding (patch 13)
        if any(drafts.tokens) and not runner.input_batch.sampling_metadata.all_greedy:
            draft_probs = rejection_sampler_probs(len(step.req_ids), self.vocab_size,
                                                  plan.model_rows, probs, drafts.copied,
                                                  self.device)
        return drafts.tokens, draft_probs, self.planner.model_seconds

    def _model_drafts(self, runner, plan: Plan, step: StepInputs, masks: torch.Tensor):
        """Layer-skipped drafts for plan.model_rows with their skip sets (masks [R, L] bool):
        ({row: tokens}, q or None, seconds)."""
        started = time.perf_counter()
        rows = np.asarray(plan.model_rows)
        num_tokens = step.num_tokens[rows].astype(np.int64)  # [R]
        tokens, probs, lengths = self.forward.draft(
            torch.from_numpy(rows.astype(np.int64)),
            torch.from_numpy(step.token_ids[rows, num_tokens - 1].astype(np.int64)),
            torch.from_numpy(num_tokens),
            torch.from_numpy(np.minimum(step.max_draft[rows], self.max_model_draft).astype(np.int64)),
            masks, runner.input_batch.sampling_metadata,
            self.stats,
        )
        made = {i: tokens[r, : lengths[r]].numpy() for r, i in enumerate(plan.model_rows)}
        return made, probs, time.perf_counter() - started

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's value on every tensor-parallel rank (identity with one rank)."""
        if self.tp_size == 1:
            return tensor
        return tp_broadcast(tensor, self.device)
