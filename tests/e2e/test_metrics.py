"""CLaSp's Prometheus metrics offline: they count exactly what the worker counted.

The server side (/metrics, the log line) is tested in test_serving.py.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import chat, clasp_stats
from tests.e2e.prompts import CHAT_PROMPTS

pytestmark = pytest.mark.engine

# The engine test_exactness.py uses: layer-skip drafts on every step.
CLASP = {"method": "clasp", "clasp_adaptive": False, "clasp_prompt_lookup_max": 0}


def _clasp_values(name: str, model: str | None = None) -> float:
    """Sum over label sets of one CLaSp metric (only `model`'s, when given), read from
    CLaSp's collectors themselves: whether they are in the global registry right now depends
    on which engine this process built last (each new vLLM engine unregisters all `vllm:`
    metrics; ours re-register on their next update). Other models' engines built earlier in
    the same process keep their own series (a gauge is not a difference)."""
    from vllm_clasp.vllm.metrics import _Collectors

    total = 0.0
    for collector in _Collectors._instance.all:
        for family in collector.collect():
            for sample in family.samples:
                if sample.name == name and model in (None, sample.labels.get("model_name")):
                    total += sample.value
    return total


def test_prometheus_counters_equal_the_workers_counters(engines):
    from vllm import SamplingParams

    llm = engines.get(dtype="float32", speculative_config=CLASP)
    engines.get(dtype="float32")  # a later engine unregisters every `vllm:` metric (as in CI)
    names = {
        "num_dp_runs": "vllm:clasp_dp_runs_total",
        "num_dp_batches": "vllm:clasp_dp_batches_total",
        "num_model_draft_rounds": "vllm:clasp_model_draft_rounds_total",
        "num_model_draft_tokens": "vllm:clasp_model_draft_tokens_total",
        "num_threshold_exits": "vllm:clasp_threshold_exits_total",
        "num_reoptimizations": "vllm:clasp_reoptimizations_total",
        "num_skip_set_changes": "vllm:clasp_skip_set_changes_total",
    }
    worker_before = clasp_stats(llm)
    prom_before = {key: _clasp_values(name) for key, name in names.items()}
    texts = [chat(llm.get_tokenizer(), p) for p in CHAT_PROMPTS[:6]]
    llm.generate(texts, SamplingParams(temperature=0, max_tokens=96), use_tqdm=False)
    llm.generate(texts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    worker_after = clasp_stats(llm)
    for key, name in names.items():
        worker = worker_after[key] - worker_before[key]
        prom = _clasp_values(name) - prom_before[key]
        print(f"{name}: {prom:.0f} (worker {worker})")
        # The last step's delta is sent with the step after it (stats are built after drafting).
        assert worker - 8 <= prom <= worker, (name, prom, worker)
    # The six requests draft together, so they share one skip set: one DP run per LOI for
    # the group (96 tokens, LOI 16), not one per request.
    assert worker_after["num_dp_runs"] - worker_before["num_dp_runs"] >= 2
    assert worker_after["num_reoptimizations"] > worker_before["num_reoptimizations"]
    # After the short request only it can still be tracked; finished requests are freed.
    model = str(llm.llm_engine.vllm_config.model_config.served_model_name)
    assert _clasp_values("vllm:clasp_tracked_requests", model) <= 1
    from prometheus_client import REGISTRY  # and they are back where get_metrics() reads

    assert REGISTRY.get_sample_value("vllm:clasp_dp_runs_total", {
        "model_name": model, "engine": "0"}) is not None
