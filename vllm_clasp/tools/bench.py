"""`vllm-clasp bench`: a vLLM-native Spec-Bench runner comparing plain decoding, CLaSp and others.

Definitions follow Spec-Bench (hemingkx/Spec-Bench, `evaluation/speed.py`):

* prompt: the first turn of each question, wrapped in the model's chat template;
* per-prompt tokens/s = generated tokens / wall time of the `llm.generate` call that produced
  them (with batch size b > 1 the b prompts share one call's wall time);
* speedup = mean(tokens/s of the method) / mean(tokens/s of plain), per group and overall;
* mean accepted tokens tau = 1 + accepted / drafts (vLLM's own counters; includes the bonus
  token, so plain decoding is 1.00);
* outputs identical: greedy token ids equal to plain's for the same prompt, batch size and round.

Groups: `translation`, `summarization`, `qa`, `math_reasoning`, `rag`, and `mt_bench` (the 80
MT-bench questions, ordered round-robin over its 8 categories so that a few questions cover
several of them). `--offset N` skips the first N questions of each group.

Measurement, per batch size: every method's engine is built fresh and all are held at once
(one `LLM` per method; each has its own engine process), warmed up on prompts that are not
measured (`WARMUP_PROMPTS`, not Spec-Bench questions), then for each round and batch of
consecutive prompts every method runs that same batch in turn, the order rotating by one each
batch to cancel order effects. Fresh engines per batch size mean no method has seen the
measured prompts before (methods with memory across requests, such as suffix trees over past
responses, would otherwise be handed the answers). Round 1 is the "unseen" scenario, the
headline; later rounds (`--repeat`, `--rounds`) send the same prompts again, as agentic loops
do, and are reported apart as the "repeat" scenario. Counters are read before/after each call and attributed to the
call: vLLM's spec-decode counters (drafts, accepted) and, for CLaSp, its worker-side time split
(DP search, drafting; verify+rest = wall - DP - draft). Per-group figures that come from calls
(tau, time split) use only calls whose prompts all belong to the group.

This module owns the run: its options, the engines' lifecycle, the interleaved measurement
and the command line. The prompts come from `questions`, the methods from `methods`, what is
read from engines from `engine`, and the arithmetic, table and plots are `report`'s.

vLLM is imported lazily (inside functions) so that `vllm-clasp --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from vllm_clasp.tools.cpu_env import setup_iomp
from vllm_clasp.tools.engine import (
    clasp_stats,
    drop_failed_engine,
    engine_info,
    error_record,
    machine_info,
    memory_info,
    shutdown,
    spec_counters,
    worker_info,
)
from vllm_clasp.tools.methods import Method, parse_methods, unavailable
from vllm_clasp.tools.questions import (
    WARMUP_PROMPTS, Question, chat_prompt, chat_prompts, resolve_questions,
)
from vllm_clasp.tools.report import (
    BASELINE,
    GROUPS,
    MISMATCH_TOLERANCE,
    first_difference,
    format_report,
    mismatches,
    summarize,
    write_results,
)

logger = logging.getLogger("vllm_clasp.tools.bench")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH = 0, 1, 2, 3
UNSEEN, REPEAT = "unseen", "repeat"
"""Scenarios: a round's prompts are new to every engine (round 1), or sent again."""
#: Pause before each timed call so the previous engine's OpenMP threads stop spinning.
SETTLE_S = 0.25


@dataclass
class BenchOptions:
    """Everything `run_bench` needs; the CLI flags map one to one."""

    questions: str | None = None
    """Spec-Bench question.jsonl (None: DEFAULT_QUESTIONS relative to the working directory)."""
    question_list: list[Question] | None = None
    """Prompts to use instead of a questions file (then categories/per_category still apply)."""
    categories: tuple[str, ...] = GROUPS
    per_category: int = 5
    offset: int = 0
    max_tokens: int = 128
    temperature: float = 0.0
    seeded: bool = False
    """Give every request its own seed (fixed by its question, the same for every method)."""
    batch_sizes: tuple[int, ...] = (1,)
    dtype: str = "float32"
    methods: str | Sequence[Method] = "plain,clasp,suffix,ngram"
    sweep_skip: tuple[int, ...] = ()
    model: str | None = None
    rounds: int = 1
    """Passes over the prompts per batch size: the first is "unseen", later ones "repeat"."""
    out: str | None = None
    """Output directory for results.json and plots (None: write nothing)."""
    max_model_len: int = 2048
    enforce_eager: bool = False
    """False: vLLM compiles the model (torch.compile); plain decoding measured 16 % faster on
    the 2-core AVX2 CPU (17.4 vs 15.0 tokens/s, batch 1), but each engine starts in ~2.5-6 min
    instead of ~1 min."""
    warmup: int = 2
    """Warm-up prompts per engine (from WARMUP_PROMPTS, never measured)."""
    iomp: bool = True
    progress: bool = True
    print_table: bool = True
    console: IO[str] | None = None
    """Where progress bars and the report go (None: stderr and stdout); the demo and a quiet
    bench hand the terminal here while vLLM's output goes to a log file."""


# --------------------------------------------------------------------------- run


@dataclass
class _Measured:
    """What the engine phase of a run yields."""

    questions: list[Question]
    """The questions measured (those whose prompt fits --max-model-len)."""
    prompt_tokens: list[int]
    engine_meta: dict[str, dict]
    errors: list[dict]
    records: list[dict]
    calls: list[dict]
    skipped: dict[str, str]
    """Methods that cannot run here -> why (e.g. no arctic-inference for `suffix`)."""


def validate(options: BenchOptions) -> None:
    bad = [g for g in options.categories if g not in GROUPS and options.question_list is None]
    if bad or not options.categories:
        raise ValueError(f"--categories: unknown group(s) {', '.join(bad) or '(none)'}; "
                         f"choose from {','.join(GROUPS)}")
    for name in ("per_category", "max_tokens", "rounds", "max_model_len"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if options.offset < 0 or options.warmup < 0 or options.temperature < 0:
        raise ValueError("--offset, --warmup and --temperature must be >= 0")
    if not options.batch_sizes or min(options.batch_sizes) < 1:
        raise ValueError("--batch-sizes must be integers >= 1")


def run_bench(options: BenchOptions) -> dict:
    """Run the benchmark; returns the result dict (also written to options.out if set).

    result["exit_code"]: 3 when a greedy method's outputs differ from plain for more than 5 %
    of prompts, 1 when an engine failed, else 0. Speed never fails the run.
    """
    methods, questions = _inputs(options)
    machine = _prepare_process(options)

    from vllm_clasp.tools.model_prep import prepare_model

    model = str(prepare_model(options.model))
    started = time.perf_counter()
    measured = _run_engines(options, model, methods, questions, machine)
    total_s = time.perf_counter() - started
    try:
        machine["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    result = _result(options, model, methods, machine, measured, total_s)
    _publish(options, result)
    return result


def _inputs(options: BenchOptions) -> tuple[list[Method], list[Question]]:
    """The methods and questions of the run (ValueError / FileNotFoundError when invalid)."""
    validate(options)
    methods = (parse_methods(options.methods, options.sweep_skip)
               if isinstance(options.methods, str) else list(options.methods))
    questions = resolve_questions(options)
    if not questions:
        raise ValueError("no questions selected")
    return methods, questions


def _prepare_process(options: BenchOptions) -> dict:
    """Set the environment the engine processes inherit; returns the machine facts."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # CLaSp stats over RPC
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the report only
    iomp = setup_iomp(options.iomp)
    machine = machine_info()
    machine["iomp"] = iomp
    return machine


def _run_engines(options: BenchOptions, model: str, methods: list[Method],
                 questions: list[Question], machine: dict) -> _Measured:
    """Per batch size: build every engine (all held at once), warm up, measure, shut them
    all down."""
    errors, engine_meta, records, calls = [], {}, [], []
    skipped = {m.name: why for m in methods if (why := unavailable(m))}
    for name, why in skipped.items():
        logger.warning("method %s skipped: %s", name, why)
    methods = [m for m in methods if m.name not in skipped]
    prompts: list[str] | None = None  # made once, with the first plain engine's tokenizer
    prompt_tokens: list[int] = []
    for bs in options.batch_sizes:
        engines = {}
        try:
            _build_engines(options, model, methods, engines, errors, engine_meta, bs)
            if BASELINE not in engines:
                raise RuntimeError(f"the plain engine failed to start: {errors[-1]['error']}")
            if prompts is None:
                tokenizer = engines[BASELINE].get_tokenizer()
                questions, prompts, prompt_tokens = chat_prompts(
                    tokenizer, questions, options.max_model_len)
                warmup = [chat_prompt(tokenizer, WARMUP_PROMPTS[i % len(WARMUP_PROMPTS)])
                          for i in range(options.warmup)]
                machine["worker_torch_threads"] = (
                    engine_meta[BASELINE].get("worker") or {}).get("torch_threads")
            _warm_up(options, engines, warmup, errors, engine_meta)
            measured = _measure(options, engines, questions, prompts, errors, bs)
            records += measured[0]
            calls += measured[1]
            for name, llm in engines.items():
                engine_meta[name]["memory"] = _larger_peak(
                    engine_meta[name].get("memory"), memory_info(llm))
        finally:
            for llm in engines.values():
                shutdown(llm)
    return _Measured(questions, prompt_tokens, engine_meta, errors, records, calls, skipped)


def _larger_peak(before: dict | None, now: dict | None) -> dict | None:
    """The memory record with the larger peak (engines are rebuilt per batch size)."""
    if not before or not now:
        return now or before
    peak = "peak_rss_mib"
    return now if (now.get(peak) or 0) >= (before.get(peak) or 0) else before


def _result(options: BenchOptions, model: str, methods: list[Method], machine: dict,
            measured: _Measured, total_s: float) -> dict:
    """The result dict: configuration, machine, summary, output comparison, raw data."""
    questions, records, calls = measured.questions, measured.records, measured.calls
    names = [m.name for m in methods if m.name not in measured.skipped]
    groups = list(dict.fromkeys(q.group for q in questions))

    def scenario(name: str) -> list[dict]:
        return summarize([r for r in records if r["scenario"] == name],
                         [c for c in calls if c["scenario"] == name],
                         names, groups, options.batch_sizes)

    mm = mismatches(records, names) if options.temperature == 0 else {}
    failing = {m: v for m, v in mm.items() if v["share"] > MISMATCH_TOLERANCE}
    exit_code = EXIT_MISMATCH if failing else EXIT_ERROR if measured.errors else EXIT_OK
    return {
        "config": _config(options, model, methods, groups, measured.engine_meta),
        "machine": machine, "engines": measured.engine_meta,
        "num_prompts": len(questions), "total_s": total_s,
        "questions": [{"question_id": q.question_id, "group": q.group, "category": q.category,
                       "prompt_tokens": n, "text": q.text}
                      for q, n in zip(questions, measured.prompt_tokens)],
        "summary": scenario(UNSEEN), "summary_repeat": scenario(REPEAT) if options.rounds > 1
        else [], "skipped_methods": measured.skipped,
        "mismatches": mm, "failing_methods": sorted(failing), "errors": measured.errors, "exit_code": exit_code, "calls": calls, "records": records,
    }


def _config(options: BenchOptions, model: str, methods: list[Method], groups: list[str],
            engine_meta: dict[str, dict]) -> dict:
    """The run's settings as recorded in results.json, with each method's resolved config."""
    skip = ("question_list", "methods", "progress", "print_table", "console")
    config = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
              if f.name not in skip}  # not asdict: it would deep-copy the console stream
    config.update(model=model, categories=groups, methods=[
        {"name": m.name, "speculative_config": m.speculative_config,
         "sweep": m.name.startswith("clasp-skip") and m.name[len("clasp-skip"):].isdigit(),
         "resolved": engine_meta.get(m.name, {}).get("speculative")} for m in methods])
    return config


def _publish(options: BenchOptions, result: dict) -> None:
    """Write results.json and plots to options.out and print the table, as asked."""
    if options.out:
        result["files"] = [str(p) for p in write_results(result, options.out)]
    if options.print_table:
        out = options.console or sys.stdout
        print(format_report(result), file=out, flush=True)
        if options.out:
            print(f"results: {Path(options.out) / 'results.json'}", file=out, flush=True)


def _bar(options, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=options.console or sys.stderr,
                disable=not options.progress, dynamic_ncols=True)


def _build_engines(options, model, methods, engines, errors, engine_meta, bs: int) -> None:
    with _bar(options, len(methods), f"starting engines (batch size {bs})") as bar:
        for method in methods:
            bar.set_postfix_str(method.name)
            _build_engine(options, model, method, engines, errors, engine_meta)
            bar.update(1)


def _build_engine(options, model, method, engines, errors, engine_meta) -> None:
    from vllm import LLM

    logger.info("starting engine %s: %s", method.name, method.speculative_config)
    t0 = time.perf_counter()
    try:
        llm = LLM(model=model, dtype=options.dtype, enforce_eager=options.enforce_eager,
                  max_model_len=options.max_model_len,
                  speculative_config=method.speculative_config, disable_log_stats=False,
                  seed=0)
    except Exception as e:
        errors.append(error_record(method.name, "build", e))
        return
    engines[method.name] = llm
    engine_meta[method.name] = {"build_s": time.perf_counter() - t0,
                                "speculative": engine_info(llm),
                                "worker": worker_info(llm)}


def _sampling_params(options: BenchOptions, questions=None):
    """The requests' sampling parameters: one for all, or with --seeded one per question
    (seed = a stable hash of its id; a seeded request drafts by CLaSp's seeded policy,
    docs/design.md). Unseeded, the engines' own `seed=0` keeps sampled runs repeatable."""
    import zlib

    from vllm import SamplingParams

    if not options.seeded or questions is None:
        return SamplingParams(temperature=options.temperature, max_tokens=options.max_tokens)
    return [SamplingParams(temperature=options.temperature, max_tokens=options.max_tokens,
                           seed=zlib.crc32(str(q.question_id).encode()))
            for q in questions]


def _warm_up(options, engines, prompts, errors, engine_meta) -> None:
    params = _sampling_params(options)
    with _bar(options, len(engines), "warming up") as bar:
        for name, llm in list(engines.items()):
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            try:
                for p in prompts[:options.warmup]:
                    llm.generate([p], params, use_tqdm=False)
            except Exception as e:
                drop_failed_engine(engines, errors, name, "warmup", e)
            else:
                engine_meta[name]["warmup_s"] = time.perf_counter() - t0
            bar.update(1)


def _measure(options, engines, questions, prompts, errors, bs: int
             ) -> tuple[list[dict], list[dict]]:
    """Every round and batch of `bs` consecutive prompts on every engine, in rotating order;
    records each prompt's output, marked identical to plain's or not (greedy)."""
    n = len(prompts)
    records, calls = [], []
    rotation = 0
    with _bar(options, options.rounds * -(-n // bs), f"measuring (batch size {bs})") as bar:
        for rnd in range(options.rounds):
            for start in range(0, n, bs):
                idx = list(range(start, min(start + bs, n)))
                names = list(engines)
                order = names[rotation % len(names):] + names[:rotation % len(names)]
                rotation += 1
                batch_records = {}
                for name in order:
                    try:
                        call, recs = _timed_call(engines[name], name, options,
                                                 [prompts[i] for i in idx],
                                                 [questions[i] for i in idx], bs, rnd, start)
                    except Exception as e:
                        drop_failed_engine(engines, errors, name, "generate", e)
                        continue
                    call["order"] = order.index(name)
                    calls.append(call)
                    batch_records[name] = recs
                _compare_to_plain(batch_records, options.temperature)
                records.extend(r for recs in batch_records.values() for r in recs)
                bar.update(1)
    return records, calls


def _compare_to_plain(batch_records: dict[str, list[dict]], temperature: float) -> None:
    """Mark each record identical to plain's output for the same prompt, or not (greedy)."""
    base = batch_records.get(BASELINE)
    for name, recs in batch_records.items():
        for i, r in enumerate(recs):
            if base is None or name == BASELINE or temperature != 0:
                r["identical"], r["first_difference"] = None, None
            else:
                diff = first_difference(base[i]["token_ids"], r["token_ids"])
                r["identical"], r["first_difference"] = diff is None, diff


def _timed_call(llm, name, options, prompts, questions, bs, rnd, start):
    from vllm_clasp.core.options import is_clasp

    clasp = is_clasp(llm.llm_engine.vllm_config.speculative_config)
    time.sleep(SETTLE_S)
    spec0 = spec_counters(llm)
    clasp0 = clasp_stats(llm) if clasp else None
    params = _sampling_params(options, questions)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    spec1 = spec_counters(llm)
    clasp1 = clasp_stats(llm) if clasp else None
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    scenario = UNSEEN if rnd == 0 else REPEAT
    call = {
        "method": name, "batch_size": bs, "round": rnd, "scenario": scenario,
        "batch_start": start,
        "question_ids": [q.question_id for q in questions], "groups": [q.group for q in questions],
        "wall_s": wall, "num_tokens": [len(t) for t in tokens],
        **{k: spec1[k] - spec0[k] for k in spec0},
        "clasp": _delta(clasp0, clasp1),
    }
    recs = [{"method": name, "batch_size": bs, "round": rnd, "scenario": scenario,
             "question_id": q.question_id,
             "group": q.group, "category": q.category, "num_tokens": len(t), "wall_s": wall,
             "tps": len(t) / wall if wall > 0 else 0.0, "token_ids": t,
             "text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason}
            for q, t, o in zip(questions, tokens, outputs)]
    return call, recs


def _delta(before: dict | None, after: dict | None) -> dict | None:
    if before is None or after is None:
        return None
    out = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))}
    skipped = {}
    for k, v in after.get("skipped_layers", {}).items():
        d = v - before.get("skipped_layers", {}).get(k, 0)
        if d:
            skipped[str(k)] = d
    out["skipped_layers"] = skipped
    return out
