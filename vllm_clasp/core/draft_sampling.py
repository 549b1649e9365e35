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
