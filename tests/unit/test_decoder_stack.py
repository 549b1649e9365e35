"""DecoderStack's structural checks that need no engine: embeddings must come from
`embed_input_ids` alone (a model that rescales them in its forward would draft from other
inputs than it verifies with)."""

from __future__ import annotations

from torch import nn

from vllm_clasp.vllm.decoder_stack import _embedding_rewrites


class LlamaLike(nn.Module):
    def forward(self, input_ids, positions, intermediate_tensors, inputs_embeds=None):
        if intermediate_tensors is None:
            if inputs_embeds is not None:
                hidden_states = inputs_embeds
            else:
                hidden_states = self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
            hidden_states = hidden_states * 2  # after the layers started: not an embedding rewrite
        return hidden_states


class GraniteLike(LlamaLike):
    def forward(self, input_ids, positions, intermediate_tensors, inputs_embeds=None):
        if intermediate_tensors is None:
            hidden_states = self.embed_input_ids(input_ids)
            hidden_states *= self.config.embedding_multiplier
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return hidden_states


class ScaledByAssignment(LlamaLike):
    def forward(self, input_ids, positions, intermediate_tensors, inputs_embeds=None):
        h = self.embed_input_ids(input_ids)
        h = h * self.scale + 0
        for layer in self.layers:
            h, r = layer(positions, h, None)
        return h


def test_embeddings_used_as_made_are_fine():
    assert _embedding_rewrites(LlamaLike()) == []


def test_embeddings_rescaled_in_the_forward_are_found():
    assert _embedding_rewrites(GraniteLike()) == [
        "hidden_states *= self.config.embedding_multiplier"]
    assert _embedding_rewrites(ScaledByAssignment()) == ["h = h * self.scale + 0"]


def test_a_forward_without_source_is_not_refused():
    """Classes made at run time (no source file) cannot be read: not refused for that."""
    made = type("Made", (nn.Module,), {})
    exec("def forward(self, x):\n    h = self.embed_input_ids(x)\n    h *= 3\n    return h",
         globals(), namespace := {})
    made.forward = namespace["forward"]
    assert _embedding_rewrites(made()) == []
