"""Test-only shim that lets vLLM's Ray executor place CPU workers (tests/e2e/test_ray.py).

vLLM's CPU platform has an empty `ray_device_key`, which vLLM reads as "this platform does not
support Ray" (`vllm/v1/executor/ray_utils.py`: `initialize_ray_cluster`,
`get_bundles_sorted_by_node`; `ray_executor_v2.py`: `RayWorkerProc.get_node_and_physical_gpu_ids`).
The key names the Ray resource that each worker's placement-group bundle reserves; vLLM then
reads the worker's ids of that resource with `ray.get_runtime_context().get_accelerator_ids()`,
which lists only Ray's accelerator resources (GPU, TPU, neuron_cores, ...), so a custom resource
name fails there with a KeyError. The shim therefore names Ray's "GPU" resource, and the test
starts its own Ray instance with `num_gpus` logical slots and no GPU: each slot is a worker
place, nothing more. The shim changes only what the CPU platform reports to Ray's placement;
the workers, the model and the communication (gloo) are vLLM's CPU path unchanged.

It is a vLLM platform plugin (`vllm.platform_plugins` entry point) so that every process
resolves it the same way: the test process, the engine core, and each Ray worker actor (which
asks `current_platform.ray_device_key` before it initialises its vLLM worker). The entry point
is declared in a throw-away `*.dist-info` directory put on PYTHONPATH by `install_entry_point`,
and is active only where CLASP_TEST_RAY_CPU=1. No vLLM import here: vLLM loads this module
while it is still choosing its platform.
"""

from __future__ import annotations

import os
from pathlib import Path

ENABLE_ENV = "CLASP_TEST_RAY_CPU"
DIST_NAME = "clasp_test_ray_cpu-0.0.dist-info"


def activate() -> str | None:
    """The `vllm.platform_plugins` hook: our platform's qualified name, or None (inactive)."""
    if os.environ.get(ENABLE_ENV) != "1":
        return None
    return "tests.e2e.ray_cpu.ray_cpu_platform.RayCpuPlatform"


def install_entry_point(site_dir: Path) -> Path:
    """Declare the plugin in site_dir (to be put on PYTHONPATH); returns site_dir."""
    dist = Path(site_dir) / DIST_NAME
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: clasp_test_ray_cpu\nVersion: 0.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[vllm.platform_plugins]\nclasp_test_ray_cpu = tests.e2e.ray_cpu:activate\n"
    )
    return Path(site_dir)
