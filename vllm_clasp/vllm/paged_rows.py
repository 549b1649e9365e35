"""Attention inputs for single-token rows on vLLM's paged KV cache (V1 runner).

A *row* is one query token of one running request at a given position, attending to that
request's cached KV for positions [0, position]. Draft rows also write their K/V into the
request's slot for that position (a lookahead slot the scheduler reserved; the next verify pass
overwrites it). DP rows only read: their layers are left out of the slot-mapping dict, which
makes vLLM's `unified_kv_cache_update` skip the write.
"""

from __future__ import annotations

import torch


class PagedRows:
    def __init__(self, runner):
        kv_groups = runner.kv_cache_config.kv_cache_groups
        if len(kv_groups) != 1:
            raise ValueError(
                f"CLaSp supports models with one KV-cache group; this one has {len(kv_groups)}"
            )
        self.runner = runner
        self.device = runner.device
        self.attn_groups = runner.attn_groups[0]
        for group in self.attn_groups:
            # Read-only DP rows rely on the KV write happening outside the attention forward,
            # in unified_kv_cache_update, which skips layers absent from the slot mapping.
            if getattr(group.backend, "forward_includes_kv_cache_update", True):
                raise ValueError(
                    f"CLaSp cannot use attention backend {group.backend.get_name()}: it writes "
                    "the KV cache inside its forward, so the DP could not read without writing"
                )
        self.block_table = runner.input_batch.block_table[0]
        self.block_size = self.block_table.block_size

    def build(
        self,
        batch_rows: torch.Tensor,  # [n] int64 (CPU): each row's index in the runner's input batch
        positions: torch.Tensor,  # [n] int64 (CPU): each row's query position
        layer_names: list[str],
    ) -> tuple[dict[str, object], torch.Tensor, torch.Tensor]:
        """Per-layer attention metadata for `layer_names`, device positions [n], slots [n]."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        n = int(batch_rows.shape[0])
        num_reqs = self.runner.input_batch.num_reqs
        rows_dev = batch_rows.to(self.device, non_blocking=True)
        positions_dev = positions.to(self.device, non_blocking=True)
        block_table = self.block_table.get_device_tensor(num_reqs)[rows_dev]  # [n, max_blocks]
        block_index = (positions_dev // self.block_size).unsqueeze(1)  # [n, 1]
        slots = (
            block_table.gather(1, block_index.to(block_table.dtype)).squeeze(1).long()
            * self.block_size
            + positions_dev % self.block_size
        )  # [n]
        seq_lens_cpu = (positions + 1).to(torch.int32)
        query_start_loc_cpu = torch.arange(n + 1, dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc_cpu.to(self.device, non_blocking=True),
            query_start_loc_cpu=query_start_loc_cpu,
            seq_lens=seq_lens_cpu.to(self.device, non_blocking=True),
            num_reqs=n,
            num_actual_tokens=n,
            max_query_len=1,
            max_seq_len=int(seq_lens_cpu.max()) if n else 0,
            block_table_tensor=block_table,
            slot_mapping=slots,
            seq_lens_cpu_upper_bound=seq_lens_cpu,
            positions=positions_dev,
        )
        wanted = set(layer_names)
        metadata: dict[str, object] = {}
        for group in self.attn_groups:
            names = [name for name in group.layer_names if name in wanted]
            if names:
                built = group.build_metadata(common)
                for name in names:
                    metadata[name] = built
        return metadata, positions_dev, slots
