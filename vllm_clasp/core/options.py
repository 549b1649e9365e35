"""CLaSp's own knobs: names, defaults, allowed ranges, and how they resolve against a model.

Host-free: this module is what `docs/configuration.md` documents and what the vLLM config
subclass (`vllm_clasp.vllm.config`) validates against. Every knob is optional.

The knob table is `ClaspOptions`: each field is the knob `clasp_<field>` in
`--speculative-config` JSON, with its default and meaning in the field's docstring. The vLLM
config subclass declares the same `clasp_*` fields and docs/configuration.md tabulates them;
tests check both against this class (`knob_names()`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DEFAULT_NUM_SPECULATIVE_TOKENS = 8
DEFAULT_SKIP_RATIO = 0.3
DEFAULT_LOI = 16
DEFAULT_DRAFT_VOCAB_SIZE = 16384
DEFAULT_DRAFT_EXIT_THRESHOLD = 0.7
DEFAULT_PROMPT_LOOKUP_MAX = 5
DEFAULT_PROMPT_LOOKUP_MIN = 3

KNOB_PREFIX = "clasp_"
METHOD = "clasp"
"""The speculative method's name in vLLM's config."""


def is_clasp(speculative_config) -> bool:
    """Whether a vLLM speculative config (or None) asks for CLaSp: the one place that says."""
    return speculative_config is not None and getattr(speculative_config, "method", None) == METHOD


def knob_names() -> list[str]:
    """Every knob's key in the speculative-config JSON, in the table's order."""
    return [KNOB_PREFIX + f.name for f in dataclasses.fields(ClaspOptions)]


@dataclass(frozen=True)
class ClaspOptions:
    """User-facing CLaSp knobs, validated on construction (ValueError names key and range)."""

    skip_layers: int | None = None
    """Number of decoder layers the draft skips. Exclusive with `skip_ratio`."""
    skip_ratio: float | None = None
    """Skipped layers as a fraction of all layers; default 0.3 when neither is given."""
    loi: int = DEFAULT_LOI
    """Layer optimization interval: verification steps between two DP runs per request."""
    draft_exit_threshold: float = DEFAULT_DRAFT_EXIT_THRESHOLD
    """A request stops drafting once its draft's top-1 probability falls below this."""
    never_skip: tuple[int, ...] | None = None
    """Layer indices that are never skipped (negative counts from the end).
    None means (0, -1): the first and last layer always run."""
    draft_vocab_size: int | None = None
    """The draft's output head covers only token ids [0, N) (BPE vocabularies order ids
    roughly by frequency): cheaper drafts, still lossless because verification uses the full
    vocabulary and the draft's probabilities are exact for what it drafts. None means
    min(16384, vocabulary); 0 means the whole vocabulary."""
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP_MAX
    """Combine with prompt-lookup drafts: a request whose last n tokens (n from this down to
    `prompt_lookup_min`) occurred earlier drafts what followed them, at no model cost; others
    draft with CLaSp. 0 turns it off (layer-skip drafts only, as in the paper)."""
    prompt_lookup_min: int | None = None
    """Shortest n-gram that counts as a match; None means min(3, prompt_lookup_max)."""
    adaptive: bool = True
    """Make model drafts, and verify draft tokens, only where measured costs and acceptance
    say they pay (vllm_clasp.core.draft_budget). False drafts on every step and verifies every
    draft token."""

    def __post_init__(self) -> None:
        if self.skip_layers is not None and self.skip_ratio is not None:
            raise ValueError(
                "clasp_skip_layers and clasp_skip_ratio are mutually exclusive; give one"
            )
        _check_int("clasp_skip_layers", self.skip_layers, low=0, allow_none=True)
        if self.skip_ratio is not None and not (
            _is_number(self.skip_ratio) and 0.0 <= self.skip_ratio < 1.0
        ):
            raise ValueError(
                f"clasp_skip_ratio must be a number in [0, 1), got {self.skip_ratio!r}"
            )
        _check_int("clasp_loi", self.loi, low=1)
        if not (_is_number(self.draft_exit_threshold) and 0.0 <= self.draft_exit_threshold < 1.0):
            raise ValueError(
                "clasp_draft_exit_threshold must be a number in [0, 1), "
                f"got {self.draft_exit_threshold!r}"
            )
        if self.never_skip is not None:
            if not isinstance(self.never_skip, (list, tuple)):
                raise ValueError(
                    f"clasp_never_skip must be a list of layer indices, got {self.never_skip!r}"
                )
            for layer in self.never_skip:
                _check_int("clasp_never_skip[]", layer)
            object.__setattr__(self, "never_skip", tuple(self.never_skip))
        _check_int("clasp_draft_vocab_size", self.draft_vocab_size, low=0, allow_none=True)
        _check_int("clasp_prompt_lookup_max", self.prompt_lookup_max, low=0)
        _check_int("clasp_prompt_lookup_min", self.prompt_lookup_min, low=1, allow_none=True)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"clasp_adaptive must be true or false, got {self.adaptive!r}")
        if (self.prompt_lookup_max and self.prompt_lookup_min is not None
                and self.prompt_lookup_min > self.prompt_lookup_max):
            raise ValueError(
                f"clasp_prompt_lookup_min={self.prompt_lookup_min} must be <= "
                f"clasp_prompt_lookup_max={self.prompt_lookup_max}"
            )

    @classmethod
    def from_dict(cls, knobs: dict) -> "ClaspOptions":
        """Build from `{"clasp_loi": 8, ...}`; unknown `clasp_*` keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in knobs.items():
            name = key[len(KNOB_PREFIX):] if key.startswith(KNOB_PREFIX) else key
            if name not in names:
                allowed = ", ".join(sorted(KNOB_PREFIX + n for n in names))
                raise ValueError(f"unknown CLaSp option {key!r}; allowed: {allowed}")
            kwargs[name] = value
        return cls(**kwargs)

    def resolve(self, num_layers: int, vocab_size: int) -> "ResolvedClaspOptions":
        """Check the knobs against a model with `num_layers` decoder layers."""
        never = (0, -1) if self.never_skip is None else self.never_skip
        never_skip = [False] * num_layers
        for layer in never:
            if not -num_layers <= layer < num_layers:
                raise ValueError(
                    f"clasp_never_skip: layer {layer} out of range for a model with "
                    f"{num_layers} layers (allowed: {-num_layers}..{num_layers - 1})"
                )
            never_skip[layer % num_layers] = True
        skippable = num_layers - sum(never_skip)
        if self.skip_layers is not None:
            num_skip = self.skip_layers
            if num_skip > skippable:
                raise ValueError(
                    f"clasp_skip_layers={num_skip} exceeds the {skippable} skippable layers "
                    f"of this model ({num_layers} layers, {num_layers - skippable} never "
                    f"skipped); allowed: 0..{skippable}"
                )
        else:
            ratio = DEFAULT_SKIP_RATIO if self.skip_ratio is None else self.skip_ratio
            num_skip = min(round(ratio * num_layers), skippable)
        if self.draft_vocab_size is not None and self.draft_vocab_size > vocab_size:
            raise ValueError(
                f"clasp_draft_vocab_size={self.draft_vocab_size} exceeds the model's "
                f"vocabulary ({vocab_size}); allowed: 0..{vocab_size} (0: all)"
            )
        if self.draft_vocab_size is None:
            draft_vocab_size = min(DEFAULT_DRAFT_VOCAB_SIZE, vocab_size)
        else:
            draft_vocab_size = self.draft_vocab_size or vocab_size
        return ResolvedClaspOptions(
            num_layers=num_layers,
            num_skip=num_skip,
            never_skip=tuple(never_skip),
            loi=self.loi,
            draft_exit_threshold=float(self.draft_exit_threshold),
            draft_vocab_size=draft_vocab_size,
            prompt_lookup_max=self.prompt_lookup_max,
            prompt_lookup_min=(
                self.prompt_lookup_min if self.prompt_lookup_min is not None
                else min(DEFAULT_PROMPT_LOOKUP_MIN, self.prompt_lookup_max or DEFAULT_PROMPT_LOOKUP_MIN)
            ),
            adaptive=self.adaptive,
        )


@dataclass(frozen=True)
class ResolvedClaspOptions:
    """ClaspOptions checked against one model: what the proposer runs with."""

    num_layers: int
    num_skip: int
    never_skip: tuple[bool, ...] = field(repr=False)  # [num_layers]
    loi: int
    draft_exit_threshold: float
    draft_vocab_size: int
    """Token ids [0, draft_vocab_size) form the draft head; == vocabulary size means all."""
    prompt_lookup_max: int
    prompt_lookup_min: int
    adaptive: bool


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(key: str, value, low: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        allowed = "an integer" if low is None else f"an integer >= {low}"
        raise ValueError(f"{key} must be {allowed}, got {value!r}")
