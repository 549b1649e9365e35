"""Tests of vllm_clasp.core.options: validation of every CLaSp knob and resolution against a model.

Host-free and instant. Every error message must name the JSON key (`clasp_*`) and the allowed
range, since that message is what a user sees from `--speculative-config`.
"""

from __future__ import annotations

import dataclasses

import pytest

from vllm_clasp.core.options import (
    DEFAULT_DRAFT_EXIT_THRESHOLD,
    DEFAULT_DRAFT_VOCAB_SIZE,
    DEFAULT_LOI,
    DEFAULT_PROMPT_LOOKUP_MAX,
    DEFAULT_PROMPT_LOOKUP_MIN,
    DEFAULT_SKIP_RATIO,
    ClaspOptions,
    ResolvedClaspOptions,
)

ALL_KEYS = [
    "clasp_adaptive",
    "clasp_compile_layers",
    "clasp_copy_source",
    "clasp_draft_exit_threshold",
    "clasp_draft_vocab_size",
    "clasp_loi",
    "clasp_max_model_draft_tokens",
    "clasp_never_skip",
    "clasp_prompt_lookup_max",
    "clasp_prompt_lookup_min",
    "clasp_share_skip_sets",
    "clasp_skip_layers",
    "clasp_skip_ratio",
    "clasp_suffix_decoding_max_cached_requests",
    "clasp_suffix_decoding_max_spec_factor",
    "clasp_suffix_decoding_max_tree_depth",
    "clasp_suffix_decoding_min_token_prob",
]


def _error(**kwargs) -> str:
    with pytest.raises(ValueError) as info:
        ClaspOptions(**kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_defaults():
    """Default values are tuning decisions (docs/configuration.md lists them); their
    constraints are not."""
    options = ClaspOptions()
    assert options.skip_layers is None
    assert options.skip_ratio is None
    assert options.loi == DEFAULT_LOI
    assert options.draft_exit_threshold == DEFAULT_DRAFT_EXIT_THRESHOLD
    assert options.never_skip is None
    assert options.draft_vocab_size is None
    assert options.prompt_lookup_max == DEFAULT_PROMPT_LOOKUP_MAX == 5  # combined by default
    assert options.prompt_lookup_min is None  # resolved to min(default, prompt_lookup_max)
    assert options.adaptive is True
    # The defaults themselves pass validation.
    assert 0 <= DEFAULT_SKIP_RATIO < 1 and isinstance(DEFAULT_LOI, int) and DEFAULT_LOI >= 1
    assert 0 <= DEFAULT_DRAFT_EXIT_THRESHOLD < 1
    assert isinstance(DEFAULT_DRAFT_VOCAB_SIZE, int) and DEFAULT_DRAFT_VOCAB_SIZE >= 1
    assert isinstance(DEFAULT_PROMPT_LOOKUP_MIN, int) and DEFAULT_PROMPT_LOOKUP_MIN >= 1


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ClaspOptions().loi = 3  # type: ignore[misc]


def test_every_field_has_a_prefixed_key():
    assert sorted("clasp_" + f.name for f in dataclasses.fields(ClaspOptions)) == ALL_KEYS


# --------------------------------------------------------------------------- values


# Per knob: values it accepts, and values it refuses with the words its error must contain.
GOOD = {
    "skip_layers": [0, 1, 12, 10_000, "auto"],
    "skip_ratio": [0, 0.0, 0.25, 0.5, 0.999],
    "loi": [1, 2, 8, 1000],
    "draft_exit_threshold": [0, 0.0, 0.3, 0.7, 0.9999],
    "draft_vocab_size": [0, 1, 1000, 49152],
    "prompt_lookup_max": [0, 3, 8],
    "prompt_lookup_min": [1, 3],
    "adaptive": [True, False],
    "share_skip_sets": [True, False],
    "compile_layers": [True, False],
}
BAD = {
    "skip_layers": ([-1, -100, True, False, 1.0, 2.5, "3", [3]], "an integer >= 0"),
    "skip_ratio": ([1, 1.0, 1.5, -0.01, -1, float("nan"), float("inf"), True, False, "0.5",
                    [0.5]], "[0, 1)"),
    # None is not "unset" where the default is not None: an explicit None is an error.
    "loi": ([0, -1, True, False, 8.0, "8", None], "an integer >= 1"),
    "draft_exit_threshold": ([1, 1.0, 1.01, -0.1, float("nan"), True, False, "0.5", None],
                             "[0, 1)"),
    "never_skip": ([3, "0,1", {0: 1}, {0, 1}], "list of layer indices"),
    "draft_vocab_size": ([-1, -5, True, False, 1000.0, "1000"], "an integer >= 0"),
    "prompt_lookup_max": ([-1, True, 2.0, "3", None], "an integer >= 0"),
    "prompt_lookup_min": ([0, -1, True, 2.0, "3"], "an integer >= 1"),
    "adaptive": ([1, 0, "true", None], "true or false"),
    "share_skip_sets": ([1, 0, "true", None], "true or false"),
    "compile_layers": ([1, 0, "true", None], "true or false"),
}


@pytest.mark.parametrize("knob, value", [(k, v) for k, values in GOOD.items() for v in values])
def test_knob_accepts(knob, value):
    assert getattr(ClaspOptions(**{knob: value}), knob) == value


@pytest.mark.parametrize("knob, value", [(k, v) for k, (values, _) in BAD.items() for v in values])
def test_knob_refuses_with_its_name_and_range(knob, value):
    message = _error(**{knob: value})
    assert f"clasp_{knob}" in message and BAD[knob][1] in message, message


def test_an_out_of_range_integer_is_named_in_the_error():
    for knob, value in (("skip_layers", -1), ("loi", 0)):
        assert repr(value) in _error(**{knob: value})


def test_skip_layers_and_ratio_are_mutually_exclusive():
    message = _error(skip_layers=3, skip_ratio=0.5)
    assert "clasp_skip_layers" in message and "clasp_skip_ratio" in message
    assert "mutually exclusive" in message
    # Even a zero of each is "both given".
    assert "mutually exclusive" in _error(skip_layers=0, skip_ratio=0.0)


@pytest.mark.parametrize("value", [[], [0], [0, -1], (3, 5, -2), [0, 0]])
def test_never_skip_good_is_stored_as_tuple(value):
    options = ClaspOptions(never_skip=value)
    assert options.never_skip == tuple(value)
    assert isinstance(options.never_skip, tuple)


@pytest.mark.parametrize("value", [[True], [0, 1.0], ["0"], [None]])
def test_never_skip_bad_element(value):
    message = _error(never_skip=value)
    assert "clasp_never_skip" in message and "an integer" in message


@pytest.mark.parametrize("maximum, minimum", [(0, 1), (0, 5), (3, 1), (3, 3), (8, 2)])
def test_prompt_lookup_good(maximum, minimum):
    options = ClaspOptions(prompt_lookup_max=maximum, prompt_lookup_min=minimum)
    assert (options.prompt_lookup_max, options.prompt_lookup_min) == (maximum, minimum)


def test_prompt_lookup_min_follows_a_small_max():
    resolved = ClaspOptions(prompt_lookup_max=2).resolve(num_layers=30, vocab_size=49152)
    assert resolved.prompt_lookup_min == 2
    resolved = ClaspOptions(prompt_lookup_max=5).resolve(num_layers=30, vocab_size=49152)
    assert resolved.prompt_lookup_min == DEFAULT_PROMPT_LOOKUP_MIN


def test_prompt_lookup_min_above_max():
    message = _error(prompt_lookup_max=2, prompt_lookup_min=3)
    assert "clasp_prompt_lookup_min=3" in message and "clasp_prompt_lookup_max=2" in message
    assert "must be <=" in message


# --------------------------------------------------------------------------- from_dict


def test_from_dict_prefixed_keys():
    options = ClaspOptions.from_dict({
        "clasp_skip_layers": 4, "clasp_loi": 2, "clasp_draft_exit_threshold": 0.5,
        "clasp_never_skip": [0, 1, -1], "clasp_draft_vocab_size": 100,
        "clasp_prompt_lookup_max": 3, "clasp_prompt_lookup_min": 1, "clasp_adaptive": False,
    })
    assert options == ClaspOptions(
        skip_layers=4, loi=2, draft_exit_threshold=0.5, never_skip=(0, 1, -1),
        draft_vocab_size=100, prompt_lookup_max=3, prompt_lookup_min=1, adaptive=False,
    )
    assert ClaspOptions.from_dict({}) == ClaspOptions()


def test_from_dict_unknown_key_lists_allowed_keys():
    with pytest.raises(ValueError) as info:
        ClaspOptions.from_dict({"clasp_foo": 1})
    message = str(info.value)
    assert "'clasp_foo'" in message
    assert "allowed: " + ", ".join(ALL_KEYS) in message


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="clasp_loi must be an integer >= 1"):
        ClaspOptions.from_dict({"clasp_loi": 0})


# --------------------------------------------------------------------------- resolve


def test_resolve_defaults():
    resolved = ClaspOptions().resolve(num_layers=30, vocab_size=49152)
    assert isinstance(resolved, ResolvedClaspOptions)
    assert resolved.num_layers == 30
    assert resolved.num_skip == round(DEFAULT_SKIP_RATIO * 30)
    assert resolved.never_skip == (True,) + (False,) * 28 + (True,)
    assert resolved.loi == DEFAULT_LOI
    assert resolved.draft_exit_threshold == DEFAULT_DRAFT_EXIT_THRESHOLD
    assert isinstance(resolved.draft_exit_threshold, float)
    assert resolved.draft_vocab_size == min(DEFAULT_DRAFT_VOCAB_SIZE, 49152)
    assert resolved.prompt_lookup_max == DEFAULT_PROMPT_LOOKUP_MAX
    assert resolved.prompt_lookup_min == DEFAULT_PROMPT_LOOKUP_MIN
    assert resolved.adaptive is True


@pytest.mark.parametrize(
    "ratio, num_layers, expected",
    [
        (0.0, 30, 0),
        (0.1, 30, 3),
        (0.3, 30, 9),
        (0.29, 30, 9),  # 8.7 -> 9: rounds, does not truncate
        (0.25, 30, 8),  # 7.5 -> 8 (Python rounds half to even)
        (0.05, 30, 2),  # 1.5 -> 2
        (0.4, 32, 13),  # 12.8 -> 13
        (0.33, 32, 11),  # 10.56 -> 11
        (0.99, 30, 28),  # round(29.7) = 30, capped at the 28 skippable layers
        (0.9, 4, 2),  # round(3.6) = 4, capped at 4 - 2 never-skipped
    ],
)
def test_resolve_ratio_rounding(ratio, num_layers, expected):
    resolved = ClaspOptions(skip_ratio=ratio).resolve(num_layers=num_layers, vocab_size=100)
    assert resolved.num_skip == expected


@pytest.mark.parametrize(
    "knobs, num_layers, expected",
    [
        ({"skip_layers": 15}, 30, 15),
        ({"skip_ratio": 0.5}, 30, 15),
        ({"skip_ratio": 0.5, "never_skip": [0, 29]}, 30, 15),  # a ratio of ALL layers
        ({"skip_ratio": 0.5}, 7, 4),  # 3.5 -> 4 (half to even: 4 is even)
        ({"skip_ratio": 0.5}, 9, 4),  # 4.5 -> 4 (half to even), the one skip-count rule
        ({"skip_layers": 0}, 30, 0),
        ({"skip_layers": 28, "never_skip": [0, 29]}, 30, 28),
    ],
)
def test_the_one_skip_count_rule(knobs, num_layers, expected):
    """The engine, the benchmark and the docs use options.resolve (moved here from the
    optimizer's own resolve_num_skip, which rounded half up: 9 layers at 0.5 gave 5)."""
    assert ClaspOptions(**knobs).resolve(num_layers, 100).num_skip == expected


def test_skip_count_beyond_the_skippable_layers_is_an_error():
    with pytest.raises(ValueError, match="skippable"):
        ClaspOptions(skip_layers=29, never_skip=[0, 29]).resolve(30, 100)


def test_resolve_zero_ratio_and_one_layer_model():
    assert ClaspOptions(skip_ratio=0).resolve(30, 100).num_skip == 0
    # One layer: default never-skip (0, -1) are the same layer; nothing is skippable.
    resolved = ClaspOptions().resolve(num_layers=1, vocab_size=100)
    assert resolved.never_skip == (True,) and resolved.num_skip == 0


@pytest.mark.parametrize("count", [0, 1, 28])
def test_resolve_skip_layers_count(count):
    assert ClaspOptions(skip_layers=count).resolve(30, 100).num_skip == count


def test_resolve_skip_layers_exceeding_skippable():
    with pytest.raises(ValueError) as info:
        ClaspOptions(skip_layers=29).resolve(num_layers=30, vocab_size=100)
    message = str(info.value)
    assert "clasp_skip_layers=29" in message
    assert "28 skippable" in message
    assert "allowed: 0..28" in message


def test_resolve_skip_layers_with_custom_never_skip():
    options = ClaspOptions(skip_layers=27, never_skip=[0, 1, -1])
    with pytest.raises(ValueError, match=r"allowed: 0\.\.26"):
        options.resolve(num_layers=29, vocab_size=100)
    # An empty never-skip list makes every layer skippable.
    assert ClaspOptions(skip_layers=30, never_skip=[]).resolve(30, 100).num_skip == 30


def test_resolve_never_skip_negative_indices():
    resolved = ClaspOptions(never_skip=[-1, -2, 3]).resolve(num_layers=10, vocab_size=100)
    expected = [False] * 10
    for layer in (9, 8, 3):
        expected[layer] = True
    assert resolved.never_skip == tuple(expected)
    assert resolved.num_skip == min(round(DEFAULT_SKIP_RATIO * 10), 7)  # 7 skippable


def test_resolve_never_skip_duplicates_via_negative_index():
    resolved = ClaspOptions(never_skip=[0, -10], skip_layers=9).resolve(10, 100)
    assert sum(resolved.never_skip) == 1 and resolved.num_skip == 9


@pytest.mark.parametrize("layer", [10, 99, -11])
def test_resolve_never_skip_out_of_range(layer):
    with pytest.raises(ValueError) as info:
        ClaspOptions(never_skip=[0, layer]).resolve(num_layers=10, vocab_size=100)
    message = str(info.value)
    assert "clasp_never_skip" in message
    assert f"layer {layer}" in message
    assert "allowed: -10..9" in message


def test_resolve_draft_vocab_size():
    assert ClaspOptions(draft_vocab_size=100).resolve(30, 100).draft_vocab_size == 100
    assert ClaspOptions(draft_vocab_size=1).resolve(30, 100).draft_vocab_size == 1
    # 0 means the whole vocabulary.
    assert ClaspOptions(draft_vocab_size=0).resolve(30, 100).draft_vocab_size == 100
    # Unset: the default head size, or the whole vocabulary when that is smaller.
    big = 10 * DEFAULT_DRAFT_VOCAB_SIZE
    assert ClaspOptions().resolve(30, big).draft_vocab_size == DEFAULT_DRAFT_VOCAB_SIZE
    assert ClaspOptions().resolve(30, 100).draft_vocab_size == 100
    with pytest.raises(ValueError) as info:
        ClaspOptions(draft_vocab_size=101).resolve(num_layers=30, vocab_size=100)
    message = str(info.value)
    assert "clasp_draft_vocab_size=101" in message
    assert "allowed: 0..100" in message


def test_resolve_carries_the_other_knobs():
    resolved = ClaspOptions(
        loi=3, draft_exit_threshold=0, prompt_lookup_max=4, prompt_lookup_min=1, adaptive=False,
    ).resolve(30, 100)
    assert resolved.loi == 3
    assert resolved.draft_exit_threshold == 0.0 and isinstance(resolved.draft_exit_threshold, float)
    assert (resolved.prompt_lookup_max, resolved.prompt_lookup_min) == (4, 1)
    assert resolved.adaptive is False
