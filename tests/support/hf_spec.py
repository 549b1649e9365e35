"""Greedy self-speculative decoding with layer-skip drafts, on a Hugging Face Llama-style model
(reference for measurements and tests; host-free, no vLLM).

Greedy verification accepts a draft token exactly when it equals the full model's greedy
token, so the full model's greedy continuation ``y`` (computed once) decides every round; no
verify pass is needed. What a round needs is the draft: the layer-skipped stack run token by
token from the last committed token, attending at each executed layer to the *full* model's
K/V of the committed context (what vLLM's paged cache holds after verification) and to the
draft tokens' own K/V. ``ContextKV`` is that cache: the full model's K/V of ``prompt + y``,
cut at the committed length, plus the draft's own entries. Skipped layers are never called,
and since every draft token of a round skips the same layers, each layer's draft entries
line up with its queries.

The decoder layers are transformers' own (``LlamaDecoderLayer.forward`` with a
``past_key_values`` whose ``update(k, v, layer_idx)`` returns the keys and values to attend
to), written against transformers 5.x as ``tests.support.hf_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["ContextKV", "greedy_continuation", "draft_tokens", "Rounds", "speculate"]


class ContextKV:
    """The full model's per-layer K/V of a token sequence, cut at ``length``, plus the draft's
    own K/V appended by the layers the draft executes (the ``Cache.update`` protocol)."""

    def __init__(self, model, ids: torch.Tensor):
        """ids: [T] long. Runs one full forward over them to record every layer's K/V."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(ids.reshape(1, -1), past_key_values=cache, use_cache=True)
        self.keys = [layer.keys for layer in cache.layers]  # L x [1, kv_heads, T, head_dim]
        self.values = [layer.values for layer in cache.layers]  # L x [1, kv_heads, T, head_dim]
        self.length = ids.numel()
        self._draft: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def start_round(self, length: int) -> None:
        """Attend to the first ``length`` positions of the full model's K/V; forget drafts."""
        self.length = length
        self._draft = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        """key, value: [1, kv_heads, 1, head_dim] of one draft token at layer layer_idx ->
        (keys, values) [1, kv_heads, length + drafted, head_dim] to attend to."""
        entries = self._draft.setdefault(layer_idx, [])
        entries.append((key, value))
        keys = torch.cat([self.keys[layer_idx][:, :, :self.length]] + [k for k, _ in entries], dim=2)
        values = torch.cat([self.values[layer_idx][:, :, :self.length]] + [v for _, v in entries], dim=2)
        return keys, values


@torch.inference_mode()
def greedy_continuation(model, prompt: torch.Tensor, max_new_tokens: int,
                        eos_token_id: int | None = None) -> torch.Tensor:
    """[N] long: the full model's greedy tokens after prompt [P] (N <= max_new_tokens; stops
    after EOS)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(prompt.reshape(1, -1), past_key_values=cache, use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token == eos_token_id:
            break
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    return torch.tensor(tokens, dtype=torch.long)


@torch.inference_mode()
def draft_tokens(model, kv: ContextKV, first_token: int, position: int, skip_mask: torch.Tensor,
                 num_tokens: int, until_mismatch: list[int] | None = None) -> list[int]:
    """Greedy layer-skip draft: ``num_tokens`` tokens after ``first_token`` at ``position``.

    kv must be cut at ``position`` (``kv.start_round(position)``). skip_mask: [L] bool.
    until_mismatch: the tokens verification will accept; drafting stops after the first
    draft token that differs (later ones cannot be accepted), so fewer may come back.
    """
    inner = model.model
    executed = [i for i, skip in enumerate(skip_mask.tolist()) if not skip]
    token, out = first_token, []
    for step in range(num_tokens):
        h = inner.embed_tokens(torch.tensor([[token]]))  # [1, 1, d]
        pos = torch.tensor([[position + step]])  # [1, 1]
        pe = inner.rotary_emb(h, pos)
        for i in executed:
            h = inner.layers[i](h, attention_mask=None, position_ids=pos, past_key_values=kv,
                                use_cache=True, position_embeddings=pe)
            h = h[0] if isinstance(h, tuple) else h
        token = int(model.lm_head(inner.norm(h))[0, -1].argmax())
        out.append(token)
        if until_mismatch is not None and token != until_mismatch[step]:
            break
    return out


@dataclass
class Rounds:
    """Outcome of one speculated continuation."""

    accepted: list[int] = field(default_factory=list)  # per round: draft tokens accepted
    skip_masks: list[torch.Tensor] = field(default_factory=list)  # per DP run: [L] bool

    @property
    def tau(self) -> float:
        """Mean acceptance length: tokens committed per round (accepted drafts + 1)."""
        return sum(a + 1 for a in self.accepted) / max(1, len(self.accepted))


def speculate(model, prompt: torch.Tensor, continuation: torch.Tensor, kv: ContextKV,
              choose_skip_mask: Callable[[int], torch.Tensor], num_draft_tokens: int,
              loi: int) -> Rounds:
    """Replay greedy speculative decoding of ``continuation`` [N] after ``prompt`` [P].

    kv: ContextKV over ``cat(prompt, continuation)``. choose_skip_mask(length) -> [L] bool is
    called on round 0 and every ``loi`` rounds with the committed length whose last token is
    the last accepted one (the DP's token, as in the engine). Each round drafts up to
    ``num_draft_tokens`` tokens (never past the continuation) and accepts the prefix equal to
    the continuation; the full model's next token then commits as the round's bonus token.
    """
    P, N = prompt.numel(), continuation.numel()
    rounds, a, mask = Rounds(), 0, None  # continuation[a] is the newest committed token
    while a < N - 1:
        if len(rounds.accepted) % loi == 0:
            mask = choose_skip_mask(P + a)
            rounds.skip_masks.append(mask)
        k = min(num_draft_tokens, N - 1 - a)
        kv.start_round(P + a)
        expected = continuation[a + 1:a + 1 + k].tolist()
        drafts = draft_tokens(model, kv, int(continuation[a]), P + a, mask, k, expected)
        n = 0
        while n < len(drafts) and drafts[n] == expected[n]:
            n += 1
        rounds.accepted.append(n)
        a += n + 1
    return rounds
