"""CLaSp with `distributed_executor_backend="ray"` (vLLM's RayExecutorV2), TP=2.

On CPU vLLM refuses Ray (its CPU platform names no Ray resource for worker placement); the
test-only platform shim in tests/e2e/ray_cpu/ names Ray's "GPU" resource and the run starts
its own Ray instance with two such logical slots and no GPU. Nothing else changes: the workers
are vLLM's CPU workers. Each Ray run happens in a subprocess (tests/e2e/ray_cpu/run.py) that
owns its Ray instance, so no Ray process outlives it. docs/distributed.md has the details.

Checked: greedy output equals plain decoding at TP=2 (vLLM's mp executor) token for token;
every rank is a Ray worker process with the shim platform, the vllm_clasp plugin registered
and the ClaspProposer in its runner; CLaSp's counters (DP runs, draft rounds and tokens, skip
histograms) are identical on both ranks, i.e. they made the same skip and draft decisions.
The GPU test runs the same without the shim wherever CUDA and Ray are present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.ray_cpu import ENABLE_ENV, install_entry_point
from tests.e2e.test_tensor_parallel import (
    SMALL_MAX_TOKENS, SMALL_PROMPTS, greedy, threads_bound,
)

pytestmark = pytest.mark.engine

try:
    import ray  # noqa: F401
except ImportError:
    pytest.skip("ray is not installed (pip install -e '.[test]' installs it)",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 900


def run_on_ray(model: str, tp: int, methods: str, tmp_path: Path, env: dict) -> dict:
    out = tmp_path / "result.json"
    pythonpath = [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]
    env = dict(env, PYTHONPATH=os.pathsep.join(pythonpath),
               VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # the per-rank report is a function
    proc = subprocess.run(
        [sys.executable, "-m", "tests.e2e.ray_cpu.run", "--model", model, "--tp", str(tp),
         "--methods", methods, "--num-prompts", str(len(SMALL_PROMPTS)),
         "--max-tokens", str(SMALL_MAX_TOKENS), "--out", str(out)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env, cwd=REPO,
    )
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        causes = [line for line in output.splitlines()
                  if any(word in line for word in ("Error", "Killing", "OOM", "killed"))]
        pytest.fail(f"Ray run exited with {proc.returncode}; likely causes:\n"
                    + "\n".join(causes[-40:]) + "\n--- output tail ---\n" + output[-6000:])
    return json.loads(out.read_text())


def check_ranks(ranks: list[dict], tp: int, platform: str) -> None:
    assert [r["tp_rank"] for r in ranks] == list(range(tp)), ranks
    assert len({r["pid"] for r in ranks}) == tp and os.getpid() not in {r["pid"] for r in ranks}
    for r in ranks:
        assert r["platform"].endswith(platform), r  # CUDA: NvmlCudaPlatform or NonNvml...
        assert r["plugin_registered"] and r["clasp_drafter"], r
    # Same DP results and draft decisions on every rank (the broadcast from rank 0).
    assert all(r["stats"] == ranks[0]["stats"] for r in ranks), [r["stats"] for r in ranks]


def test_ray_tp2_cpu_clasp_equals_plain(engines, small_llama_dir, tmp_path):
    with threads_bound("0|1"):
        plain = engines.get(model=small_llama_dir, tensor_parallel_size=2)
    expected = greedy(plain, SMALL_PROMPTS, SMALL_MAX_TOKENS, ignore_eos=True)

    site = install_entry_point(tmp_path / "site")
    # VLLM_TARGET_DEVICE=cpu would make vLLM skip platform plugins, the shim included.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_TARGET_DEVICE"}
    env = dict(env, VLLM_CPU_OMP_THREADS_BIND="0|1", **{ENABLE_ENV: "1"},
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               PYTHONPATH=os.pathsep.join([str(site)] + [p for p in [
                   os.environ.get("PYTHONPATH")] if p]))
    result = run_on_ray(small_llama_dir, 2, "clasp", tmp_path, env)["clasp"]
    print(f"Ray TP=2 CLaSp: {result['spec']} ; ranks: "
          f"{[(r['pid'], r['platform']) for r in result['ranks']]}")
    check_ranks(result["ranks"], 2, "RayCpuPlatform")
    assert result["spec"]["drafts"] > 0
    assert result["token_ids"] == expected


@pytest.mark.gpu
def test_ray_tp_gpu_clasp_equals_plain(small_llama_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tp = 2 if torch.cuda.device_count() >= 2 else 1
    env = {k: v for k, v in os.environ.items() if k != ENABLE_ENV}
    result = run_on_ray(small_llama_dir, tp, "plain,clasp", tmp_path, env)
    check_ranks(result["clasp"]["ranks"], tp, "CudaPlatform")
    assert result["clasp"]["spec"]["drafts"] > 0
    assert result["clasp"]["token_ids"] == result["plain"]["token_ids"]
