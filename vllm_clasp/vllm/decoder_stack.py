"""The loaded target model seen as a stack of decoder layers the draft can run a subset of.

No weights are copied and no host forward code is duplicated: the draft calls the target's
own embedding, decoder layers, final norm and LM head. Layers are called with `residual=None`
on the residual stream x (= hidden + residual in vLLM's fused-add convention), so a skipped
layer is the identity on x and rows of a batch can skip different layers.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from vllm_clasp.core.layer_compile import COMPILED, CompiledLayers


class UnsupportedModelError(ValueError):
    pass


def _layer_on_stream(layer: nn.Module, positions: torch.Tensor,  # [n]
                     stream: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, d]
    """A decoder layer on the residual stream x: its output stream is hidden + residual."""
    hidden, residual = layer(positions, stream, None)
    return hidden + residual


def _embedding_rewrites(inner: nn.Module) -> list[str]:
    """Statements of the decoder stack's forward that change the embeddings after
    `embed_input_ids` and before the layers (e.g. Granite's `hidden_states *=
    embedding_multiplier`): the draft embeds with `embed_input_ids` alone, so such a model
    would draft from different inputs than it verifies with. [] when none (or no source)."""
    import ast
    import textwrap

    try:
        source = textwrap.dedent(inspect.getsource(type(inner).forward))
    except (OSError, TypeError):
        return []
    body = ast.parse(source).body[0].body
    embedded: set[str] = set()
    found: list[str] = []

    def visit(statements) -> bool:  # False once the layer loop is reached
        for node in statements:
            if isinstance(node, (ast.For, ast.While)):
                return False
            if isinstance(node, ast.If):
                if not visit(node.body) or not visit(node.orelse):
                    return False
                continue
            if isinstance(node, ast.Assign) and "embed_input_ids" in ast.unparse(node.value):
                embedded.update(t.id for t in node.targets if isinstance(t, ast.Name))
                continue
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AugAssign) else [])
            if any(isinstance(t, ast.Name) and t.id in embedded for t in targets):
                value = node.value
                rewrites = isinstance(node, ast.AugAssign) or any(
                    isinstance(n, ast.Name) and n.id in embedded for n in ast.walk(value))
                if rewrites:
                    found.append(ast.unparse(node))
        return True

    visit(body)
    return found


def _attention_layer_names(layer: nn.Module) -> list[str]:
    from vllm.model_executor.layers.attention.attention import Attention

    return [m.layer_name for m in layer.modules() if isinstance(m, Attention)]


class DecoderStack:
    def __init__(self, model: nn.Module):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        missing = [
            name for name, ok in (
                ("model.model", inner is not None),
                ("model.model.layers", layers is not None),
                ("model.model.embed_input_ids", hasattr(inner, "embed_input_ids")),
                ("model.model.norm", hasattr(inner, "norm")),
                ("model.compute_logits", hasattr(model, "compute_logits")),
            ) if not ok
        ]
        if missing:
            raise UnsupportedModelError(
                f"CLaSp cannot draft with {type(model).__name__}: it needs a Llama-style "
                f"decoder stack, missing {', '.join(missing)}"
            )
        start, end = getattr(inner, "start_layer", 0), getattr(inner, "end_layer", len(layers))
        if start != 0 or end != len(layers):
            raise UnsupportedModelError(
                "CLaSp needs every decoder layer on this rank (no pipeline parallelism)"
            )
        parameters = list(inspect.signature(layers[0].forward).parameters)
        if parameters[:3] != ["positions", "hidden_states", "residual"]:
            raise UnsupportedModelError(
                f"CLaSp cannot draft with {type(layers[0]).__name__}: its forward takes "
                f"{parameters}, not (positions, hidden_states, residual)"
            )
        rewrites = _embedding_rewrites(inner)
        if rewrites:
            raise UnsupportedModelError(
                f"CLaSp cannot draft with {type(model).__name__}: its forward changes the "
                f"embeddings outside embed_input_ids ({'; '.join(rewrites)}), which the draft "
                "would not apply"
            )
        self.model = model
        self.inner = inner
        self.layers = list(layers)
        self.attention_names = [_attention_layer_names(layer) for layer in self.layers]
        if any(len(names) != 1 for names in self.attention_names):
            raise UnsupportedModelError(
                "CLaSp expects exactly one attention layer per decoder layer"
            )
        self.all_attention_names = [names[0] for names in self.attention_names]
        self._head_weight = None  # [V', d] when the draft head covers token ids [0, V') only
        self.compiled: CompiledLayers | None = None  # set by compile_layers()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_weights(self) -> list[float]:
        """[L] each decoder layer's weight count on this rank: what a memory-bound pass
        reads, the cost model of the choice of M."""
        return [float(sum(p.numel() for p in layer.parameters())) for layer in self.layers]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, d]
        return self.inner.embed_input_ids(token_ids)

    def run_layer(
        self, index: int, positions: torch.Tensor, stream: torch.Tensor  # [n], [n, d]
    ) -> torch.Tensor:  # [n, d]
        if self.compiled is not None:
            return self.compiled.run(index, positions, stream)
        return _layer_on_stream(self.layers[index], positions, stream)

    @property
    def runs_compiled(self) -> bool:
        return self.compiled is not None and self.compiled.path == COMPILED

    def compile_layers(self, backend: str, options: dict | None) -> None:
        """Run every layer call (drafts and the DP) through one `torch.compile`d function
        (`core.layer_compile`): compiled on first use per shape class, checked against eager
        per layer."""
        self.compiled = CompiledLayers(_layer_on_stream, self.layers, backend=backend,
                                       options=options)

    def final_norm(self, stream: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, d]
        out = self.inner.norm(stream)
        return out[0] if isinstance(out, tuple) else out

    def draft_logits(self, normed: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, V']
        """Logits over the draft vocabulary: all tokens, or token ids [0, V') if set."""
        if self._head_weight is None:
            return self.model.compute_logits(normed)
        return torch.nn.functional.linear(normed, self._head_weight)

    def use_draft_vocab(self, draft_vocab_size: int) -> bool:
        """Draft over token ids [0, draft_vocab_size) when the head is a plain matrix."""
        from vllm.distributed import get_tensor_model_parallel_world_size

        model = self.model
        processor = getattr(model, "logits_processor", None)
        plain = (
            get_tensor_model_parallel_world_size() == 1
            and processor is not None
            and getattr(processor, "scale", 1.0) == 1.0
            and getattr(processor, "soft_cap", None) is None
            and getattr(getattr(model, "lm_head", None), "bias", None) is None
            and hasattr(getattr(model, "lm_head", None), "weight")
        )
        if not plain:
            # A sharded, scaled or soft-capped head: keep vLLM's own logits path.
            return False
        self._head_weight = model.lm_head.weight[:draft_vocab_size]  # [V', d] view, no copy
        return True
