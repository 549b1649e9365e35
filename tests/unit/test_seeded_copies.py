"""`core.seeded_copies`: a seeded request copies while its own tokens say copies pay; the
record is a function of those tokens alone (host-free)."""

from __future__ import annotations

import random

import numpy as np

from vllm_clasp.core.seeded_copies import MIN_HIT_RATE, MIN_TRIALS, SeededCopyRecord


def _replayed(tokens, prompt, steps) -> SeededCopyRecord:
    record = SeededCopyRecord(max_ngram=3, min_ngram=3)
    for end in steps:
        record.update("r", np.asarray(tokens[:end]), prompt)
    return record


def test_the_record_depends_on_the_tokens_only():
    """Fed one token at a time, in uneven chunks, or all at once (a request resumed after
    preemption is replayed from scratch): the same hits and trials."""
    rng = random.Random(0)
    tokens = [rng.randrange(3) for _ in range(300)]
    prompt = 20
    one = _replayed(tokens, prompt, range(prompt + 1, len(tokens) + 1))
    chunks = _replayed(tokens, prompt, [prompt + 1, 57, 58, 140, 141, 300])
    whole = _replayed(tokens, prompt, [300])
    assert one._records["r"] == chunks._records["r"] == whole._records["r"]
    assert whole._records["r"][2] > MIN_TRIALS  # a small alphabet repeats n-grams often


def test_copies_stop_where_they_miss_and_go_on_where_they_hit():
    repeating = [1, 2, 3, 4] * 10  # the lookup predicts every next token
    assert _replayed(repeating, 4, [40]).pays("r")
    rng = random.Random(1)
    noisy = [1, 2, 3, 4] + [rng.choice([1, 2]) for _ in range(200)]
    record = _replayed(noisy, 4, [204])
    hits, trials = record._records["r"][1:]
    assert trials >= MIN_TRIALS
    assert record.pays("r") == (hits >= MIN_HIT_RATE * trials)
    missing = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3, 7, 1, 2, 3, 6, 1, 2, 3, 5, 1, 2, 3]
    record = _replayed(missing, 3, [len(missing)])
    assert record._records["r"][2] >= MIN_TRIALS and not record.pays("r")
    assert SeededCopyRecord(3, 3).pays("unknown")  # no trials yet: copy


def test_the_planner_stops_copying_for_a_seeded_request_whose_copies_miss():
    from vllm_clasp.core.options import ClaspOptions
    from vllm_clasp.core.planner import StepInputs, StepPlanner

    options = ClaspOptions(copy_source="ngram", prompt_lookup_max=3, prompt_lookup_min=3,
                           max_model_draft_tokens=0).resolve(num_layers=3, vocab_size=100)
    planner = StepPlanner(options)
    # "1 2 3" was followed by a different token each time: the lookup keeps missing.
    row = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3, 7, 1, 2, 3, 6, 1, 2, 3, 5, 1, 2, 3]

    def plan(seeded):
        return planner.plan(StepInputs(
            req_ids=["a"], token_ids=np.array([row]), num_tokens=np.array([len(row)]),
            num_sampled=[1], max_draft=np.array([8]), num_prompt_tokens=np.array([3]),
            seeded=frozenset(seeded)))

    assert 0 in plan(seeded=()).copied  # unseeded: the budget decides (verify all, no fit)
    planner.forget(["a"])
    assert 0 not in plan(seeded={0}).copied
