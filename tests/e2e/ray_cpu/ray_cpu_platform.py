"""vLLM's CPU platform, with Ray's "GPU" resource as the per-worker placement slot (see
`__init__.py` for why "GPU" and why nothing else changes)."""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform


class RayCpuPlatform(CpuPlatform):
    ray_device_key: str = "GPU"
