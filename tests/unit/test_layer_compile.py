"""One compiled function for every decoder layer (core.layer_compile): exact against eager,
one graph per shape class rather than per layer, and an eager fall-back that says why."""

import logging

import pytest
import torch
from torch import nn

from vllm_clasp.core.layer_compile import COMPILED, EAGER, CompiledLayers


class Layer(nn.Module):
    """A decoder-layer stand-in: RMS norm, a gated MLP, and a position-dependent rotation."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(d, d, bias=False)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, positions, x):  # [n], [n, d] -> [n, d]
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale
        gate, up = self.up(normed).chunk(2, dim=-1)
        angle = positions[:, None].float() * 1e-2
        return x + self.down(torch.nn.functional.silu(gate) * up) * torch.cos(angle)


def call(layer, positions, x):
    return layer(positions, x)


def stack(n_layers=6, d=16):
    return [Layer(d, seed) for seed in range(n_layers)]


def run_all(compiled, layers, rows, d=16):
    positions = torch.arange(rows)
    x = torch.randn(rows, d)
    for index in range(len(layers)):
        x = compiled.run(index, positions, x)
    return x


def eager_all(layers, rows, d=16, seed=0):
    torch.manual_seed(seed)
    positions = torch.arange(rows)
    x = torch.randn(rows, d)
    for layer in layers:
        x = call(layer, positions, x)
    return x


def counting_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@torch.inference_mode()
def test_every_layer_runs_compiled_and_exact_with_one_graph_per_shape_class():
    layers = stack()
    graphs = []
    compiled = CompiledLayers(call, layers, backend=counting_backend(graphs))
    for rows in (1, 3, 7, 2):
        torch.manual_seed(0)
        out = run_all(compiled, layers, rows)
        torch.testing.assert_close(out, eager_all(layers, rows))
    assert compiled.path == COMPILED and compiled.reason is None
    assert compiled.compiled_calls == 4 * len(layers)
    # Layers differ only in weights: graphs per shape class (one row / several), not per layer.
    assert len(graphs) <= 2 < len(layers)


@torch.inference_mode()
def test_inductor_matches_eager():
    layers = stack(3)
    compiled = CompiledLayers(call, layers, backend="inductor")
    torch.manual_seed(0)
    out = run_all(compiled, layers, 4)
    torch.testing.assert_close(out, eager_all(layers, 4), rtol=1e-4, atol=1e-4)
    assert compiled.path == COMPILED


@torch.inference_mode()
def test_a_wrong_compiled_layer_falls_back_to_eager_and_says_why(caplog):
    def wrong(gm, example_inputs):
        return lambda *args: [out + 1.0 for out in gm(*args)]

    layers = stack()
    compiled = CompiledLayers(call, layers, backend=wrong)
    with caplog.at_level(logging.WARNING, logger="vllm.clasp"):
        torch.manual_seed(0)
        out = run_all(compiled, layers, 3)
    torch.testing.assert_close(out, eager_all(layers, 3))  # the eager result, every layer
    assert compiled.path == EAGER and "differs from eager" in compiled.reason
    assert compiled.compiled_calls == 0
    assert "draft layers now run eagerly" in caplog.text


@torch.inference_mode()
@pytest.mark.parametrize("when", ["warm", "run"])
def test_a_failing_compile_falls_back_to_eager(when):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    layers = stack()
    compiled = CompiledLayers(call, layers, backend=broken)
    if when == "warm":
        compiled.warm(torch.arange(2), torch.randn(2, 16))
        assert compiled.path == EAGER
    torch.manual_seed(0)
    out = run_all(compiled, layers, 2)
    torch.testing.assert_close(out, eager_all(layers, 2))
    assert compiled.path == EAGER and "no compiler here" in compiled.reason
