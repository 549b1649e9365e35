"""CLaSp DP inputs from a Hugging Face Llama-style model (reference / tests; host-free, no vLLM).

Expects ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``
(``LlamaForCausalLM`` and its look-alikes). The code that depends on the transformers version is
confined to ``_layer_call`` and ``_causal_mask`` (written against transformers 5.x, where
``LlamaDecoderLayer.forward(hidden, attention_mask=, position_ids=, position_embeddings=)``
returns a tensor).

Residual stream: every state here is the raw residual stream, hidden + residual, before
``model.model.norm``. HF's ``output_hidden_states[-1]`` comes after the final norm, so it is not
``h_L``. We run the layers ourselves, so this module never reads ``output_hidden_states``.

Candidates at the last position attend to the *full* model's prefix states at the same layer.
This matches self-speculative drafting, where the context's KV cache comes from the verify
pass. There are two equivalent ways to compute this:

* ``mode="batch"``: one batch row per candidate, ``[prefix states at layer i, candidate]``,
  with an ordinary causal mask. This is the simplest correct form: it recomputes the prefix
  K/V once per row.
* ``mode="packed"``: the paper's sequence-parallel layout. There is one sequence,
  ``[prefix, cand_1 .. cand_n]``. Every candidate sits at position T-1 and, through a 4D mask,
  sees the prefix and itself only. Only the eager and sdpa attention implementations support it.

``own_kv`` chooses what a candidate sees at its own position T-1:

* ``"candidate"`` (default): its own K/V. This is the paper's (diagonal) mask, and what a
  real draft token sees.
* ``"full"``: the full model's cached K/V for that token, and not its own. This is what a
  read-only query on vLLM's paged cache at position T-1 gets (``paged_rows``). It implies
  ``mode="packed"``.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["full_stream", "LastTokenContext", "build_dp_inputs", "skipped_forward_logits",
           "logits_from_stream"]


def _parts(model):
    inner = model.model
    return inner, inner.layers, inner.embed_tokens, inner.norm, inner.rotary_emb


def _layer_call(layer, hidden, mask, position_ids, position_embeddings):
    """hidden [N, T, d] -> [N, T, d] (transformers-version-specific call, as LlamaModel.forward)."""
    out = layer(hidden, attention_mask=mask, position_ids=position_ids,
                position_embeddings=position_embeddings, past_key_values=None, use_cache=False)
    return out[0] if isinstance(out, tuple) else out


def _causal_mask(model, hidden, position_ids):
    from transformers.masking_utils import create_causal_mask
    return create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=position_ids)


@torch.inference_mode()
def full_stream(model, input_ids: torch.Tensor, skip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[L+1, T, d] pre-norm residual stream at every position (skipped layers copy their input).

    input_ids: [T] long. skip_mask: [L] bool or None.
    """
    inner, layers, embed, _, rotary = _parts(model)
    ids = input_ids.reshape(1, -1).to(embed.weight.device)  # [1, T]
    h = embed(ids)  # [1, T, d]
    pos = torch.arange(ids.shape[1], device=h.device)[None]  # [1, T]
    pe = rotary(h, pos)  # (cos, sin) [1, T, hd]
    mask = _causal_mask(model, h, pos)
    out = [h[0]]
    for i, layer in enumerate(layers):
        if skip_mask is None or not bool(skip_mask[i]):
            h = _layer_call(layer, h, mask, pos, pe)
        out.append(h[0])
    return torch.stack(out)  # [L+1, T, d]


@torch.inference_mode()
def logits_from_stream(model, states: torch.Tensor) -> torch.Tensor:
    """[..., d] pre-norm residual stream -> [..., V] logits (final norm + lm_head)."""
    return model.lm_head(model.model.norm(states))


@torch.inference_mode()
def skipped_forward_logits(model, input_ids: torch.Tensor, skip_mask: torch.Tensor) -> torch.Tensor:
    """[T, V] logits of the model with the layers in skip_mask [L] bool skipped for EVERY token
    (the whole context too; eager, for tests). Compare ``LastTokenContext.draft_state`` which skips
    them only for the last token, attending to the full model's context."""
    return logits_from_stream(model, full_stream(model, input_ids, skip_mask)[-1])


class LastTokenContext:
    """Trajectories of the last token of B contexts and a matching ``run_layer``.

    trajectory: [L+1, B, d] pre-norm stream of each context's last token (the DP's target).
    run_layer(i, states [N, d], request_rows [N]) -> [N, d]: layer i on candidates placed at the
    last position of context request_rows[r], attending to the full model's prefix states (and
    at their own position to themselves, or with own_kv="full" to the full model's K/V).
    layer_calls counts run_layer calls.
    """

    def __init__(self, model, contexts: Sequence[torch.Tensor], mode: str = "batch",
                 own_kv: str = "candidate"):
        if mode not in ("batch", "packed"):
            raise ValueError(f"mode must be 'batch' or 'packed', got {mode!r}")
        if own_kv not in ("candidate", "full"):
            raise ValueError(f"own_kv must be 'candidate' or 'full', got {own_kv!r}")
        packed_ok = model.config._attn_implementation in ("eager", "sdpa")  # custom 4D mask
        if own_kv == "full":
            if not packed_ok:
                raise ValueError("own_kv='full' needs the eager or sdpa attention implementation")
            mode = "packed"
        elif mode == "packed" and not packed_ok:
            mode = "batch"
        self.model, self.mode, self.own_kv = model, mode, own_kv
        self.streams = [full_stream(model, c) for c in contexts]  # B x [L+1, T_b, d]
        self.trajectory = torch.stack([s[:, -1] for s in self.streams], dim=1)  # [L+1, B, d]
        self.num_layers = self.trajectory.shape[0] - 1
        self.layer_calls = 0

    @torch.inference_mode()
    def run_layer(self, layer_index: int, states: torch.Tensor, request_rows: torch.Tensor) -> torch.Tensor:
        self.layer_calls += 1
        out = torch.empty_like(states)  # [N, d]
        for r in torch.unique(request_rows).tolist():
            idx = (request_rows == r).nonzero()[:, 0]  # [n]
            stream = self.streams[r][layer_index]  # [T, d] layer-i inputs of the full model
            out[idx] = self._run_one(layer_index, states[idx], stream)
        return out

    def _run_one(self, i: int, cand: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
        """cand [n, d], stream [T, d] (full model's layer-i inputs of tokens 0..T-1) -> [n, d]."""
        _, layers, _, _, rotary = _parts(self.model)
        n, d = cand.shape
        own = self.own_kv == "candidate"
        prefix = stream[:-1] if own else stream  # [P, d]; P = T-1 or T (own position's full K/V)
        P, T = prefix.shape[0], stream.shape[0]
        cand = cand.to(prefix.dtype)
        if self.mode == "batch":
            x = torch.cat([prefix[None].expand(n, P, d), cand[:, None]], dim=1)  # [n, P+1, d]
            pos = torch.arange(P + 1, device=x.device)[None]  # [1, P+1]
            mask = _causal_mask(self.model, x, pos)
            return _layer_call(layers[i], x, mask, pos, rotary(x, pos))[:, -1]  # [n, d]
        x = torch.cat([prefix, cand])[None]  # [1, P+n, d]
        pos = torch.cat([torch.arange(P), torch.full((n,), T - 1)]).to(x.device)[None]  # [1, P+n]
        q = torch.arange(P + n, device=x.device)
        # Causal within the prefix; a candidate sees the prefix and (if own) itself.
        allowed = (q[None] <= q[:, None]) & ((q[None] < P) | ((q[None] == q[:, None]) & own))  # [Q, K]
        if self.model.config._attn_implementation == "sdpa":
            mask = allowed[None, None]  # [1, 1, Q, K] bool, True = attend
        else:
            neg = torch.finfo(x.dtype).min
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, neg)[None, None]
        return _layer_call(layers[i], x, mask, pos, rotary(x, pos))[0, P:]  # [n, d]

    @torch.inference_mode()
    def draft_state(self, skip_mask: torch.Tensor, requests: torch.Tensor | None = None) -> torch.Tensor:
        """[K, d] pre-norm top state of a last token under each skip set, running only the executed
        layers on it while the context stays the full model's (what a self-speculative draft sees,
        given an own_kv="candidate" context).

        skip_mask: [K, L] or [L] bool. requests: [K] long context index per row; default
        arange(B) when K == B, else all rows on context 0 (needs B == 1).
        """
        sm = skip_mask.reshape(-1, self.num_layers)  # [K, L]
        K, B = sm.shape[0], self.trajectory.shape[1]
        if requests is None:
            if K != B and B != 1:
                raise ValueError(f"{K} skip sets for {B} contexts: pass requests")
            requests = torch.arange(K) if K == B else torch.zeros(K, dtype=torch.long)
        h = self.trajectory[0, requests].clone()  # [K, d]
        for i in range(self.num_layers):
            run = ~sm[:, i]  # [K]
            if run.any():
                h[run] = self.run_layer(i, h[run], requests[run])
        return h


def build_dp_inputs(model, contexts: Sequence[torch.Tensor], mode: str = "batch"):
    """-> (trajectory [L+1, B, d], run_layer) for ``optimizer.search_skip_sets``."""
    ctx = LastTokenContext(model, contexts, mode)
    return ctx.trajectory, ctx.run_layer
