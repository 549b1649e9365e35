"""LoRA adapters for the rows a CLaSp pass runs.

vLLM's LoRA layers (the punica wrapper shared by every LoRA-wrapped linear, embedding and
logits layer) read a token -> adapter mapping that the runner sets once per step for the
step's scheduled tokens (`GPUModelRunner.set_active_loras`). The DP and the draft passes run
the same layers on other rows (one token per due or drafting request, and per layer only the
rows that keep it), so before each such call the mapping must describe those rows, or the
LoRA kernels see a mapping of the wrong length and the worker dies. The next step's
`_prepare_inputs` sets the step's own mapping again, so nothing needs restoring.

Two limits of vLLM's LoRA metadata shape the calls: its index buffers hold
`max_num_batched_tokens` tokens (`max_rows`: the DP splits larger layer calls), and its
segmented (prefill) kernels, which the runner selects on CPU, allow at most `max_num_seqs`
runs of equal adapters, while CLaSp's rows interleave requests freely; so CLaSp's mapping
takes the per-token (decode) kernels, which read one adapter index per row.

Without LoRA (`runner.lora_config` is None) `select` does nothing.
"""

from __future__ import annotations

import torch


class AdapterRows:
    def __init__(self, runner):
        self.runner = runner if getattr(runner, "lora_config", None) else None
        self.max_rows = (runner.vllm_config.scheduler_config.max_num_batched_tokens
                         if self.runner is not None else None)
        """Most rows one call may run with adapters (None: no limit)."""

    def select(self, batch_rows: torch.Tensor) -> None:
        """Make the LoRA layers apply each row's adapter to the next call's rows.

        batch_rows: [n] int64 (CPU), each row's index in the runner's input batch; the call
        that follows runs n tokens in this order (one per row) and, for logits, n rows."""
        if self.runner is None:
            return
        from vllm.lora.layers import LoRAMapping

        batch = self.runner.input_batch
        ids = tuple(int(x) for x in batch.request_lora_mapping[batch_rows.numpy()])  # [n]
        # As the runner's per step (`_set_active_loras`; the manager recomputes the kernels'
        # metadata only when the mapping changed), but with per-token kernels; the token
        # mapping equals the logits mapping, since every row is one token and one logits row.
        self.runner.lora_manager.set_active_adapters(
            set(batch.lora_id_to_lora_request.values()),
            LoRAMapping(ids, ids, is_prefill=False))

