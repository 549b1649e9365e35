"""CLaSp's counters from worker delta to Prometheus (no engine)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from vllm_clasp.vllm.patching import FieldPatch
from vllm_clasp.core.stats import ClaspStats, merge_deltas


def test_take_delta_reports_only_what_changed():
    stats = ClaspStats()
    masks = torch.tensor([[True, False, True], [False, False, True]])  # [B=2, L=3]
    stats.record_search(masks, [None, 1], seconds=0.5)
    stats.tracked_requests = 2
    first = stats.take_delta()
    assert first["num_dp_runs"] == 2 and first["num_dp_batches"] == 1
    assert first["search_time_s"] == 0.5
    assert first["layer_skips"] == {"0": 1, "2": 2}
    assert first["search_skip_counts"] == {"2": 1, "1": 1}
    assert (first["num_reoptimizations"], first["num_skip_set_changes"],
            first["num_skip_set_changed_layers"]) == (1, 1, 1)
    assert first["tracked_requests"] == 2

    stats.record_search(masks[:1], [0], seconds=0.25)
    stats.tracked_requests = 0
    second = stats.take_delta()
    assert second["num_dp_runs"] == 1 and second["search_time_s"] == 0.25
    assert second["layer_skips"] == {"0": 1, "2": 1}
    assert (second["num_reoptimizations"], second["num_skip_set_changes"]) == (1, 0)
    assert second["tracked_requests"] == 0
    third = stats.take_delta()
    assert third["num_dp_runs"] == 0 and third["layer_skips"] == {}


def test_merge_deltas_adds_counters_and_keeps_the_latest_gauge():
    a = {"num_dp_runs": 2, "layer_skips": {"1": 2}, "tracked_requests": 5}
    b = {"num_dp_runs": 3, "layer_skips": {"1": 1, "4": 1}, "tracked_requests": 1}
    assert merge_deltas(None, b) == b
    assert merge_deltas(a, b) == {"num_dp_runs": 5, "layer_skips": {"1": 3, "4": 1},
                                  "tracked_requests": 1}
    assert a["layer_skips"] == {"1": 2}  # inputs untouched


def test_field_patch_adds_a_serialisable_field_and_reverts():
    msgspec = pytest.importorskip("msgspec")

    @dataclasses.dataclass
    class Host:
        a: int = 0

    import sys

    module = type(sys)("clasp_fake_host")
    module.Host = Host
    sys.modules["clasp_fake_host"] = module
    try:
        patch = FieldPatch("clasp_fake_host:Host", "extra", dict | None, why="", removal="")
        patch.apply()
        with pytest.raises(RuntimeError):
            patch.apply()
        host = Host(a=1)
        assert host.extra is None
        host.extra = {"k": 1}
        decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(host), type=Host)
        assert (decoded.a, decoded.extra) == (1, {"k": 1})
        patch.revert()
        assert "extra" not in Host.__dataclass_fields__ and not hasattr(Host, "extra")
        with pytest.raises(AttributeError):
            FieldPatch("clasp_fake_host:Host", "a", int, why="", removal="").apply()
    finally:
        del sys.modules["clasp_fake_host"]


def _config(name="m", layers=4):
    model = SimpleNamespace(served_model_name=name, get_total_num_hidden_layers=lambda: layers)
    return SimpleNamespace(model_config=model)


def _value(name: str, **labels) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


def test_stat_logger_exports_prometheus_metrics_and_a_log_line(caplog):
    from vllm_clasp.vllm.metrics import ClaspStatLogger

    stat_logger = ClaspStatLogger(_config("unit-model"), engine_index=0)
    labels = {"model_name": "unit-model", "engine": "0"}
    before = _value("vllm:clasp_dp_runs_total", **labels) or 0.0
    delta = {"num_dp_runs": 3, "num_dp_batches": 1, "search_time_s": 0.01,
             "num_model_draft_rounds": 4, "num_model_draft_tokens": 9, "num_threshold_exits": 2,
             "layer_skips": {"1": 3}, "search_skip_counts": {"2": 3}, "tracked_requests": 3}
    stat_logger.record(SimpleNamespace(clasp=delta), None)
    stat_logger.record(SimpleNamespace(clasp=None), None)  # steps without CLaSp news
    stat_logger.record(None, None)
    assert _value("vllm:clasp_dp_runs_total", **labels) == before + 3
    assert _value("vllm:clasp_tracked_requests", **labels) == 3
    assert _value("vllm:clasp_layer_skipped_total", layer="1", **labels) >= 3
    assert _value("vllm:clasp_skipped_layers_count", **labels) >= 3
    with caplog.at_level("INFO", logger="vllm.clasp"):
        stat_logger.log()
        stat_logger.log()  # nothing new: no second line
    lines = [r.getMessage() for r in caplog.records if "CLaSp" in r.getMessage()]
    assert len(lines) == 1 and "3 DP runs" in lines[0] and "3 requests tracked" in lines[0]


def test_stat_logger_re_registers_after_vllm_unregisters_its_metrics():
    from prometheus_client import REGISTRY
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    from vllm_clasp.vllm.metrics import ClaspStatLogger

    stat_logger = ClaspStatLogger(_config("unit-model-2"), engine_index=1)
    unregister_vllm_metrics()  # what each new vLLM PrometheusStatLogger does
    assert REGISTRY.get_sample_value(
        "vllm:clasp_tracked_requests", {"model_name": "unit-model-2", "engine": "1"}) is None
    stat_logger.record(SimpleNamespace(clasp={"tracked_requests": 7}), None)
    assert REGISTRY.get_sample_value(
        "vllm:clasp_tracked_requests", {"model_name": "unit-model-2", "engine": "1"}) == 7
