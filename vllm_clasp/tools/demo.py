"""`vllm-clasp demo`: offline generation with CLaSp on the default model, compared with plain.

A small `vllm-clasp bench` run (methods plain and clasp, batch size 1, greedy): one prompt per
Spec-Bench group when the questions file is there, else six built-in chat prompts. Prints a
couple of CLaSp's answers, then the mean acceptance length and CLaSp's speedup over plain on
the same prompts, and how many outputs are identical to plain's.
"""

from __future__ import annotations

import argparse
import os
import sys

from vllm_clasp.tools.bench import EXIT_ERROR, EXIT_USAGE, BenchOptions, run_bench
from vllm_clasp.tools.cpu_env import maybe_reexec_with_iomp
from vllm_clasp.tools.methods import parse_methods
from vllm_clasp.tools.questions import DEFAULT_QUESTIONS, Question
from vllm_clasp.tools.report import BASELINE, find_row

BUILTIN_PROMPTS = [
    ("writing", "Write a short, friendly email inviting a colleague to lunch on Friday."),
    ("translation", "Translate German to English: Das Wetter ist heute schön, und wir gehen "
                    "in den Park."),
    ("summarization", "Summarize in two sentences: The Amazon rainforest covers much of the "
                      "Amazon basin of South America. The basin spans seven million square "
                      "kilometres, five and a half million of which are rainforest. Most of the "
                      "forest lies in Brazil, followed by Peru and Colombia."),
    ("qa", "Who wrote the play Romeo and Juliet?"),
    ("math_reasoning", "A train travels 60 miles per hour for 3 hours. How far does it go? "
                       "Show your steps."),
    ("coding", "Write a Python function that returns the factorial of n."),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", metavar="PATH",
                        help=f"Spec-Bench question.jsonl (default: {DEFAULT_QUESTIONS} "
                             "relative to the current directory; built-in prompts if absent)")
    parser.add_argument("--model", default=None,
                        help="model name or HF directory (default: the prepared default model)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens (default 128)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    parser.add_argument("--clasp-config", default='{"method": "clasp"}', metavar="JSON",
                        help="CLaSp speculative config (default {\"method\": \"clasp\"})")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="eager mode (default: engines start in ~1 min; --no-enforce-eager "
                             "compiles, as `vllm-clasp bench` does by default)")
    parser.add_argument("--show", type=int, default=2, metavar="N",
                        help="answers to print (default 2)")
    parser.add_argument("--no-iomp", action="store_true",
                        help="do not preload Intel OpenMP (libiomp5) on CPU")


def _options(args: argparse.Namespace) -> BenchOptions:
    path = args.questions or DEFAULT_QUESTIONS
    if args.questions and not os.path.isfile(path):
        raise FileNotFoundError(f"questions file {path!r} not found")
    common = dict(per_category=1, batch_sizes=(1,), max_tokens=args.max_tokens,
                  dtype=args.dtype, methods=f"plain,clasp={args.clasp_config}", model=args.model,
                  warmup=1, out=None, iomp=not args.no_iomp, print_table=False,
                  enforce_eager=args.enforce_eager)
    if os.path.isfile(path):
        return BenchOptions(questions=path, **common)
    questions = [Question(f"builtin-{i}", group, group, text)
                 for i, (group, text) in enumerate(BUILTIN_PROMPTS)]
    return BenchOptions(question_list=questions,
                        categories=tuple(g for g, _ in BUILTIN_PROMPTS), **common)


def run_cli(args: argparse.Namespace) -> int:
    try:
        options = _options(args)
        parse_methods(options.methods)
    except (ValueError, FileNotFoundError) as e:
        print(f"vllm-clasp demo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    maybe_reexec_with_iomp(options.iomp)
    try:
        result = run_bench(options)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"vllm-clasp demo: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(summary(result, args.show))
    return result["exit_code"]


def summary(result: dict, show: int = 2) -> str:
    texts = {q["question_id"]: q for q in result["questions"]}
    lines = []
    clasp = [r for r in result["records"] if r["method"] == "clasp"]
    for r in clasp[:show]:
        q = texts[r["question_id"]]
        question = " ".join(q.get("text", "").split())
        question = question if len(question) <= 160 else question[:157] + "..."
        lines += [f"### [{q['group']}] {question}", r["text"].strip(), ""]
    row = find_row(result["summary"], 1, "overall", "clasp")
    for err in result["errors"]:
        lines.append(f"ERROR {err['method']} ({err['stage']}): {err['error']}")
    if row is None:
        lines.append("CLaSp: no results")
        return "\n".join(lines)
    tau = "n/a" if row["tau"] is None else f"{row['tau']:.2f}"
    spd = "n/a" if row["speedup"] is None else f"{row['speedup']:.2f}x"
    ident = "n/a" if row["identical"] is None else f"{row['identical']}/{row['compared']}"
    base = find_row(result["summary"], 1, "overall", BASELINE)
    lines.append(
        f"CLaSp: mean acceptance length {tau}, speedup {spd} vs plain on {row['num_prompts']} "
        f"prompts ({row['mean_tps']:.1f} vs {base['mean_tps']:.1f} tokens/s), outputs "
        f"identical: {ident}")
    return "\n".join(lines)
