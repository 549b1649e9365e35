"""Copied drafts (`core.draft_source`, `suffix_trees`, `ngram_lookup`, `copy_sources`): suffix trees driven as vLLM's `suffix` method drives
them, n-gram lookup, and how the planner uses them (seeded requests, lengths, the knob that
turns layer-skip drafts off). Host-free apart from the one test that runs vLLM's own
SuffixDecodingProposer beside ours."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vllm_clasp.core.draft_source import CopiedDraft
from vllm_clasp.core.ngram_lookup import NGRAM, NgramLookup
from vllm_clasp.core.suffix_trees import SUFFIX, SuffixTrees
from vllm_clasp.core.options import ClaspOptions, SuffixOptions
from vllm_clasp.core.planner import StepInputs, StepPlanner

PROMPT = np.array([7, 1, 2, 3, 4, 5, 6, 9, 9, 9])


def test_suffix_trees_copy_from_the_prompt():
    trees = SuffixTrees(SuffixOptions())
    context = np.concatenate([PROMPT, [1, 2, 3]])  # the output repeats "1 2 3"
    trees.update("a", context, num_prompt_tokens=len(PROMPT))
    draft = trees.propose("a", context, max_draft=4)
    # At most max_spec_factor (1.0) x the matched length (3) tokens.
    assert draft.tokens.tolist() == [4, 5, 6]
    assert len(draft.probs) == 3 and all(0 < p <= 1 for p in draft.probs)
    assert trees.propose("a", context, max_draft=2).tokens.tolist() == [4, 5]
    assert trees.propose("a", context, max_draft=0).tokens.tolist() == []


def test_suffix_trees_copy_from_past_responses_of_other_requests():
    """The global tree: request b's output matches the start of what request a generated,
    though b's own context never contained the rest."""
    response = [11, 12, 13, 14, 15, 16]
    for max_cached, expected in ((10, [14, 15, 16]), (0, [])):
        trees = SuffixTrees(SuffixOptions(max_cached_requests=max_cached))
        a = np.concatenate([[40, 41], response])
        trees.update("a", a[:3], num_prompt_tokens=2)  # one token per step, as decoding does
        for n in range(4, len(a) + 1):
            trees.update("a", a[:n], num_prompt_tokens=2)
        trees.forget(["a"])  # finished: its prompt tree goes, its response stays (if cached)
        b = np.array([50, 51, 11, 12, 13])
        trees.update("b", b, num_prompt_tokens=2)
        assert trees.propose("b", b, max_draft=8).tokens.tolist() == expected, max_cached


def test_suffix_trees_restart_a_preempted_request():
    trees = SuffixTrees(SuffixOptions())
    context = np.concatenate([PROMPT, [1, 2]])
    trees.update("a", context, num_prompt_tokens=len(PROMPT))
    trees.forget(["a"])  # preempted
    trees.update("a", context, num_prompt_tokens=len(PROMPT))  # resumed: started anew
    assert trees.propose("a", context, max_draft=3).tokens.tolist() == [3, 4]
    trees.forget(["a"])  # finished
    assert trees.propose("a", context, max_draft=3).tokens.tolist() == []


def test_ngram_lookup_is_prompt_lookup():
    lookup = NgramLookup(max_ngram=3, min_ngram=2)
    context = np.concatenate([PROMPT, [1, 2, 3]])
    assert lookup.propose("a", context, max_draft=3).tokens.tolist() == [4, 5, 6]


def test_same_drafts_as_vllms_suffix_method():
    """Several requests decoding in turn, finishing and starting: our SuffixTrees gives the
    drafts vLLM's own SuffixDecodingProposer gives for the same tokens."""
    from vllm.v1.spec_decode.suffix_decoding import SuffixDecodingProposer

    rng = np.random.default_rng(0)
    k, depth = 12, 24
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(
            num_speculative_tokens=k, suffix_decoding_max_tree_depth=depth,
            suffix_decoding_max_cached_requests=100, suffix_decoding_max_spec_factor=1.0,
            suffix_decoding_min_token_prob=0.1),
        model_config=SimpleNamespace(max_model_len=10_000))
    theirs = SuffixDecodingProposer(config)
    ours = SuffixTrees(SuffixOptions(max_tree_depth=depth, max_cached_requests=100))
    phrases = [rng.integers(0, 30, size=6) for _ in range(5)]  # text repeats across requests
    compared = nonempty = 0
    for wave in range(3):
        ids = [f"r{wave}-{j}" for j in range(3)]
        seqs = {r: list(np.concatenate([phrases[rng.integers(5)] for _ in range(2)]))
                for r in ids}
        prompts = {r: len(seqs[r]) for r in ids}
        for _ in range(25):
            for r in ids:  # each request samples its next token, mostly continuing a phrase
                phrase = phrases[rng.integers(5)]
                seqs[r].append(int(phrase[rng.integers(6)]) if rng.random() < 0.3
                               else int(phrase[len(seqs[r]) % 6]))
            n = max(len(s) for s in seqs.values())
            batch = SimpleNamespace(
                req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                num_tokens_no_spec=np.array([len(seqs[r]) for r in ids]),
                num_prompt_tokens=np.array([prompts[r] for r in ids]),
                token_ids_cpu=np.array([seqs[r] + [0] * (n - len(seqs[r])) for r in ids],
                                       dtype=np.int32))  # as vLLM's input batch holds them
            sampled = [[seqs[r][-1]] for r in ids]
            expected = theirs.propose(k, batch, sampled)
            for i, r in enumerate(ids):
                context = np.array(seqs[r])
                ours.update(r, context, prompts[r])
                got = ours.propose(r, context, max_draft=k).tokens.tolist()
                assert got == list(expected[i]), (r, got, expected[i])
                compared += 1
                nonempty += bool(got)
        ours.forget(ids)  # the wave finishes (vLLM's proposer stops requests it no longer sees)
    assert nonempty > compared // 4, "the comparison must cover real drafts"


# ------------------------------------------------------------------ the planner with copies


def _planner(**knobs) -> StepPlanner:
    knobs.setdefault("adaptive", False)
    options = ClaspOptions(**knobs).resolve(num_layers=3, vocab_size=100,
                                            num_speculative_tokens=12)
    return StepPlanner(options)


def _inputs(rows: list[list[int]], prompt: int, seeded=(), max_draft: int = 12,
            ids: str = "ab") -> StepInputs:
    n = max(len(r) for r in rows)
    return StepInputs(
        req_ids=list(ids[: len(rows)]),
        token_ids=np.array([r + [0] * (n - len(r)) for r in rows]),
        num_tokens=np.array([len(r) for r in rows]), num_sampled=[1] * len(rows),
        max_draft=np.full(len(rows), max_draft), num_prompt_tokens=np.full(len(rows), prompt),
        seeded=frozenset(seeded))


def test_planner_copies_from_suffix_trees_up_to_k():
    planner = _planner(copy_source="suffix")
    row = list(PROMPT) + list(PROMPT[1:4])  # output repeats "1 2 3"
    plan = planner.plan(_inputs([row], prompt=len(PROMPT)))
    assert plan.copy_source == {0: SUFFIX}
    assert plan.copied[0].tolist() == [4, 5, 6]  # at most the matched length (spec factor 1)
    assert plan.model_rows == []


def _after_a_past_response(copy_source: str):
    """A planner whose suffix trees hold request a's finished response [40..47], and a later
    request's tokens whose end matches that response's start (the trees propose 44, 45, ...;
    its own context does not)."""
    planner = _planner(copy_source=copy_source)
    response = [40, 41, 42, 43, 44, 45, 46, 47]
    for n in range(3, len(response) + 1):
        planner.plan(_inputs([[1, 2] + response[:n]], prompt=2))
    planner.forget(["a"])
    return planner, [60, 61, 40, 41, 42, 43]


def test_seeded_requests_copy_from_their_own_context_only():
    """A past response (request a's) would give a later request a suffix draft; seeded, it
    copies by n-gram lookup from its own tokens, which do not repeat: no copy, so it drafts
    with the model (the fixed policy)."""
    planner, late = _after_a_past_response("suffix")
    unseeded = planner.plan(_inputs([[0, 0, 0], late], prompt=2, ids="bc"))
    assert unseeded.copied[1].tolist()[:2] == [44, 45]
    seeded = planner.plan(_inputs([[0, 0, 0], late], prompt=2, seeded={1}, ids="de"))
    assert 1 not in seeded.copied and 1 in seeded.model_rows
    assert planner.plan(_inputs([[9, 9, 1, 2, 9, 1, 2]], prompt=2, seeded={0})
                        ).copy_source == {0: NGRAM}


def test_no_layer_skip_drafts_when_their_length_is_zero():
    planner = _planner(copy_source="ngram", max_model_draft_tokens=0)
    plan = planner.plan(_inputs([[1, 2, 3, 4], [5, 6, 7, 8, 5, 6, 7]], prompt=2, seeded={0}))
    assert plan.model_rows == [] and list(plan.copied) == [1]


def test_copy_source_none_copies_nothing():
    for knobs in ({"copy_source": "none"}, {"prompt_lookup_max": 0}):
        planner = _planner(**knobs)
        plan = planner.plan(_inputs([[5, 6, 7, 8, 5, 6, 7]], prompt=2, seeded={0}))
        assert plan.copied == {} and plan.model_rows == [0], knobs


@pytest.mark.parametrize("source, expected, k", [
    ("auto", "suffix", 24), ("ngram", "ngram", 8), ("none", "none", 8),
    ("suffix", "suffix", 24), ("suffix+ngram", "suffix+ngram", 24)])
def test_copy_source_resolves(source, expected, k):
    resolved = ClaspOptions(copy_source=source).resolve(30, 100)
    assert resolved.copy_source == expected
    assert resolved.max_model_draft_tokens == 8
    assert ClaspOptions(copy_source=source).default_num_speculative_tokens() == k


def test_auto_without_arctic_inference_falls_back_to_ngram(monkeypatch):
    from vllm_clasp.core import options

    monkeypatch.setattr(options.draft_source, "available", lambda name: name != "suffix")
    assert ClaspOptions().resolve(30, 100).copy_source == "ngram"
    assert ClaspOptions().default_num_speculative_tokens() == 8
    with pytest.raises(ValueError, match="pip install 'vllm-clasp\\[suffix\\]'"):
        ClaspOptions(copy_source="suffix").resolve(30, 100)


@pytest.mark.parametrize("knobs, message", [
    ({"copy_source": "trees"}, "clasp_copy_source must be one of"),
    ({"max_model_draft_tokens": -1}, "clasp_max_model_draft_tokens must be an integer >= 0"),
    ({"suffix_decoding_max_tree_depth": 0}, "clasp_suffix_decoding_max_tree_depth"),
    ({"suffix_decoding_max_cached_requests": -1}, "clasp_suffix_decoding_max_cached_requests"),
    ({"suffix_decoding_max_spec_factor": -0.5}, "clasp_suffix_decoding_max_spec_factor"),
    ({"suffix_decoding_min_token_prob": 1.5}, "clasp_suffix_decoding_min_token_prob"),
])
def test_copy_knobs_are_checked(knobs, message):
    with pytest.raises(ValueError, match=message):
        ClaspOptions(**knobs)


def test_model_draft_length_is_capped_at_k():
    resolved = ClaspOptions(max_model_draft_tokens=20).resolve(30, 100, num_speculative_tokens=6)
    assert resolved.max_model_draft_tokens == 6


def test_suffix_drafts_are_valued_by_their_token_probabilities():
    """With verification paying per token, a suffix draft is cut where its tokens become
    unlikely (the tree's probabilities), not at a per-source rate."""
    from tests.unit.test_planner import FixedCost

    options = ClaspOptions(copy_source="suffix", max_model_draft_tokens=0).resolve(
        num_layers=3, vocab_size=100, num_speculative_tokens=12)
    planner = StepPlanner(options, budget=FixedCost((0.010, 0.001)))
    # The prompt repeats "1 2 3 4" three times, then "1 2 3 9" once, and the output ends in
    # "1 2 3": 4 follows 3 of the 5 occurrences (the output's own has no continuation yet).
    prompt = [1, 2, 3, 4] * 3 + [1, 2, 3, 9, 7, 7, 7, 7, 7]
    plan = planner.plan(_inputs([prompt + [1, 2, 3]], prompt=len(prompt)))
    probs = plan.copy_probs[0]
    assert plan.copied[0][0] == 4 and probs[0] == pytest.approx(0.6)
    gains = planner.calibration.gains(SUFFIX, probs)
    assert all(a >= b for a, b in zip(gains, gains[1:]))


def test_every_registered_source_satisfies_the_interface():
    """A source is one module plus one registry row: each row builds an object with the
    DraftSource methods, named as its row, from resolved options."""
    from vllm_clasp.core import draft_source

    options = ClaspOptions().resolve(30, 100)
    for name in draft_source.SOURCES:
        if not draft_source.available(name):
            continue
        source = draft_source.make_source(name, options)
        assert source.name == name
        assert isinstance(source, draft_source.DraftSource), name
        context = np.concatenate([PROMPT, [1, 2, 3]])
        source.update("a", context, len(PROMPT))
        assert source.propose("a", context, max_draft=3).tokens.tolist() == [4, 5, 6]
        source.forget(["a"])
    from vllm_clasp.core.options import COPY_SOURCES

    assert COPY_SOURCES == ("auto", *draft_source.SOURCES, "none")


def test_suffix_then_ngram_extends_a_short_tree_draft_with_the_lookup():
    """The trees stop at the matched length (spec factor 1); the lookup copies further after
    the same match, so its longer draft is taken and valued as an n-gram draft."""
    row = list(PROMPT) + list(PROMPT[1:4])  # output repeats "1 2 3" of the prompt
    trees = _planner(copy_source="suffix").plan(_inputs([row], prompt=len(PROMPT)))
    both = _planner(copy_source="suffix+ngram").plan(_inputs([row], prompt=len(PROMPT)))
    assert trees.copied[0].tolist() == [4, 5, 6]
    assert both.copied[0].tolist()[:3] == [4, 5, 6] and len(both.copied[0]) > 3
    assert both.copy_source == {0: "suffix+ngram"}  # not "ngram": seeded lookups count there
    tree_probs = trees.copy_probs[0][:3]
    assert both.copy_probs[0][:3].tolist() == tree_probs.tolist()  # the trees' own estimates
    assert (both.copy_probs[0][3:] == tree_probs[-1]).all()  # the added tokens: the last one


def test_suffix_then_ngram_skips_the_lookup_where_the_trees_fill_the_draft():
    from vllm_clasp.core.suffix_then_ngram import SuffixThenNgram

    class Trees:
        def propose(self, req_id, tokens, max_draft):
            return CopiedDraft(np.arange(max_draft), np.ones(max_draft))

    class Lookup:
        def propose(self, req_id, tokens, max_draft):
            raise AssertionError("the trees' draft was already full")

    draft = SuffixThenNgram(Trees(), Lookup()).propose("a", np.arange(10), 4)
    assert draft.tokens.tolist() == [0, 1, 2, 3] and draft.source == SUFFIX


def test_suffix_then_ngram_keeps_the_trees_draft_where_the_two_disagree():
    """A past response makes the trees propose what the request's own context does not
    hold: the trees' draft stays (and is valued as a suffix draft)."""
    planner, late = _after_a_past_response("suffix+ngram")
    plan = planner.plan(_inputs([late], prompt=2, ids="b"))
    assert plan.copied[0].tolist()[:2] == [44, 45] and plan.copy_source == {0: SUFFIX}
