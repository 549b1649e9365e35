"""Shared vLLM engines for the end-to-end tests.

Each configuration starts once per session and is shared by every test that uses it
(`engines.get(...)`). At most MAX_ALIVE engines stay up at once (least recently used closes
first) to bound memory on a 24 GiB machine.

Shared engines run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` while one is built: the
engine core in-process and, at one rank, the worker too): a start then takes ~5 s instead of
~25 s (two spawned Python processes importing vLLM) and a shutdown ~1 s instead of ~4 s, over
~45 starts per run. What users run, an engine core and workers in their own processes, is what
the server, example, benchmark, tensor-parallel and Ray tests run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections import Counter, OrderedDict

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# clasp_stats() reads CLaSp's counters from the worker with a pickled function.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

MAX_ALIVE = 3
MAX_MODEL_LEN = 2048
BUILDS: Counter = Counter()
"""Shared-pool engine starts per configuration key, and their seconds (the session summary
prints them: where CI's time goes, and which configurations the LRU pool starts twice)."""


def chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def shutdown(llm) -> None:
    from vllm_clasp.tools.engine import shutdown as shutdown_engine

    shutdown_engine(llm)  # best effort, shared with the benchmark


@contextlib.contextmanager
def in_process():
    """vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING when an engine is built; it is restored after,
    so that servers and benchmarks started by the tests run as users run them. An engine
    built in this process leaves vLLM's environment cache on (`vllm.envs.enable_envs_cache`):
    it is cleared first, so that each engine reads the environment as it is now (e.g. a test's
    VLLM_CPU_OMP_THREADS_BIND)."""
    from vllm import envs

    envs.disable_envs_cache()
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before


class EnginePool:
    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self._alive: OrderedDict[tuple, object] = OrderedDict()

    def get(self, dtype: str = "float32", speculative_config: dict | None = None,
            model: str | None = None, own_process: bool = False, **kwargs):
        """An `LLM` for this configuration (of the default model unless `model` is given),
        started on first use and then shared. `own_process`: its engine core and worker in
        their own processes, as users run them (e.g. to check that CLaSp's worker patches,
        applied in this process by in-process CLaSp engines, stay out of other methods'
        workers)."""
        import json
        import sys

        model = model or self.model_dir
        key = (model, dtype, json.dumps(speculative_config, sort_keys=True),
               json.dumps(kwargs, sort_keys=True), own_process)
        # vLLM's CPU worker, at start-up, rebinds Triton kernels by scanning every loaded
        # module and fails on llvmlite's objects; vLLM's ngram proposer imports numba (and
        # llvmlite). Once that is loaded here, engines start in their own processes.
        own_process = own_process or "llvmlite" in sys.modules
        if key in self._alive:
            self._alive.move_to_end(key)
            return self._alive[key]
        while len(self._alive) >= MAX_ALIVE:
            _, oldest = self._alive.popitem(last=False)
            shutdown(oldest)
            gc.collect()
        from vllm import LLM

        start = time.monotonic()
        with contextlib.nullcontext() if own_process else in_process():
            llm = LLM(
                model=model, dtype=dtype, enforce_eager=kwargs.pop("enforce_eager", True),
                max_model_len=MAX_MODEL_LEN,
                speculative_config=speculative_config, disable_log_stats=False, seed=0,
                **kwargs,
            )
        BUILDS[key] += 1
        BUILDS["seconds"] += time.monotonic() - start
        self._alive[key] = llm
        return llm

    def close(self) -> None:
        while self._alive:
            shutdown(self._alive.popitem()[1])
        gc.collect()


def pytest_terminal_summary(terminalreporter):
    starts = sum(n for key, n in BUILDS.items() if key != "seconds")
    if starts:
        again = sum(n - 1 for key, n in BUILDS.items() if key != "seconds" and n > 1)
        terminalreporter.write_line(
            f"shared engines: {starts} starts ({again} of a configuration started before), "
            f"{BUILDS['seconds']:.0f} s starting them")


def pytest_collection_modifyitems(config, items):
    """bfloat16 engine tests last: the float32 engines the other files share stay alive."""
    items.sort(key=lambda item: item.get_closest_marker("bf16") is not None)


@pytest.fixture(scope="session")
def model_dir() -> str:
    from vllm_clasp.tools.model_prep import prepare_model

    return str(prepare_model())


@pytest.fixture(scope="session")
def small_llama_dir(model_dir, tmp_path_factory) -> str:
    """A small random-weight Llama (4 heads, 2 KV heads) for TP=2 tests; see small_llama.py."""
    from pathlib import Path

    from tests.e2e.small_llama import build_small_llama

    return str(build_small_llama(tmp_path_factory.mktemp("small_llama") / "model", Path(model_dir)))


@pytest.fixture(scope="session")
def engines(model_dir):
    pool = EnginePool(model_dir)
    yield pool
    pool.close()


def spec_metrics(llm) -> dict[str, int]:
    """This engine's own cumulative spec-decode counters (vLLM's, keyed like its metrics).

    Not `llm.get_metrics()`: each new `LLM` unregisters the previous engines' metrics from
    the global registry, so with several engines alive it reports only the last one built.
    """
    from vllm_clasp.tools.engine import spec_counters

    counters = spec_counters(llm)
    return {
        "vllm:spec_decode_num_drafts": counters["drafts"],
        "vllm:spec_decode_num_draft_tokens": counters["draft_tokens"],
        "vllm:spec_decode_num_accepted_tokens": counters["accepted"],
    }


def clasp_stats(llm) -> dict:
    """CLaSp's own counters from the worker (rank 0)."""
    from vllm_clasp.vllm.worker_state import read

    return llm.collective_rpc(read)[0]["stats"]


# --- OpenAI-compatible server with CLaSp (shared by test_serving.py and test_examples.py) ---

VLLM_BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), ".venv", "bin", "vllm")
SERVER_START_TIMEOUT_S = int(os.environ.get("CLASP_SERVER_START_TIMEOUT_S", "300"))


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_serve_cmd(model_dir: str, port: int, spec_config: dict) -> list[str]:
    """`vllm serve <model_dir> ...` exactly as a user runs it. (On vllm-cpu this needs the
    metadata alias scripts/setup.sh writes; without it `vllm serve` dies at start-up.)"""
    import json

    head = [VLLM_BIN, "serve", model_dir]
    return head + [
        "--speculative-config", json.dumps(spec_config),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
        "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
    ]


def log_tail(path: str, n: int = 6000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "<no log>"


class ClaspServer:
    def __init__(self, proc, port: int, model: str, log_path: str):
        self.proc, self.port, self.model, self.log_path = proc, port, model, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/v1"

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="x", timeout=120, max_retries=0)

    def log_tail(self, n: int = 6000) -> str:
        return log_tail(self.log_path, n)


def stop_process(proc, grace_s: float = 30) -> None:
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (engine core too)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@contextlib.contextmanager
def serve(model_dir: str, log_dir, spec_config: dict, extra_args: tuple[str, ...] = ()):
    """`vllm serve` with `spec_config` (plus extra CLI flags) on a free loopback port, healthy
    on entry and stopped (with its engine core) on exit."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    log_path = str(log_dir / "server.log")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            vllm_serve_cmd(model_dir, port, spec_config) + list(extra_args), stdout=log,
            stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    server = ClaspServer(proc, port, model_dir, log_path)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode} during start-up; "
                            f"log tail:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {SERVER_START_TIMEOUT_S} s; "
                            f"log tail:\n{server.log_tail()}")
            time.sleep(2)
        yield server
    finally:
        stop_process(proc)


def scrape_metrics(server) -> dict[str, float]:
    """The server's /metrics, each metric summed over its label sets."""
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


@pytest.fixture(scope="module")
def clasp_server(model_dir, tmp_path_factory):
    """`vllm serve <model> --speculative-config '{"method": "clasp"}'` on a free loopback port."""
    with serve(model_dir, tmp_path_factory.mktemp("clasp_server"), {"method": "clasp"}) as server:
        yield server
