"""`vllm-clasp bench` on the command line: its flags, the options they make, and running the
benchmark (`bench.run_bench`) with vLLM's output in a log file and usage errors as exit codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

from vllm_clasp.tools import bench
from vllm_clasp.tools.bench import EXIT_ERROR, EXIT_USAGE, BenchOptions
from vllm_clasp.tools.console import QuietFailure, quiet
from vllm_clasp.tools.cpu_env import maybe_reexec_with_iomp
from vllm_clasp.tools.methods import parse_int_list, parse_methods
from vllm_clasp.tools.questions import DEFAULT_QUESTIONS, resolve_questions
from vllm_clasp.tools.report import GROUPS, MISMATCH_TOLERANCE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", metavar="PATH",
                        help=f"Spec-Bench question.jsonl (default: {DEFAULT_QUESTIONS} relative "
                             "to the current directory)")
    parser.add_argument("--categories", default=",".join(GROUPS),
                        help=f"comma list of groups (default: all: {','.join(GROUPS)})")
    parser.add_argument("--per-category", type=int, default=5, metavar="N",
                        help="questions per group (default 5)")
    parser.add_argument("--offset", type=int, default=0, metavar="N",
                        help="skip the first N questions of each group (tune on one half, "
                             "report on the other)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (default 0: greedy, outputs compared)")
    parser.add_argument("--seeded", action="store_true",
                        help="give every request its own seed (fixed per question, the same "
                             "for every method)")
    parser.add_argument("--batch-sizes", default="1", metavar="LIST",
                        help="comma list of batch sizes (default 1)")
    _add_engine_arguments(parser)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags about the engines: dtype, methods, model, rounds, output, warm-up, logging."""
    parser.add_argument("--dtype", default="float32",
                        help="model dtype (default float32: memory-bound on AVX2 CPUs, where "
                             "bf16 is emulated and compute-bound)")
    parser.add_argument("--methods", default="plain,clasp,suffix,ngram", metavar="LIST",
                        help="comma list of plain, clasp, clasp-layers (no copied drafts), "
                             "suffix (vLLM's, needs arctic-inference), ngram "
                             "or name=JSON (any speculative "
                             "config, e.g. 'clasp8={\"method\":\"clasp\",\"clasp_skip_layers\":8}')"
                             "; ngram = num_speculative_tokens 4 with vLLM's default "
                             "prompt_lookup_min/max (5); plain is always added")
    parser.add_argument("--model", default=None,
                        help="model name or HF directory (default: the prepared default model)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="passes over the prompts per batch size (default 1); the first "
                             "is the 'unseen' scenario, later ones the 'repeat' scenario")
    parser.add_argument("--repeat", action="store_true",
                        help="also send the prompts a second time (--rounds 2): the 'repeat' "
                             "scenario, reported apart, where memory across requests "
                             "(suffix trees) is meant to win")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (default bench-results/<timestamp>)")
    parser.add_argument("--sweep-skip", default=None, metavar="LIST",
                        help="also run clasp with clasp_skip_layers = each value (plot of tau "
                             "and speedup vs skipped layers)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                        help="eager mode: engines start in ~1 min instead of several minutes of "
                             "torch.compile, but plain decoding is slower (default: compiled, "
                             "measured 16%% faster for plain on a 2-core AVX2 CPU)")
    parser.add_argument("--warmup", type=int, default=2, metavar="N",
                        help="warm-up prompts per engine (generic prompts, not Spec-Bench "
                             "questions; never measured; default 2)")
    parser.add_argument("--no-iomp", action="store_true",
                        help="do not preload Intel OpenMP (libiomp5) on CPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="show vLLM's own logs on the terminal (default: they go to a log "
                             "file under ~/.cache/vllm-clasp/logs, whose path is printed)")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        questions=args.questions,
        categories=tuple(c.strip() for c in args.categories.split(",") if c.strip()),
        per_category=args.per_category, offset=args.offset, max_tokens=args.max_tokens,
        temperature=args.temperature, seeded=args.seeded,
        batch_sizes=parse_int_list(args.batch_sizes, "--batch-sizes", low=1),
        dtype=args.dtype, methods=args.methods,
        sweep_skip=parse_int_list(args.sweep_skip, "--sweep-skip") if args.sweep_skip else (),
        model=args.model, rounds=max(args.rounds, 2 if args.repeat else 1),
        out=args.out or os.path.join(
            "bench-results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")),
        max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, warmup=args.warmup,
        iomp=not args.no_iomp, progress=not args.no_progress,
    )


def run_for_cli(tool: str, options: BenchOptions, verbose: bool) -> dict | None:
    """`run_bench` as the `bench` and `demo` commands run it: Intel OpenMP preloaded (a
    re-exec), vLLM's own output in a log file unless `verbose`; None, after printing why,
    when it could not run."""
    maybe_reexec_with_iomp(options.iomp)
    result = None
    try:
        with quiet(tool, verbose) as console:
            result = bench.run_bench(dataclasses.replace(options, console=console))
            if result["errors"]:  # engines that failed and were dropped: show why
                raise QuietFailure
    except QuietFailure:
        pass
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"vllm-clasp {tool}: error: {e}", file=sys.stderr)
        return None
    return result


def run_cli(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
        bench.validate(options)
        parse_methods(options.methods, options.sweep_skip)
        resolve_questions(options)
    except (ValueError, FileNotFoundError) as e:
        print(f"vllm-clasp bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    result = run_for_cli("bench", options, args.verbose)
    if result is None:
        return EXIT_ERROR
    for method in result["failing_methods"]:
        mm = result["mismatches"][method]
        print(f"vllm-clasp bench: FAIL: {method} outputs differ from plain for "
              f"{mm['differing']}/{mm['compared']} prompts (> {MISMATCH_TOLERANCE:.0%})",
              file=sys.stderr)
    return result["exit_code"]
