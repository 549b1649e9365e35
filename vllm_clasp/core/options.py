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

from vllm_clasp.core import draft_source

DEFAULT_NUM_SPECULATIVE_TOKENS = 8
"""K without a suffix-tree copy source: the longest draft verified in one step."""
DEFAULT_MAX_MODEL_DRAFT_TOKENS = 8
DEFAULT_SKIP_RATIO = 0.3
"""The fixed M's ratio for seeded requests under "auto" (their drafts must not depend on
measured time), and the paper's order of magnitude."""
AUTO = "auto"
AUTO_SKIP_RANGE = (0.1, 0.6)
"""With "auto", M is chosen in round(0.1 L) .. round(0.6 L) (at least 1 .. skippable)."""
DEFAULT_LOI = 16
DEFAULT_DRAFT_VOCAB_SIZE = 16384
DEFAULT_DRAFT_EXIT_THRESHOLD = 0.7
DEFAULT_PROMPT_LOOKUP_MAX = 5
DEFAULT_PROMPT_LOOKUP_MIN = 3
# vLLM's own defaults for its `suffix` method (vllm/config/speculative.py), which CLaSp's suffix
# copy source mirrors; with it K defaults to the tree depth, as in vLLM.
DEFAULT_SUFFIX_MAX_TREE_DEPTH = 24
DEFAULT_SUFFIX_MAX_CACHED_REQUESTS = 10000
DEFAULT_SUFFIX_MAX_SPEC_FACTOR = 1.0
DEFAULT_SUFFIX_MIN_TOKEN_PROB = 0.1

COPY_SOURCES = ("auto", *draft_source.SOURCES, "none")
"""Values of clasp_copy_source: "auto" (the first available source), each registered
source (`draft_source.SOURCES`), "none"."""
SUFFIX_INSTALL_HINT = (
    "pip install 'vllm-clasp[suffix]' (arctic-inference builds a small C++ extension; see "
    "README.md, or run scripts/setup.sh)"
)

KNOB_PREFIX = "clasp_"
METHOD = "clasp"
"""The speculative method's name in vLLM's config."""


def is_clasp(speculative_config) -> bool:
    """Whether a vLLM speculative config (or None) asks for CLaSp: the one place that says."""
    return speculative_config is not None and getattr(speculative_config, "method", None) == METHOD


def suffix_library_available() -> bool:
    """Whether arctic-inference (the suffix-tree library vLLM's `suffix` method uses) imports."""
    return draft_source.available("suffix")


def knob_names() -> list[str]:
    """Every knob's key in the speculative-config JSON, in the table's order."""
    return [KNOB_PREFIX + f.name for f in dataclasses.fields(ClaspOptions)]


@dataclass(frozen=True)
class ClaspOptions:
    """User-facing CLaSp knobs, validated on construction (ValueError names key and range)."""

    skip_layers: int | str | None = None
    """Number of decoder layers the draft skips (M), or "auto": chosen per request and DP run
    to maximise expected tokens per second (`core.skip_count`), among round(0.1 L) ..
    round(0.6 L). Exclusive with `skip_ratio`; None (neither given) means "auto"."""
    skip_ratio: float | None = None
    """Skipped layers as a fraction of all layers (a fixed M = round(r L))."""
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
    copy_source: str = "auto"
    """Where copied drafts (free to make: no model pass) come from, besides the layer-skip
    drafts. "suffix": suffix trees over the request's prompt and past responses of all
    requests (arctic-inference's SuffixDecodingCache, as vLLM's `suffix` method);
    "ngram": the request's own context (prompt lookup); "suffix+ngram": the suffix trees,
    extended by prompt lookup where it agrees with them and reaches further; "none": layer-skip drafts only, as
    in the paper. "auto": suffix when arctic-inference is installed, else ngram (logged
    once). Seeded requests always copy with ngram (their own context only)."""
    max_model_draft_tokens: int | None = None
    """Most tokens one layer-skip draft may have; also the lookahead KV slots reserved per
    request for the draft passes (copied drafts need none). None means
    min(8, num_speculative_tokens); 0 turns layer-skip drafts off (copies only)."""
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP_MAX
    """The ngram copy source: a request whose last n tokens (n from this down to
    `prompt_lookup_min`) occurred earlier drafts what followed them. 0 turns copying off
    whatever `copy_source` says (the same as copy_source "none")."""
    prompt_lookup_min: int | None = None
    """Shortest n-gram that counts as a match; None means min(3, prompt_lookup_max)."""
    suffix_decoding_max_tree_depth: int = DEFAULT_SUFFIX_MAX_TREE_DEPTH
    """The suffix copy source (vLLM's `suffix_decoding_max_tree_depth`): depth of the prompt
    and global suffix trees; the context matched is at most this many tokens."""
    suffix_decoding_max_cached_requests: int = DEFAULT_SUFFIX_MAX_CACHED_REQUESTS
    """Past responses kept in the global suffix tree (FIFO eviction); 0 keeps none (prompt
    trees only). vLLM's `suffix_decoding_max_cached_requests`."""
    suffix_decoding_max_spec_factor: float = DEFAULT_SUFFIX_MAX_SPEC_FACTOR
    """A suffix draft has at most this x the matched context's length tokens.
    vLLM's `suffix_decoding_max_spec_factor`."""
    suffix_decoding_min_token_prob: float = DEFAULT_SUFFIX_MIN_TOKEN_PROB
    """A suffix draft stops at a token whose estimated probability (its frequency in the
    tree) is below this. vLLM's `suffix_decoding_min_token_prob`."""
    adaptive: bool = True
    """Make model drafts, and verify draft tokens, only where measured costs and acceptance
    say they pay (vllm_clasp.core.draft_budget). False drafts on every step and verifies every
    draft token."""
    share_skip_sets: bool = True
    """When several unseeded requests draft with the layer-skipped model in one step, they
    draft with one skip set, chosen by one DP over their summed fit and re-chosen every LOI
    such steps: a batch draft pass reads each kept layer once for all rows that keep it, so
    it costs the union of the rows' kept layers, and separate sets would keep almost every
    layer between them. False: every request its own set (the paper's DP, per request)."""
    compile_layers: bool = True
    """Where vLLM compiles the model (not with enforce_eager), run the draft passes' and the
    DP's decoder-layer calls through one torch.compile'd function shared by all layers
    (vllm_clasp.core.layer_compile), each layer checked against eager on its first call.
    False: always eager."""

    def __post_init__(self) -> None:
        if self.skip_layers is not None and self.skip_ratio is not None:
            raise ValueError(
                "clasp_skip_layers and clasp_skip_ratio are mutually exclusive; give one"
            )
        if self.skip_layers != AUTO:
            _check_int("clasp_skip_layers", self.skip_layers, low=0, allow_none=True,
                       also='"auto"')
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
        _check_int("clasp_max_model_draft_tokens", self.max_model_draft_tokens, low=0,
                   allow_none=True)
        for key in ("adaptive", "share_skip_sets", "compile_layers"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"clasp_{key} must be true or false, "
                                 f"got {getattr(self, key)!r}")
        _check_copy_knobs(self)

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

    def resolved_copy_source(self) -> str:
        """A `draft_source.SOURCES` name or "none": what `copy_source` means on this
        machine. Asking for a suffix-tree source without arctic-inference is an error that
        says how to install it."""
        if self.copy_source == "none" or self.prompt_lookup_max == 0:
            return "none"
        if self.copy_source == "auto":
            return next(name for name in draft_source.SOURCES if draft_source.available(name))
        if not draft_source.available(self.copy_source):
            library = draft_source.SOURCES[self.copy_source].library
            hint = (SUFFIX_INSTALL_HINT if library == "arctic_inference"
                    else f"pip install {library}")
            raise ValueError(
                f"clasp_copy_source={self.copy_source!r} needs {library}, which is not "
                f"installed: {hint}; or use clasp_copy_source='ngram'"
            )
        return self.copy_source

    def default_num_speculative_tokens(self) -> int:
        """K when the config does not give one: the suffix tree depth with suffix copies (as
        vLLM's `suffix` method), else 8."""
        if self.resolved_copy_source().startswith("suffix"):
            return self.suffix_decoding_max_tree_depth
        return DEFAULT_NUM_SPECULATIVE_TOKENS

    def _resolved_draft_vocab(self, vocab_size: int) -> int:
        if self.draft_vocab_size is not None and self.draft_vocab_size > vocab_size:
            raise ValueError(
                f"clasp_draft_vocab_size={self.draft_vocab_size} exceeds the model's "
                f"vocabulary ({vocab_size}); allowed: 0..{vocab_size} (0: all)"
            )
        if self.draft_vocab_size is None:
            return min(DEFAULT_DRAFT_VOCAB_SIZE, vocab_size)
        return self.draft_vocab_size or vocab_size

    def resolve(self, num_layers: int, vocab_size: int,
                num_speculative_tokens: int | None = None) -> "ResolvedClaspOptions":
        """Check the knobs against a model with `num_layers` decoder layers and a verification
        of up to `num_speculative_tokens` draft tokens (None: the default K)."""
        k = (self.default_num_speculative_tokens() if num_speculative_tokens is None
             else num_speculative_tokens)
        never_skip, num_skip = _resolve_skip(self, num_layers)
        skippable = num_layers - sum(never_skip)
        auto = self.skip_ratio is None and self.skip_layers in (None, AUTO)
        skip_range = (num_skip, num_skip)
        if auto:
            lo, hi = (round(r * num_layers) for r in AUTO_SKIP_RANGE)
            hi = min(max(hi, 1), skippable)
            skip_range = (min(max(lo, 1), hi), hi)
        return ResolvedClaspOptions(
            num_layers=num_layers,
            num_skip=num_skip,
            auto_skip=auto,
            skip_range=skip_range,
            never_skip=tuple(never_skip),
            loi=self.loi,
            draft_exit_threshold=float(self.draft_exit_threshold),
            draft_vocab_size=self._resolved_draft_vocab(vocab_size),
            copy_source=self.resolved_copy_source(),
            max_model_draft_tokens=(
                min(DEFAULT_MAX_MODEL_DRAFT_TOKENS, k) if self.max_model_draft_tokens is None
                else min(self.max_model_draft_tokens, k)),
            prompt_lookup_max=self.prompt_lookup_max,
            prompt_lookup_min=(
                self.prompt_lookup_min if self.prompt_lookup_min is not None
                else min(DEFAULT_PROMPT_LOOKUP_MIN, self.prompt_lookup_max or DEFAULT_PROMPT_LOOKUP_MIN)
            ),
            suffix=SuffixOptions(
                max_tree_depth=self.suffix_decoding_max_tree_depth,
                max_cached_requests=self.suffix_decoding_max_cached_requests,
                max_spec_factor=float(self.suffix_decoding_max_spec_factor),
                min_token_prob=float(self.suffix_decoding_min_token_prob),
            ),
            adaptive=self.adaptive,
            share_skip_sets=self.share_skip_sets,
            compile_layers=self.compile_layers,
        )


@dataclass(frozen=True)
class ResolvedClaspOptions:
    """ClaspOptions checked against one model: what the proposer runs with."""

    num_layers: int
    num_skip: int
    """The fixed M; with auto_skip, the M of seeded requests (their fixed policy)."""
    auto_skip: bool
    skip_range: tuple[int, int]
    """(lo, hi): the Ms the DP covers; (M, M) unless auto_skip."""
    never_skip: tuple[bool, ...] = field(repr=False)  # [num_layers]
    loi: int
    draft_exit_threshold: float
    draft_vocab_size: int
    """Token ids [0, draft_vocab_size) form the draft head; == vocabulary size means all."""
    copy_source: str  # a draft_source.SOURCES name ("suffix", "ngram", ...) | "none"
    max_model_draft_tokens: int  # 0: no layer-skip drafts
    prompt_lookup_max: int  # the ngram source (also seeded requests' copies)
    prompt_lookup_min: int
    suffix: "SuffixOptions"
    adaptive: bool
    share_skip_sets: bool = True
    compile_layers: bool = True


@dataclass(frozen=True)
class SuffixOptions:
    """The suffix copy source's settings (vLLM's `suffix_decoding_*`, same meaning)."""

    max_tree_depth: int = DEFAULT_SUFFIX_MAX_TREE_DEPTH
    max_cached_requests: int = DEFAULT_SUFFIX_MAX_CACHED_REQUESTS
    max_spec_factor: float = DEFAULT_SUFFIX_MAX_SPEC_FACTOR
    min_token_prob: float = DEFAULT_SUFFIX_MIN_TOKEN_PROB


def _check_copy_knobs(options: ClaspOptions) -> None:
    """The copy sources' knobs (ValueError names key and range)."""
    if options.copy_source not in COPY_SOURCES:
        raise ValueError(
            f"clasp_copy_source must be one of {', '.join(map(repr, COPY_SOURCES))}, "
            f"got {options.copy_source!r}"
        )
    _check_int("clasp_prompt_lookup_max", options.prompt_lookup_max, low=0)
    _check_int("clasp_prompt_lookup_min", options.prompt_lookup_min, low=1, allow_none=True)
    if (options.prompt_lookup_max and options.prompt_lookup_min is not None
            and options.prompt_lookup_min > options.prompt_lookup_max):
        raise ValueError(
            f"clasp_prompt_lookup_min={options.prompt_lookup_min} must be <= "
            f"clasp_prompt_lookup_max={options.prompt_lookup_max}"
        )
    _check_int("clasp_suffix_decoding_max_tree_depth", options.suffix_decoding_max_tree_depth,
               low=1)
    _check_int("clasp_suffix_decoding_max_cached_requests",
               options.suffix_decoding_max_cached_requests, low=0)
    if not (_is_number(options.suffix_decoding_max_spec_factor)
            and options.suffix_decoding_max_spec_factor >= 0):
        raise ValueError("clasp_suffix_decoding_max_spec_factor must be a number >= 0, "
                         f"got {options.suffix_decoding_max_spec_factor!r}")
    if not (_is_number(options.suffix_decoding_min_token_prob)
            and 0.0 <= options.suffix_decoding_min_token_prob <= 1.0):
        raise ValueError("clasp_suffix_decoding_min_token_prob must be a number in [0, 1], "
                         f"got {options.suffix_decoding_min_token_prob!r}")


def _resolve_skip(options: ClaspOptions, num_layers: int) -> tuple[list[bool], int]:
    """([num_layers] never-skipped flags, number of layers to skip) for one model."""
    never = (0, -1) if options.never_skip is None else options.never_skip
    never_skip = [False] * num_layers
    for layer in never:
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"clasp_never_skip: layer {layer} out of range for a model with "
                f"{num_layers} layers (allowed: {-num_layers}..{num_layers - 1})"
            )
        never_skip[layer % num_layers] = True
    skippable = num_layers - sum(never_skip)
    if options.skip_layers in (None, AUTO):
        ratio = DEFAULT_SKIP_RATIO if options.skip_ratio is None else options.skip_ratio
        return never_skip, min(round(ratio * num_layers), skippable)
    if options.skip_layers > skippable:
        raise ValueError(
            f"clasp_skip_layers={options.skip_layers} exceeds the {skippable} skippable "
            f"layers of this model ({num_layers} layers, {num_layers - skippable} never "
            f"skipped); allowed: 0..{skippable}"
        )
    return never_skip, options.skip_layers


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(key: str, value, low: int | None = None, allow_none: bool = False,
               also: str | None = None) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        allowed = "an integer" if low is None else f"an integer >= {low}"
        allowed += f" or {also}" if also else ""
        raise ValueError(f"{key} must be {allowed}, got {value!r}")
