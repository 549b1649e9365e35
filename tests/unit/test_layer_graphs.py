"""Per-layer replay (`core.layer_graphs`) and the GPU stand-in script, on the CPU: the eager
fallback with its reason, replay of any layer subset in order, the graph-vs-eager check, and
the stand-in's tiny run end to end. Graph capture itself only runs where CUDA is (the
stand-in on a GPU, docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vllm_clasp.core.layer_graphs import LayerGraphs

ROOT = Path(__file__).resolve().parents[2]


def _layers(L=5, d=8):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(d, d, generator=g) / d ** 0.5 for _ in range(L)]
    calls = []

    def run(i, x):
        calls.append(i)
        return x + torch.tanh(x @ weights[i])
    return run, calls


def test_off_cuda_replay_runs_the_kept_layers_eagerly_in_order_and_says_why():
    run, calls = _layers()
    graphs = LayerGraphs(run, 5)
    x = torch.randn(3, 8)
    assert graphs.capture(x) is False and not graphs.graphed
    assert graphs.reason == "no CUDA graphs on cpu"
    out = graphs.replay([3, 0, 2], x)
    assert calls == [0, 2, 3]
    expected = x
    for i in (0, 2, 3):
        expected = run(i, expected)
    torch.testing.assert_close(out, expected)
    assert graphs.check(x) == 0.0  # nothing captured: nothing to compare


def test_a_graph_that_disagrees_with_its_eager_layer_is_dropped():
    """check() compares replay with eager on a dummy input; a mismatch (here a buffer that
    went stale, simulated) stops graph use and says so."""
    run, _ = _layers()
    graphs = LayerGraphs(run, 5)
    x = torch.randn(2, 8)

    class Stale:
        def replay(self):
            pass  # a graph whose replay does nothing: the buffer keeps its input
    graphs.graphs[(2, 8)] = [Stale()] * 5
    graphs.buffers[(2, 8)] = torch.zeros(2, 8)
    difference = graphs.check(x)
    assert difference > 0 and graphs.reason.startswith("graphed layers differ")
    out = graphs.replay([0, 1], x)  # eager from now on
    torch.testing.assert_close(out, run(1, run(0, x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the stand-in GPU)")
def test_per_layer_graphs_replay_any_subset_like_eager_on_cuda():
    run, _ = _layers()
    graphs = LayerGraphs(run, 5)
    x = torch.randn(3, 8, device="cuda")
    assert graphs.capture(x) and graphs.graphed
    for kept in ([0, 1, 2, 3, 4], [1, 3], [4]):
        expected = x
        for i in kept:
            expected = run(i, expected)
        torch.testing.assert_close(graphs.replay(kept, x), expected)


def test_the_gpu_stand_in_runs_end_to_end_on_a_tiny_shape():
    spec = importlib.util.spec_from_file_location("gpu_standin", ROOT / "scripts" / "gpu_standin.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name)
    result = module.main(["--tiny", "--device", "cpu", "--repeats", "1", "--batches", "1,2",
                          "--max-dp-batch", "2"])
    assert set(result["batches"]) == {1, 2}
    row = result["batches"][2]
    assert row["draft_M4"]["eager"] > 0 and row["draft_M4"]["per_layer"] > 0
    assert row["dp"]["eager"] > 0 and result["graphs"] == "no CUDA graphs on cpu"
