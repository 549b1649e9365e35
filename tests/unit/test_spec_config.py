"""`--speculative-config` validation through vLLM, without starting an engine.

`EngineArgs(...).create_engine_config()` is what `LLM(...)` and `vllm serve` run first; the
plugin is registered through vLLM's entry point when `EngineArgs` is constructed. Importing
vLLM costs ~15 s once per process; after that each `create_engine_config` takes ~3 s the first
time and ~10 ms afterwards (the model's HF config is cached), so no fixture shares configs.
"""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import time

import pytest

from vllm_clasp.tools.model_prep import prepare_model
from vllm_clasp.core.options import (
    DEFAULT_MAX_MODEL_DRAFT_TOKENS, DEFAULT_SUFFIX_MAX_TREE_DEPTH, ClaspOptions,
)

# vLLM's own error wording, per supported release (scripts/check-host.sh runs these tests over
# each release's sources).
HOST_WORDING = {
    "async_refused": {
        "0.32": "async scheduling is only supported",
        "0.33": "Async scheduling is not supported by the V1 model runner with clasp-based",
    },
}


def host_release() -> str:
    """"0.32" or "0.33": the vLLM whose sources are imported."""
    import vllm

    return ".".join(vllm.__version__.split(".")[:2])

MAX_MODEL_LEN = 2048
VOCAB_SIZE = 49152  # SmolLM2-135M: 30 layers, 28 skippable with the default never-skip [0, -1]

durations: list[tuple[str, float]] = []


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(prepare_model())


@pytest.fixture(scope="module")
def engine_args_cls():
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs


@pytest.fixture
def make_config(engine_args_cls, model_dir, request):
    def make(speculative_config, model: str | None = None, **kwargs):
        args = engine_args_cls(
            model=model or model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN,
            speculative_config=speculative_config, **kwargs,
        )
        started = time.perf_counter()
        try:
            return args.create_engine_config()
        finally:
            durations.append((request.node.name, time.perf_counter() - started))

    return make


def config_error(make_config, speculative_config, **kwargs) -> str:
    with pytest.raises(ValueError) as info:  # pydantic's ValidationError is a ValueError
        make_config(speculative_config, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- accepted


def test_defaults(make_config):
    from vllm.config.speculative import SpeculativeConfig

    from vllm_clasp.vllm.config import ClaspSpeculativeConfig

    config = make_config({"method": "clasp"})
    spec = config.speculative_config
    assert type(spec) is ClaspSpeculativeConfig
    assert isinstance(spec, SpeculativeConfig)
    assert spec.method == "clasp"
    # With arctic-inference (installed by scripts/setup.sh) copies come from suffix trees and
    # K defaults to the tree depth, as for vLLM's `suffix` method; the lookahead KV slots are
    # what the layer-skip drafts write (8), not K.
    assert spec.num_speculative_tokens == DEFAULT_SUFFIX_MAX_TREE_DEPTH == 24
    assert config.num_lookahead_tokens == DEFAULT_MAX_MODEL_DRAFT_TOKENS == 8
    assert config.use_v2_model_runner is False
    # Patch 3 lists clasp as a V2-unsupported feature (decisive on GPU, where V2 is the default;
    # on CPU V1 is chosen anyway because Triton has no CPU backend).
    assert "speculative method 'clasp'" in config._get_v2_model_runner_unsupported_features()
    # Bookkeeping of vLLM's model-free methods.
    assert spec.model == "clasp"
    assert spec.draft_model_config is config.model_config
    assert spec.draft_parallel_config is config.parallel_config
    assert spec.draft_tensor_parallel_size == 1
    assert (spec.prompt_lookup_max, spec.prompt_lookup_min) == (0, 0)
    # Knob defaults: nothing set, ClaspOptions' defaults apply.
    assert spec.clasp_options() == ClaspOptions()


def test_every_knob_set(make_config):
    spec = make_config({
        "method": "clasp", "num_speculative_tokens": 5, "clasp_skip_layers": 12,
        "clasp_loi": 3, "clasp_draft_exit_threshold": 0.4, "clasp_never_skip": [0, 1, -1],
        "clasp_draft_vocab_size": 1000, "clasp_prompt_lookup_max": 4,
        "clasp_prompt_lookup_min": 1, "clasp_adaptive": False,
    }).speculative_config
    options = spec.clasp_options()
    assert spec.num_speculative_tokens == 5
    assert (options.skip_layers, options.loi, options.draft_exit_threshold) == (12, 3, 0.4)
    assert options.never_skip == (0, 1, -1) and options.draft_vocab_size == 1000
    assert (options.prompt_lookup_max, options.prompt_lookup_min) == (4, 1)
    assert options.adaptive is False
    # Every ClaspOptions field has its clasp_* config field (and is passed through).
    for field in dataclasses.fields(ClaspOptions):
        assert hasattr(spec, "clasp_" + field.name), field.name
    assert "num_spec_tokens=5" in repr(spec) and "loi=3" in repr(spec)


@pytest.mark.parametrize("limits", [{}, {"max_num_batched_tokens": 256, "max_num_seqs": 16},
                                    {"max_num_batched_tokens": 100, "max_num_seqs": 50}])
def test_lora_default_k_fits_vllms_lora_limit(make_config, limits):
    """vLLM refuses LoRA with speculation when max_num_batched_tokens < max_num_seqs x (K+1);
    a K the user did not choose must fit that, whatever the batch limits."""
    config = make_config({"method": "clasp"}, enable_lora=True, max_lora_rank=8, **limits)
    spec, scheduler = config.speculative_config, config.scheduler_config
    k = spec.num_speculative_tokens
    assert 1 <= k < DEFAULT_SUFFIX_MAX_TREE_DEPTH
    assert scheduler.max_num_batched_tokens >= scheduler.max_num_seqs * (k + 1)
    if limits:  # given limits are exact: the largest K that fits
        assert k == min(DEFAULT_SUFFIX_MAX_TREE_DEPTH,
                        limits["max_num_batched_tokens"] // limits["max_num_seqs"] - 1)
    assert config.num_lookahead_tokens == min(DEFAULT_MAX_MODEL_DRAFT_TOKENS, k)


def test_lora_keeps_the_default_k_where_it_fits_and_an_explicit_k_always(make_config):
    roomy = make_config({"method": "clasp"}, enable_lora=True, max_num_batched_tokens=4096,
                        max_num_seqs=16)
    assert roomy.speculative_config.num_speculative_tokens == DEFAULT_SUFFIX_MAX_TREE_DEPTH
    # A K the user chose is theirs: vLLM's own error names both knobs.
    message = config_error(make_config, {"method": "clasp", "num_speculative_tokens": 24},
                           enable_lora=True, max_num_batched_tokens=256, max_num_seqs=16)
    assert "max_num_batched_tokens" in message and "num_speculative_tokens" in message


def test_num_lookahead_follows_k(make_config):
    config = make_config({"method": "clasp", "num_speculative_tokens": 3, "clasp_skip_ratio": 0.3})
    assert config.num_lookahead_tokens == 3
    assert config.speculative_config.clasp_options().skip_ratio == 0.3


def test_hyphenated_keys_are_accepted(make_config):
    spec = make_config({"method": "clasp", "num-speculative-tokens": 4, "clasp-loi": 2})
    assert spec.speculative_config.num_speculative_tokens == 4
    assert spec.speculative_config.clasp_loi == 2


def test_cli_shorthand_flags(make_config):
    """--spec-method / --spec-tokens work with clasp (patches.py merges them like vLLM)."""
    config = make_config(None, spec_method="clasp", spec_tokens=4)
    assert config.speculative_config.method == "clasp"
    assert config.num_lookahead_tokens == 4
    config = make_config({"method": "clasp"}, spec_tokens=5)
    assert config.speculative_config.num_speculative_tokens == 5
    message = config_error(
        make_config, {"method": "clasp", "num_speculative_tokens": 3}, spec_tokens=4
    )
    assert "--spec-tokens" in message and "mutually exclusive" in message


def test_config_pickles(make_config):
    """Engine-core and worker processes receive the config pickled."""
    from vllm_clasp.vllm.config import ClaspSpeculativeConfig

    config = make_config({"method": "clasp", "clasp_loi": 3, "clasp_never_skip": [0, -1]})
    spec = pickle.loads(pickle.dumps(config.speculative_config))
    assert type(spec) is ClaspSpeculativeConfig
    assert spec.clasp_loi == 3 and spec.clasp_options() == config.speculative_config.clasp_options()


def test_options_are_resolved_once_and_carried(make_config, monkeypatch):
    """The knobs are resolved when the config is built; the pickled config (what engine and
    workers get) carries the result, so nothing downstream resolves them again."""
    config = make_config({"method": "clasp", "clasp_skip_layers": 7, "num_speculative_tokens": 5})
    resolved = config.speculative_config.resolved_options()
    assert (resolved.num_layers, resolved.num_skip, resolved.max_model_draft_tokens) == (30, 7, 5)

    def fail(*args, **kwargs):
        raise AssertionError("options resolved again")

    spec = pickle.loads(pickle.dumps(config.speculative_config))
    monkeypatch.setattr(ClaspOptions, "resolve", fail)
    assert spec.resolved_options() == resolved
    assert spec.num_lookahead_slots() == 5


# --------------------------------------------------------------------------- rejected knobs


@pytest.mark.parametrize(
    "knobs, expected",
    [
        ({"clasp_loi": 0}, "clasp_loi must be an integer >= 1, got 0"),
        ({"clasp_loi": True}, "clasp_loi must be an integer >= 1, got True"),
        ({"clasp_loi": "8"}, "clasp_loi must be an integer >= 1, got '8'"),
        ({"clasp_skip_ratio": 1.5}, "clasp_skip_ratio must be a number in [0, 1), got 1.5"),
        ({"clasp_skip_ratio": "0.5"}, "clasp_skip_ratio must be a number in [0, 1)"),
        ({"clasp_skip_layers": -1}, "clasp_skip_layers must be an integer >= 0"),
        ({"clasp_skip_layers": 29}, "clasp_skip_layers=29 exceeds the 28 skippable layers"),
        ({"clasp_skip_layers": 3, "clasp_skip_ratio": 0.5},
         "clasp_skip_layers and clasp_skip_ratio are mutually exclusive"),
        ({"clasp_never_skip": [99]}, "clasp_never_skip: layer 99 out of range"),
        ({"clasp_never_skip": [-31]}, "allowed: -30..29"),
        ({"clasp_never_skip": 3}, "clasp_never_skip must be a list of layer indices"),
        ({"clasp_never_skip": [True]}, "clasp_never_skip[] must be an integer"),
        ({"clasp_draft_exit_threshold": 1.0},
         "clasp_draft_exit_threshold must be a number in [0, 1), got 1.0"),
        ({"clasp_draft_vocab_size": -1}, "clasp_draft_vocab_size must be an integer >= 0"),
        ({"clasp_prompt_lookup_max": -1}, "clasp_prompt_lookup_max must be an integer >= 0"),
        ({"clasp_prompt_lookup_min": 0}, "clasp_prompt_lookup_min must be an integer >= 1"),
        ({"clasp_prompt_lookup_max": 2, "clasp_prompt_lookup_min": 3},
         "clasp_prompt_lookup_min=3 must be <= clasp_prompt_lookup_max=2"),
        ({"clasp_adaptive": 1}, "clasp_adaptive must be true or false, got 1"),
        ({"clasp_adaptive": "false"}, "clasp_adaptive must be true or false"),
        ({"clasp_draft_vocab_size": VOCAB_SIZE + 1},
         f"clasp_draft_vocab_size={VOCAB_SIZE + 1} exceeds the model's vocabulary"),
        ({"model": "x"}, "do not set 'model'"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size must equal"),
    ],
)
def test_bad_knob_is_rejected_naming_the_key(make_config, knobs, expected):
    message = config_error(make_config, {"method": "clasp", **knobs})
    assert expected in message


def test_skip_layers_limit_names_allowed_range(make_config):
    message = config_error(make_config, {"method": "clasp", "clasp_skip_layers": 29})
    assert "allowed: 0..28" in message
    assert make_config({"method": "clasp", "clasp_skip_layers": 28}).speculative_config


@pytest.mark.parametrize("key", ["clasp_foo", "loi", "skip_ratio"])
def test_unknown_key_is_rejected(make_config, key):
    message = config_error(make_config, {"method": "clasp", key: 1})
    assert key in message
    assert "Unexpected keyword argument" in message or "unknown" in message.lower()


def test_v2_model_runner_env_is_rejected(make_config, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    message = config_error(make_config, {"method": "clasp"})
    assert "VLLM_USE_V2_MODEL_RUNNER=1" in message and "V1 model runner" in message
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert make_config({"method": "clasp"}).use_v2_model_runner is False


def test_pipeline_parallel_is_rejected(make_config):
    message = config_error(make_config, {"method": "clasp"}, pipeline_parallel_size=2)
    assert "does not support pipeline parallelism" in message
    assert "tensor parallelism" in message


def test_async_scheduling_is_off(make_config):
    """The proposer reads the runner's CPU token ids, current only with synchronous
    scheduling; vLLM turns async scheduling off for methods it does not list (clasp included)
    and refuses an explicit request for it."""
    assert make_config({"method": "clasp"}).scheduler_config.async_scheduling is False
    message = config_error(make_config, {"method": "clasp"}, async_scheduling=True)
    assert HOST_WORDING["async_refused"][host_release()] in message


# --------------------------------------------------------------------------- architectures


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, model_dir):
    """A tiny GPT-2 (an architecture clasp does not support) with SmolLM2's tokenizer."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("gpt2")
    GPT2Config(
        n_layer=2, n_embd=64, n_head=2, n_positions=MAX_MODEL_LEN, vocab_size=VOCAB_SIZE,
        architectures=["GPT2LMHeadModel"],
    ).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_dir}/{name}", path / name)
    return str(path)


def test_architectures_are_not_refused_by_name(make_config, gpt2_dir):
    """The config no longer refuses by architecture name: the draft path's structure is
    checked when the model loads, at engine start-up (tests/e2e/test_model_families.py)."""
    assert make_config(None, model=gpt2_dir).speculative_config is None
    assert make_config({"method": "clasp"}, model=gpt2_dir).speculative_config.method == "clasp"


# --------------------------------------------------------------------------- inertness


def test_ngram_is_untouched(make_config):
    from vllm.config.speculative import SpeculativeConfig

    config = make_config({"method": "ngram", "num_speculative_tokens": 3,
                          "prompt_lookup_max": 3})
    assert type(config.speculative_config) is SpeculativeConfig
    assert config.num_lookahead_tokens == 0
    assert "speculative method 'clasp'" not in config._get_v2_model_runner_unsupported_features()


def test_no_speculative_config_is_untouched(make_config):
    config = make_config(None)
    assert config.speculative_config is None
    assert config.num_lookahead_tokens == 0


def test_clasp_keys_are_rejected_for_other_methods(make_config):
    message = config_error(
        make_config, {"method": "ngram", "num_speculative_tokens": 3, "clasp_loi": 2}
    )
    assert "clasp_loi" in message


def test_report_durations():
    """Not a check of behaviour: the config calls above stay cheap (~ms once warm)."""
    assert durations, "run with the other tests of this file"
    warm = sorted(seconds for _, seconds in durations[1:])
    assert warm[len(warm) // 2] < 5.0, durations
