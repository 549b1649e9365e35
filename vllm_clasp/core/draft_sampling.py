"""Choosing draft tokens from draft logits (host-free).

Greedy requests draft the argmax. Sampled requests draft x ~ q with q = softmax(logits / T),
and q is handed to vLLM's rejection sampler, which accepts x with probability
min(1, p(x) / q(x)) and otherwise resamples from max(p - q, 0): the output distribution is
the target's p exactly (Leviathan et al., 2023), with the best acceptance any q allows.
Seeded requests draw from their own generator, so a seed reproduces its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLING_EPS = 1e-5  # vLLM's threshold below which a temperature means greedy


@dataclass
class DraftSample:
    token_ids: torch.Tensor  # [n] int64
    top1_prob: torch.Tensor  # [n] float32: the draft's confidence, for the exit threshold
    probs: torch.Tensor  # [n, vocab] float32: q per row (temperature applied; T=1 for greedy)


def sample_draft_tokens(
    logits: torch.Tensor,  # [n, vocab]
    temperature: torch.Tensor | None,  # [n] float32, None when every row is greedy
    generators: dict[int, torch.Generator] | None = None,  # row -> generator
) -> DraftSample:
    logits = logits.float()
    if temperature is None:
        probs = torch.softmax(logits, dim=-1)
        top1_prob, token_ids = probs.max(dim=-1)
        return DraftSample(token_ids, top1_prob, probs)

    is_greedy = temperature < SAMPLING_EPS  # [n]
    safe_temperature = torch.where(is_greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits / safe_temperature.unsqueeze(1), dim=-1)  # [n, vocab]

    # Exponential race: argmax(q / E) with E ~ Exp(1) is a sample from q.
    noise = torch.empty_like(probs).exponential_()
    for row, generator in (generators or {}).items():
        noise[row].exponential_(generator=generator)
    sampled = (probs / noise).argmax(dim=-1)
    greedy = probs.argmax(dim=-1)
    token_ids = torch.where(is_greedy, greedy, sampled)
    top1_prob = probs.max(dim=-1).values
    return DraftSample(token_ids, top1_prob, probs)


def rejection_sampler_probs(
    num_rows: int,
    vocab_size: int,
    model_rows: list[int],  # [R] batch rows that drafted with the model
    model_probs: torch.Tensor | None,  # [R, k_model, V'] float32 (V' <= vocab_size) or None
    copied: dict,  # batch row -> copied draft tokens (int array)
    device=None,
) -> torch.Tensor:
    """q [num_rows, k, vocab_size] float32 for vLLM's rejection sampler (`RejectionSampler`
    reads row i's first len(draft_i) positions; k is the longest draft, at least 1).

    Model drafts keep their draft distributions (zero beyond a draft head's V' tokens);
    a copied draft is deterministic, so its q is a point mass on each copied token."""
    k = max([model_probs.shape[1] if model_probs is not None else 0,
             *(len(d) for d in copied.values())] or [0])
    q = torch.zeros(num_rows, max(k, 1), vocab_size, dtype=torch.float32, device=device)
    if model_probs is not None:
        q[torch.tensor(model_rows, device=device), : model_probs.shape[1],
          : model_probs.shape[-1]] = model_probs
    for i, draft in copied.items():
        tokens = torch.as_tensor(draft, dtype=torch.long).to(device)
        q[i, torch.arange(len(tokens), device=device), tokens] = 1.0
    return q
