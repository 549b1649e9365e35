"""`vllm-clasp layers` without an engine: the per-group arithmetic, the metrics parser, the
files written (the engine run is tests/e2e/test_layers_cli.py)."""

from __future__ import annotations

import json
import math

import pytest

from vllm_clasp.tools.layers import (
    acceptance_delta, format_summary, from_metrics_text, summarize_group, write_report,
)

NAN = float("nan")
RUNS = [
    {"m": 2, "layers": [1, 2], "cosines": [1.0, 0.95, 0.9, NAN]},
    {"m": 2, "layers": [1, 3], "cosines": [1.0, 0.97, 0.8, NAN]},
    {"m": 1, "layers": [1], "cosines": [1.0, 0.99, 0.7, 0.5]},
]


def test_group_summary():
    g = summarize_group(RUNS, num_layers=5, acceptance={2: [10, 6], 1: [4, 3]})
    assert g["dp_runs"] == 3
    assert g["skip_frequency"] == pytest.approx([0, 1, 1 / 3, 1 / 3, 0])
    assert g["mean_cosine_by_m"][:3] == pytest.approx([1.0, 0.97, 0.8])
    assert g["mean_cosine_by_m"][3] == 0.5  # only the run that reached M = 3
    assert g["chosen_m"] == {"1": 1, "2": 2} and g["most_chosen_m"] == 2
    assert g["acceptance_by_m"] == {"1": 0.75, "2": 0.6}
    empty = summarize_group([], num_layers=3, acceptance={})
    assert empty["skip_frequency"] == [0.0] * 3 and empty["most_chosen_m"] is None


def test_acceptance_delta_keeps_only_what_grew():
    before = {2: [10, 6]}
    after = {2: [15, 9], 3: [4, 1], 4: [0, 0]}
    assert acceptance_delta(before, after) == {2: [5, 3], 3: [4, 1]}


METRICS = """\
# HELP vllm:clasp_dp_runs_total Requests whose skip set CLaSp's DP (re)computed.
# TYPE vllm:clasp_dp_runs_total counter
vllm:clasp_dp_runs_total{engine="0",model_name="m"} 4.0
# HELP vllm:clasp_layer_skipped_total DP runs that chose to skip the layer.
# TYPE vllm:clasp_layer_skipped_total counter
vllm:clasp_layer_skipped_total{engine="0",layer="1",model_name="m"} 4.0
vllm:clasp_layer_skipped_total{engine="0",layer="3",model_name="m"} 2.0
"""


def test_from_metrics():
    result = from_metrics_text(METRICS)
    assert result["groups"] == {"m (engine 0)": {"dp_runs": 4,
                                                 "skip_frequency": [0.0, 1.0, 0.0, 0.5]}}
    with pytest.raises(ValueError, match="is this a CLaSp server"):
        from_metrics_text("# nothing\n")


def test_report_files(tmp_path):
    engine = {"source": "engine", "num_layers": 5, "groups": {
        "qa": summarize_group(RUNS, 5, {2: [10, 6]}),
        "rag": summarize_group(RUNS[:1], 5, {})}}
    names = sorted(p.name for p in write_report(engine, tmp_path / "e"))
    assert names == ["acceptance_vs_m.png", "cosine_vs_m.png", "layer_skip_heatmap.png",
                     "layers.json"]
    loaded = json.loads((tmp_path / "e" / "layers.json").read_text())
    assert loaded["groups"]["qa"]["most_chosen_m"] == 2
    assert not any(isinstance(v, float) and math.isnan(v)
                   for v in loaded["groups"]["qa"]["mean_cosine_by_m"] if v is not None)
    metrics = from_metrics_text(METRICS)
    assert sorted(p.name for p in write_report(metrics, tmp_path / "m")) == [
        "layer_skip_heatmap.png", "layers.json"]
    assert "most skipped layers [1, 3" in format_summary(metrics)
