"""`vllm-clasp demo`: offline generation with CLaSp on the default model, compared with plain.

A small `vllm-clasp bench` run (plain, clasp and vLLM's own suffix and ngram methods; batch
size 1, greedy, fresh engines warmed up on prompts that are not measured): one
prompt per Spec-Bench group when the questions file is there, else six built-in chat prompts.
The screen shows one progress bar per phase, a couple of CLaSp's answers and a short table
(tokens/s, speedup over plain, mean acceptance length, outputs identical to plain's); vLLM's
own logs go to a file whose path is printed (`--verbose` keeps them on the terminal).
"""

from __future__ import annotations

import argparse
import os
import sys

from vllm_clasp.tools.bench import EXIT_ERROR, EXIT_USAGE, BenchOptions
from vllm_clasp.tools.bench_cli import run_for_cli
from vllm_clasp.tools.methods import parse_methods
from vllm_clasp.tools.questions import DEFAULT_QUESTIONS, Question
from vllm_clasp.tools.report import find_row, versus

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
    parser.add_argument("--others", default="suffix,ngram", metavar="METHODS",
                        help="other speculative methods to compare, as `vllm-clasp bench "
                             "--methods` names them (default suffix,ngram; '' for none)")
    parser.add_argument("--verbose", action="store_true",
                        help="show vLLM's own logs on the terminal (default: a log file)")


def _options(args: argparse.Namespace) -> BenchOptions:
    path = args.questions or DEFAULT_QUESTIONS
    if args.questions and not os.path.isfile(path):
        raise FileNotFoundError(f"questions file {path!r} not found")
    common = dict(per_category=1, batch_sizes=(1,), max_tokens=args.max_tokens,
                  dtype=args.dtype, model=args.model,
                  methods=",".join(["plain", f"clasp={args.clasp_config}",
                                    *filter(None, args.others.split(","))]),
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
    result = run_for_cli("demo", options, args.verbose)
    if result is None:
        return EXIT_ERROR
    print(summary(result, args.show))
    return result["exit_code"]


def summary(result: dict, show: int = 2) -> str:
    """A couple of CLaSp's answers, then one row per method: tokens/s, speedup over plain,
    mean acceptance length and greedy outputs identical to plain's."""
    texts = {q["question_id"]: q for q in result["questions"]}
    lines = []
    for r in [r for r in result["records"] if r["method"] == "clasp"][:show]:
        q = texts[r["question_id"]]
        question = " ".join(q.get("text", "").split())
        question = question if len(question) <= 160 else question[:157] + "..."
        lines += [f"### [{q['group']}] {question}", r["text"].strip(), ""]
    for err in result["errors"]:
        lines.append(f"ERROR {err['method']} ({err['stage']}): {err['error']}")
    for name, why in result.get("skipped_methods", {}).items():
        lines.append(f"{name}: skipped: {why}")
    rows = [(name, find_row(result["summary"], 1, "overall", name))
            for name in dict.fromkeys(r["method"] for r in result["records"])]
    rows = [(name, row) for name, row in rows if row is not None]
    if not any(name == "clasp" for name, _ in rows):
        lines.append("CLaSp: no results")
        return "\n".join(lines)
    prompts = rows[0][1]["num_prompts"]
    lines.append(f"{'method':<8} {'tokens/s':>9} {'vs plain':>9} {'clasp vs':>9} {'tau':>6} "
                 f"{'identical':>10}   ({prompts} prompts, batch 1, greedy)")
    for name, row in rows:
        tau = "-" if row["tau"] is None else f"{row['tau']:.2f}"
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        ratio = None if name == "clasp" else versus(result["summary"], 1, "clasp", name)
        against = "-" if ratio is None else f"{ratio:.2f}x"
        identical = ("-" if row["identical"] is None
                     else f"{row['identical']}/{row['compared']}")
        lines.append(f"{name:<8} {row['mean_tps']:>9.1f} {speedup:>9} {against:>9} {tau:>6} "
                     f"{identical:>10}")
    return "\n".join(lines)
