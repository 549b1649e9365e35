"""Tensor-parallel agreement: rank 0's value of a small tensor on every rank.

Every rank runs the planner and the draft passes on the same inputs, but decisions from
measured time (and sampled draft tokens, and DP masks on a nondeterministic device) can differ
between ranks; broadcasting them keeps all ranks calling the same layers with the same rows.
"""

from __future__ import annotations

import torch


def tp_broadcast(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (CPU) as rank 0 has it, on every rank of the TP group; returned on the CPU."""
    from vllm.distributed import get_tp_group

    on_device = tensor.to(device)
    get_tp_group().broadcast(on_device, src=0)
    return on_device.cpu()
