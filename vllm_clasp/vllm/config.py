"""`ClaspSpeculativeConfig`: vLLM's SpeculativeConfig with `method="clasp"` and CLaSp's knobs.

vLLM's `SpeculativeConfig.method` is a closed Literal and the class forbids extra keys, so a
subclass carries the `clasp_*` fields; `patches.py` makes `EngineArgs.create_speculative_config`
build this class when the JSON says `"method": "clasp"`. The subclass pickles to engine and
worker processes like its parent (the plugin is importable there).
"""

from __future__ import annotations

import logging
import os

from pydantic import SkipValidation
from vllm.config.speculative import SpeculativeConfig
from vllm.config.utils import config

from vllm_clasp.core.options import (
    KNOB_PREFIX, METHOD as CLASP_METHOD, ClaspOptions, ResolvedClaspOptions, knob_names,
)

logger = logging.getLogger("vllm.clasp.config")  # covered by vLLM's logging setup

# Model families CI drafts with (tests/e2e/test_model_families.py: the full-model draft is
# accepted every time, and greedy output equals plain decoding). Others are accepted when their
# structure fits the draft path, checked when the model loads (vllm_clasp.vllm.decoder_stack)
# and when its KV cache is set up (vllm_clasp.vllm.paged_rows): both at engine start-up.
TESTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Qwen3MoeForCausalLM",
)


@config
class ClaspSpeculativeConfig(SpeculativeConfig):
    """SpeculativeConfig for CLaSp; see `vllm_clasp.core.options` for the knobs' meaning."""

    method: str | None = None  # type: ignore[assignment]
    # The knob table is ClaspOptions (core/options.py); these fields mirror it one to one
    # (tests/unit/test_docs.py checks, and that docs/configuration.md lists the same knobs).
    # SkipValidation: pydantic's lax coercion would turn `true` into 1 and "12" into 12 before
    # ClaspOptions sees them; ClaspOptions validates each knob and names key and allowed range.
    clasp_skip_layers: SkipValidation[int | str | None] = None
    clasp_skip_ratio: SkipValidation[float | None] = None
    clasp_loi: SkipValidation[int | None] = None
    clasp_draft_exit_threshold: SkipValidation[float | None] = None
    clasp_never_skip: SkipValidation[list[int] | None] = None
    clasp_draft_vocab_size: SkipValidation[int | None] = None
    clasp_copy_source: SkipValidation[str | None] = None
    clasp_max_model_draft_tokens: SkipValidation[int | None] = None
    clasp_prompt_lookup_max: SkipValidation[int | None] = None
    clasp_prompt_lookup_min: SkipValidation[int | None] = None
    clasp_suffix_decoding_max_tree_depth: SkipValidation[int | None] = None
    clasp_suffix_decoding_max_cached_requests: SkipValidation[int | None] = None
    clasp_suffix_decoding_max_spec_factor: SkipValidation[float | None] = None
    clasp_suffix_decoding_min_token_prob: SkipValidation[float | None] = None
    clasp_adaptive: SkipValidation[bool | None] = None
    clasp_share_skip_sets: SkipValidation[bool | None] = None
    clasp_compile_layers: SkipValidation[bool | None] = None

    def __post_init__(self):  # noqa: D105 - mirrors SpeculativeConfig's ngram/custom_class path
        if self.method != CLASP_METHOD:
            raise ValueError(f"ClaspSpeculativeConfig needs method='clasp', got {self.method!r}")
        if self.model is not None:
            raise ValueError(
                "method='clasp' drafts with the target model itself; do not set 'model' "
                f"(got {self.model!r})"
            )
        if _forces_v2_runner(os.environ.get("VLLM_USE_V2_MODEL_RUNNER")):
            raise ValueError(
                "method='clasp' runs on vLLM's V1 model runner, but VLLM_USE_V2_MODEL_RUNNER=1 "
                "forces V2; unset it"
            )
        target = self.target_model_config
        if target is None:
            raise ValueError("method='clasp' needs target_model_config")
        parallel = self.target_parallel_config
        if parallel is not None and parallel.pipeline_parallel_size > 1:
            raise ValueError(
                "method='clasp' does not support pipeline parallelism (the draft needs every "
                "decoder layer on one rank); use tensor parallelism"
            )
        options = self.clasp_options()
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = options.default_num_speculative_tokens()
        if self.draft_tensor_parallel_size not in (None, parallel.tensor_parallel_size if parallel else 1):
            raise ValueError(
                "method='clasp' drafts with the target's own layers: "
                "draft_tensor_parallel_size must equal the target's tensor_parallel_size"
            )
        # Resolving checks every knob against this model (layer count, vocabulary); the result
        # travels with the config to every process (resolved_options).
        self.resolved_options()
        # Same bookkeeping as vLLM's model-free methods (ngram, custom_class).
        self.model = CLASP_METHOD
        self.prompt_lookup_max = 0
        self.prompt_lookup_min = 0
        self.draft_model_config = target
        self.draft_parallel_config = parallel
        if parallel is not None:
            self.draft_tensor_parallel_size = parallel.tensor_parallel_size

    def num_lookahead_slots(self) -> int:
        """KV slots the scheduler reserves per request beyond the verified tokens: what the
        layer-skip draft passes write (patch 2); 0 when they are off."""
        return self.resolved_options().max_model_draft_tokens

    def resolved_options(self) -> ResolvedClaspOptions:
        """The knobs resolved against the target model (`ClaspOptions.resolve`): resolved once,
        when the config is built, and carried with it (it pickles to engine and workers).
        Raises ValueError for a knob this model cannot take."""
        k = self.num_speculative_tokens
        cached = self.__dict__.get("_clasp_resolved")
        if cached is None or cached[0] != k:  # K is the one input vLLM could change later
            target = self.target_model_config
            resolved = self.clasp_options().resolve(
                num_layers=target.hf_config.get_text_config().num_hidden_layers,
                vocab_size=target.get_vocab_size(), num_speculative_tokens=k)
            cached = (k, resolved)
            object.__setattr__(self, "_clasp_resolved", cached)
        return cached[1]

    def clasp_options(self) -> ClaspOptions:
        """The knobs given (None counts as unset), validated (`ClaspOptions`)."""
        return ClaspOptions.from_dict(
            {k: getattr(self, k) for k in knob_names() if getattr(self, k) is not None})

    def __repr__(self) -> str:
        return (
            f"ClaspSpeculativeConfig(method='clasp', "
            f"num_spec_tokens={self.num_speculative_tokens}, {self.clasp_options()})"
        )


def _forces_v2_runner(value: str | None) -> bool:
    """vLLM reads VLLM_USE_V2_MODEL_RUNNER as bool(int(value)) when set."""
    if value is None or not value.strip():
        return False
    try:
        return bool(int(value))
    except ValueError:
        return False


def lora_default_num_speculative_tokens(engine_args, knobs: dict, model_config) -> int:
    """K for a LoRA engine whose user gave none: CLaSp's default, lowered to fit vLLM's LoRA
    limit `max_num_batched_tokens >= max_num_seqs * (K + 1)` (`EngineArgs.create_engine_config`).

    The batch limits are not resolved yet when the speculative config is built, so unset ones
    are taken at their most demanding default for this platform (fewest batched tokens, most
    sequences, `EngineArgs.get_batch_defaults`); an explicit K is never changed."""
    from vllm.config.scheduler import SchedulerConfig

    options = ClaspOptions.from_dict({k: v for k, v in knobs.items()
                                      if k.startswith(KNOB_PREFIX) and v is not None})
    default = options.default_num_speculative_tokens()
    tokens, seqs = engine_args.max_num_batched_tokens, engine_args.max_num_seqs
    if tokens is None or seqs is None:
        world = engine_args.pipeline_parallel_size * engine_args.tensor_parallel_size
        default_tokens, default_seqs = engine_args.get_batch_defaults(world)
        if seqs is None:
            seqs = max(default_seqs.values(), default=SchedulerConfig.DEFAULT_MAX_NUM_SEQS)
        if tokens is None:
            tokens = min(default_tokens.values(),
                         default=SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)
            tokens = min(tokens, seqs * model_config.max_model_len)
        seqs = min(seqs, tokens)
    k = max(1, min(default, tokens // max(seqs, 1) - 1))
    if k < default:
        logger.info(
            "CLaSp: num_speculative_tokens defaults to %d, not %d, with LoRA: vLLM needs "
            "max_num_batched_tokens (%d) >= max_num_seqs (%d) x (num_speculative_tokens + 1); "
            "set num_speculative_tokens in --speculative-config, or raise "
            "max_num_batched_tokens / lower max_num_seqs, for longer drafts",
            k, default, tokens, seqs)
    return k

