"""Per-layer CUDA graphs: any skip set replayed at graph speed without a graph per skip set.

A layer-skipped draft pass runs a different subset of the decoder layers for each skip set, so
one CUDA graph per pass would need one graph per set. Decoder layers differ only in their
weights: capturing one graph per (layer, input shape) and replaying the kept layers in order
runs any skip set from ``L x shapes`` graphs. Each layer's graph reads and rewrites one static
buffer in place (``x.copy_(layer(x))``), so consecutive replays chain without copies.

Host-free (plain torch). The caller owns everything a layer reads besides its input (weights,
KV caches, positions: tensors at fixed addresses that it updates before replaying) and pads
its rows to a captured shape; padded rows must not write real KV slots.

Off CUDA, or when capture fails or a graph disagrees with the eager layer on a dummy input
(``check``), ``replay`` runs the layers eagerly and ``reason`` says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["LayerGraphs", "RunOneLayer"]

RunOneLayer = Callable[[int, torch.Tensor], torch.Tensor]
"""run(layer, x [*shape]) -> [*shape]: one decoder layer on the residual stream."""


class LayerGraphs:
    def __init__(self, run: RunOneLayer, num_layers: int):
        self.run = run
        self.num_layers = num_layers
        self.graphs: dict[tuple[int, ...], list] = {}  # shape -> [L] torch.cuda.CUDAGraph
        self.buffers: dict[tuple[int, ...], torch.Tensor] = {}  # shape -> static x
        self.reason: str | None = None  # why layers run eagerly (None: graphs in use)
        self._pool = None

    @property
    def graphed(self) -> bool:
        return self.reason is None and bool(self.graphs)

    def capture(self, example: torch.Tensor, warmup: int = 2) -> bool:
        """Capture one graph per layer for ``example``'s shape (its values seed the buffer).
        False, with ``reason`` set, when graphs cannot be used: eager replay then."""
        if self.reason is not None:
            return False
        if example.device.type != "cuda" or not torch.cuda.is_available():
            self.reason = f"no CUDA graphs on {example.device.type}"
            return False
        shape = tuple(example.shape)
        x = example.clone()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up off the capture (allocator, autotune)
                for _ in range(warmup):
                    for layer in range(self.num_layers):
                        self.run(layer, x.clone())
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graphs = []
            for layer in range(self.num_layers):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    x.copy_(self.run(layer, x))
                graphs.append(graph)
        except RuntimeError as error:  # capture unsupported by an op, out of memory, ...
            self.reason = f"CUDA graph capture failed for shape {shape}: {error}"
            return False
        x.copy_(example)
        self.graphs[shape] = graphs
        self.buffers[shape] = x
        return True

    def replay(self, layers: Iterable[int], x: torch.Tensor) -> torch.Tensor:
        """x after the given layers, in ascending order (graphs when captured for x's shape,
        else eager). Returns the static buffer when replayed: read it before the next call."""
        layers = sorted(layers)
        graphs = self.graphs.get(tuple(x.shape)) if self.reason is None else None
        if graphs is None:
            for layer in layers:
                x = self.run(layer, x)
            return x
        buffer = self.buffers[tuple(x.shape)]
        buffer.copy_(x)
        for layer in layers:
            graphs[layer].replay()
        return buffer

    def check(self, example: torch.Tensor, layers: Sequence[int] | None = None,
              atol: float = 1e-2, rtol: float = 1e-2) -> float:
        """Compare graph replay with eager layers on ``example``; on a mismatch, stop using
        graphs (``reason`` says why). Returns the largest absolute difference (0.0 when no
        graph is captured for that shape). The caller restores any state the layers write."""
        layers = list(range(self.num_layers)) if layers is None else list(layers)
        if tuple(example.shape) not in self.graphs or self.reason is not None:
            return 0.0
        eager = example.clone()
        for layer in layers:
            eager = self.run(layer, eager)
        graphed = self.replay(layers, example).clone()
        difference = float((graphed.float() - eager.float()).abs().max())
        if not torch.allclose(graphed.float(), eager.float(), atol=atol, rtol=rtol):
            self.reason = (f"graphed layers differ from eager ones by {difference:.3g} "
                           f"on shape {tuple(example.shape)}")
        return difference
