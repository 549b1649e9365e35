"""One compiled function that runs any decoder layer: layer-skip drafts at compiled speed.

Decoder layers differ only in their weights. `torch.compile` inlines an `nn.Module` passed as
an argument and lifts its parameters to graph inputs, so one compiled function serves every
layer of the stack as long as nothing else about the layers differs in the graph (vLLM passes
each attention layer's name to its attention op as an opaque value, `LayerName`, lifted as an
input on torch >= 2.11 for the same reason). Any skip set then runs compiled, with a graph per
shape class (one row, several rows), never one per layer or per skip set: the CPU analogue of
replaying one CUDA graph per layer (`core.layer_graphs`).

Safety: a layer's first compiled call is compared with the eager call on the same input; an
exception or a mismatch switches every later call to eager and records why (`reason`). The
draft only proposes tokens that the full model verifies, so a wrong compiled layer could cost
acceptance, never output; the check keeps it from costing that silently.

Host-free: plain torch; `vllm_clasp.vllm.decoder_stack` binds it to vLLM's layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger("vllm.clasp")

COMPILED = "compiled"
EAGER = "eager"


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the compiled-vs-eager check: fused kernels reorder sums."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


class CompiledLayers:
    """`run(index, *args)` = `call(layers[index], *args)`, compiled once for all layers.

    call: (layer, *tensors) -> tensor, the eager function (e.g. a decoder layer's forward
    on the residual stream). backend / options: `torch.compile`'s. After a fall-back `path`
    is EAGER and `reason` says why; `compiled_calls` counts calls that ran compiled.
    """

    def __init__(self, call: Callable[..., torch.Tensor], layers: list[torch.nn.Module], *,
                 backend: str = "inductor", options: dict | None = None):
        self.call = call
        self.layers = layers
        self.backend = backend
        self.path = COMPILED
        self.reason: str | None = None
        self.compiled_calls = 0
        self._checked: set[int] = set()
        self._compiled = torch.compile(call, backend=backend, options=options or None,
                                       dynamic=True)

    def run(self, index: int, *args: torch.Tensor) -> torch.Tensor:
        layer = self.layers[index]
        out = None if self.path == EAGER else self._try_compiled(index, args)
        if out is None:
            return self.call(layer, *args)
        if index not in self._checked:
            # Layer calls that write K/V write the same values into the same slots again.
            reference = self.call(layer, *args)
            scale = float(reference.abs().max()) or 1.0
            error = float((out - reference).abs().max()) / scale
            if not error <= tolerance(reference.dtype):  # also catches NaN
                self.fall_back(f"layer {index}'s compiled output differs from eager "
                               f"(max error {error:.2e} of the output's scale)")
                return reference
            self._checked.add(index)
        self.compiled_calls += 1
        return out

    def warm(self, *args: torch.Tensor) -> None:
        """Compile for these arguments' shape class on the first layer, unchecked (dummy
        inputs need not give meaningful outputs); a failure falls back to eager."""
        if self.path != EAGER:
            self._try_compiled(0, args)

    def _try_compiled(self, index: int, args: tuple) -> torch.Tensor | None:
        """The compiled call, or None after a failed trace or compile (eager from now on)."""
        try:
            return self._compiled(self.layers[index], *args)
        except Exception as error:
            self.fall_back(f"compiling layer {index} failed: {type(error).__name__}: {error}")
            return None

    def fall_back(self, reason: str) -> None:
        if self.path == EAGER:
            return
        self.path, self.reason = EAGER, reason
        logger.warning("CLaSp: draft layers now run eagerly: %s", reason)
