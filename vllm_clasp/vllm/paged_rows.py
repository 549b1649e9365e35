"""Attention inputs for single-token rows on vLLM's paged KV cache (V1 runner).

A *row* is one query token of one running request at a given position, attending to that
request's cached KV for positions [0, position]. Draft rows also write their K/V into the
request's slot for that position (a lookahead slot the scheduler reserved; the next verify pass
overwrites it). DP rows only read: their layers are left out of the slot-mapping dict, which
makes vLLM's `unified_kv_cache_update` skip the write.

Models whose layers use different kinds of attention (full and sliding-window: Gemma 2/3,
Mistral with a window, `layer_types` mixing both) have several KV-cache groups under vLLM's
hybrid KV-cache manager, each with its own block table and metadata builder. A row's metadata
and slot are built per group, for the layers of that group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _CacheGroup:
    index: int  # the KV-cache group's index in the runner's block tables and attn groups
    layer_names: frozenset[str]


class PagedRows:
    def __init__(self, runner):
        """Raises ValueError for a KV cache CLaSp cannot draft on (not attention, or a
        backend that writes the cache inside its forward)."""
        from vllm.v1.kv_cache_interface import AttentionSpec, UniformTypeKVCacheSpecs

        self.runner = runner
        self.device = runner.device
        self.groups: list[_CacheGroup] = []
        for gid, kv_group in enumerate(runner.kv_cache_config.kv_cache_groups):
            spec = kv_group.kv_cache_spec
            # One group may hold attention layers of different shapes (UniformTypeKVCacheSpecs).
            specs = (list(spec.kv_cache_specs.values())
                     if isinstance(spec, UniformTypeKVCacheSpecs) else [spec])
            if not all(isinstance(s, AttentionSpec) for s in specs):
                raise ValueError(
                    f"CLaSp drafts on attention KV caches; KV-cache group {gid} of this model "
                    f"is {type(spec).__name__}"
                )
            for group in runner.attn_groups[gid]:
                # Read-only DP rows rely on the KV write happening outside the attention
                # forward, in unified_kv_cache_update, which skips layers absent from the
                # slot mapping.
                if getattr(group.backend, "forward_includes_kv_cache_update", True):
                    raise ValueError(
                        f"CLaSp cannot use attention backend {group.backend.get_name()}: it "
                        "writes the KV cache inside its forward, so the DP could not read "
                        "without writing"
                    )
            self.groups.append(_CacheGroup(gid, frozenset(kv_group.layer_names)))

    def build(
        self,
        batch_rows: torch.Tensor,  # [n] int64 (CPU): each row's index in the runner's input batch
        positions: torch.Tensor,  # [n] int64 (CPU): each row's query position
        layer_names: list[str],
    ) -> tuple[dict[str, object], torch.Tensor, dict[str, torch.Tensor]]:
        """(attention metadata by layer name, device positions [n], slots [n] by layer name)
        for `layer_names`, each built from its KV-cache group's block table."""
        n = int(batch_rows.shape[0])
        rows_dev = batch_rows.to(self.device, non_blocking=True)
        positions_dev = positions.to(self.device, non_blocking=True)
        seq_lens_cpu = (positions + 1).to(torch.int32)  # [n]
        wanted = set(layer_names)
        metadata: dict[str, object] = {}
        slots: dict[str, torch.Tensor] = {}
        for group in self.groups:
            names = wanted & group.layer_names
            if not names:
                continue
            common, group_slots = self._common(group, rows_dev, positions, positions_dev,
                                               seq_lens_cpu, n)
            for attn_group in self.runner.attn_groups[group.index]:
                built_names = [name for name in attn_group.layer_names if name in names]
                if built_names:
                    built = attn_group.build_metadata(common)
                    for name in built_names:
                        metadata[name] = built
                        slots[name] = group_slots
        return metadata, positions_dev, slots

    def _common(self, group: _CacheGroup, rows_dev, positions, positions_dev, seq_lens_cpu,
                n: int):
        """vLLM's CommonAttentionMetadata for n single-token rows in one KV-cache group, and
        the rows' slots [n] in that group's cache."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        batch = self.runner.input_batch
        group_table = batch.block_table[group.index]
        block_size = group_table.block_size
        block_table = group_table.get_device_tensor(batch.num_reqs)[rows_dev]  # [n, blocks]
        block_index = (positions_dev // block_size).unsqueeze(1)  # [n, 1]
        slots = (
            block_table.gather(1, block_index.to(block_table.dtype)).squeeze(1).long()
            * block_size
            + positions_dev % block_size
        )  # [n]
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
        return common, slots
