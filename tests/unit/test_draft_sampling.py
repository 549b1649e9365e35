"""Tests of vllm_clasp.core.draft_sampling.sample_draft_tokens (host-free).

Statistical tests use a fixed seed and a chi-square goodness-of-fit test at alpha = 1e-3: were
the sampler correct and the seed drawn at random, each such test would fail with probability
1e-3 (the false-alarm rate); with the fixed seed the outcome is deterministic. Each test also
checks that the same counts *reject* a wrong distribution, so it has power.
"""

from __future__ import annotations

import pytest
import numpy as np
import torch

from vllm_clasp.core.draft_sampling import SAMPLING_EPS, DraftSample, sample_draft_tokens

scipy_stats = pytest.importorskip("scipy.stats")

ALPHA = 1e-3
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])  # [V=7]


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed `counts` [V] against expected probabilities `probs` [V]."""
    counts = counts.double()
    expected = probs.double() / probs.double().sum() * counts.sum()
    assert float(expected.min()) >= 5, "too few draws for a chi-square test"
    return float(scipy_stats.chisquare(counts.numpy(), expected.numpy()).pvalue)


# --------------------------------------------------------------------------- greedy


def test_all_greedy_is_argmax_with_softmax_top1():
    torch.manual_seed(0)
    logits = torch.randn(16, 50) * 3  # [n, V]
    sample = sample_draft_tokens(logits, temperature=None)
    assert isinstance(sample, DraftSample)
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(sample.token_ids, logits.argmax(dim=-1))
    assert sample.token_ids.dtype == torch.int64
    torch.testing.assert_close(sample.top1_prob, probs.max(dim=-1).values)
    assert sample.top1_prob.dtype == torch.float32
    torch.testing.assert_close(sample.probs, probs)
    assert sample.probs.shape == (16, 50)


def test_greedy_is_deterministic_and_ignores_generators():
    logits = torch.randn(4, 30)
    generators = {0: torch.Generator().manual_seed(1)}
    first = sample_draft_tokens(logits, None, generators)
    second = sample_draft_tokens(logits, None)
    assert torch.equal(first.token_ids, second.token_ids)


def test_half_precision_logits_give_float32_outputs():
    logits = torch.randn(3, 20).half()
    for temperature in (None, torch.tensor([0.0, 0.8, 1.0])):
        sample = sample_draft_tokens(logits, temperature)
        assert sample.top1_prob.dtype == torch.float32
        assert sample.probs.dtype == torch.float32


# --------------------------------------------------------------------------- sampled


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_sampled_rows_follow_softmax_over_temperature(temperature):
    """Chi-square goodness of fit of 40k draws against q = softmax(logits / T)."""
    torch.manual_seed(1234)
    n = 40_000
    logits = LOGITS.expand(n, -1).clone()  # [n, V]: one draw per row
    sample = sample_draft_tokens(logits, torch.full((n,), temperature))
    q = torch.softmax(LOGITS / temperature, dim=-1)
    counts = torch.bincount(sample.token_ids, minlength=len(LOGITS))
    assert chi_square_p(counts, q) > ALPHA, (counts, q * n)
    # Power: the same counts reject q at a clearly different temperature.
    wrong = torch.softmax(LOGITS / (temperature * 1.3), dim=-1)
    assert chi_square_p(counts, wrong) < ALPHA
    # The probabilities handed to the rejection sampler are exactly q, rows summing to 1.
    torch.testing.assert_close(sample.probs[0], q)
    torch.testing.assert_close(sample.probs.sum(dim=-1), torch.ones(n))
    torch.testing.assert_close(sample.top1_prob, q.max().expand(n))


def test_seeded_row_follows_softmax_over_temperature():
    """Successive draws from one request's own generator follow q too."""
    temperature = 0.8
    generator = torch.Generator().manual_seed(7)
    logits = LOGITS.unsqueeze(0)  # [1, V]
    tokens = [
        int(sample_draft_tokens(logits, torch.tensor([temperature]), {0: generator}).token_ids)
        for _ in range(6000)
    ]
    counts = torch.bincount(torch.tensor(tokens), minlength=len(LOGITS))
    q = torch.softmax(LOGITS / temperature, dim=-1)
    assert chi_square_p(counts[:5], q[:5]) > ALPHA  # the last two have expected counts < 5
    assert chi_square_p(counts[:5], torch.softmax(LOGITS / 1.2, dim=-1)[:5]) < ALPHA


def test_zero_probability_tokens_are_never_drawn():
    torch.manual_seed(3)
    logits = torch.tensor([0.0, float("-inf"), 1.0, float("-inf")]).expand(5000, -1)
    sample = sample_draft_tokens(logits, torch.full((5000,), 1.0))
    assert set(sample.token_ids.unique().tolist()) == {0, 2}


def test_mixed_greedy_and_sampled_rows():
    torch.manual_seed(5)
    n, vocab = 2000, 7
    logits = LOGITS.expand(n, -1).clone()
    temperature = torch.ones(n)
    greedy_rows = torch.arange(0, n, 2)
    temperature[greedy_rows] = 0.0  # vLLM's greedy
    temperature[1::4] = SAMPLING_EPS / 2  # below the epsilon: greedy as well
    sample = sample_draft_tokens(logits, temperature)

    is_greedy = temperature < SAMPLING_EPS
    assert torch.equal(sample.token_ids[is_greedy], LOGITS.argmax().expand(int(is_greedy.sum())))
    sampled_tokens = sample.token_ids[~is_greedy]
    assert len(sampled_tokens) == n // 4
    # Sampled rows really sample (not argmax): several distinct tokens show up.
    assert len(sampled_tokens.unique()) >= 4
    # Greedy rows get q at T = 1 (unused by the rejection sampler but well defined).
    q = torch.softmax(LOGITS, dim=-1)
    torch.testing.assert_close(sample.probs, q.expand(n, vocab))
    torch.testing.assert_close(sample.probs.sum(dim=-1), torch.ones(n))


def test_rows_use_their_own_temperature():
    logits = torch.randn(3, 40)
    temperature = torch.tensor([0.0, 0.5, 2.0])
    sample = sample_draft_tokens(logits, temperature)
    torch.testing.assert_close(sample.probs[0], torch.softmax(logits[0], dim=-1))
    torch.testing.assert_close(sample.probs[1], torch.softmax(logits[1] / 0.5, dim=-1))
    torch.testing.assert_close(sample.probs[2], torch.softmax(logits[2] / 2.0, dim=-1))
    torch.testing.assert_close(sample.top1_prob, sample.probs.max(dim=-1).values)
    torch.testing.assert_close(sample.probs.sum(dim=-1), torch.ones(3))


# --------------------------------------------------------------------------- seeded generators


def _seeded_draws(seed: int, global_seed: int, rows: int = 4, steps: int = 20):
    torch.manual_seed(global_seed)
    logits = torch.zeros(rows, 100)  # uniform q: every draw is informative
    temperature = torch.ones(rows)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        sample = sample_draft_tokens(logits, temperature, {2: generator})
        out.append(sample.token_ids)
    return torch.stack(out)  # [steps, rows]


def test_same_generator_seed_gives_same_tokens():
    first = _seeded_draws(seed=42, global_seed=0)
    # The global RNG differs: only the seeded row (2) must reproduce.
    second = _seeded_draws(seed=42, global_seed=1)
    assert torch.equal(first[:, 2], second[:, 2])
    assert not torch.equal(first[:, 0], second[:, 0])  # unseeded rows do not
    other_seed = _seeded_draws(seed=43, global_seed=0)
    assert not torch.equal(first[:, 2], other_seed[:, 2])


def test_seeded_row_does_not_depend_on_batch_position_or_neighbours():
    generator_a = torch.Generator().manual_seed(9)
    generator_b = torch.Generator().manual_seed(9)
    logits = torch.zeros(5, 100)
    temperature = torch.ones(5)
    alone = sample_draft_tokens(logits[:1], temperature[:1], {0: generator_a}).token_ids[0]
    in_batch = sample_draft_tokens(logits, temperature, {3: generator_b}).token_ids[3]
    assert int(alone) == int(in_batch)


def test_generator_advances_between_draws():
    generator = torch.Generator().manual_seed(11)
    logits = torch.zeros(1, 1000)
    draws = {
        int(sample_draft_tokens(logits, torch.ones(1), {0: generator}).token_ids)
        for _ in range(10)
    }
    assert len(draws) > 1


def test_rejection_sampler_probs_model_and_copied_rows():
    """q for vLLM's rejection sampler: model rows keep their draft distributions (zero past
    the draft head's vocabulary), copied rows are point masses, other rows stay zero."""
    from vllm_clasp.core.draft_sampling import rejection_sampler_probs

    model_probs = torch.softmax(torch.randn(2, 3, 5), dim=-1)  # [R=2, k=3, V'=5]
    q = rejection_sampler_probs(4, 7, [0, 2], model_probs, {3: np.array([6, 1])})
    assert q.shape == (4, 3, 7)
    torch.testing.assert_close(q[[0, 2], :, :5], model_probs)
    assert q[[0, 2], :, 5:].abs().sum() == 0
    assert q[1].abs().sum() == 0
    assert q[3, 0, 6] == 1 and q[3, 1, 1] == 1 and q[3].sum() == 2
    # No drafts at all still gives one position (vLLM indexes [n, >=1, V]).
    assert rejection_sampler_probs(2, 7, [], None, {}).shape == (2, 1, 7)
