"""The benchmark's prompts: Spec-Bench questions, their groups, and which of them a run uses.

Owns the question record, reading a Spec-Bench `question.jsonl`, the selection rule (per
group, after an offset, MT-bench round-robin over its categories), and turning questions into
chat prompts with a model's tokenizer. No vLLM, no engines.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

logger = logging.getLogger("vllm_clasp.tools.bench")

MT_BENCH_CATEGORIES = (
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
)
#: Warm-up prompts: never measured, and not Spec-Bench questions, so a method with memory
#: across requests (suffix trees over past responses) learns nothing about the measured ones.
WARMUP_PROMPTS = (
    "Write a short poem about the sea at night.",
    "Explain in a few sentences how a bicycle stays upright.",
    "List three tips for keeping houseplants healthy.",
    "What are the main differences between a lake and a pond?",
)
#: Default questions file, relative to the current working directory.
DEFAULT_QUESTIONS = os.path.join("..", "shared", "data", "spec_bench", "question.jsonl")


@dataclass(frozen=True)
class Question:
    question_id: int | str
    group: str
    category: str
    text: str


def load_questions(path: str | os.PathLike[str]) -> list[Question]:
    """All questions of a Spec-Bench file, with their group (MT-bench categories -> mt_bench)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                category, text = q["category"], q["turns"][0]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a Spec-Bench question ({e})") from None
            group = "mt_bench" if category in MT_BENCH_CATEGORIES else category
            out.append(Question(q.get("question_id", lineno), group, category, text))
    return out


def select_questions(questions: Iterable[Question], groups: Sequence[str], per_category: int,
                     offset: int = 0) -> list[Question]:
    """`per_category` questions per group after skipping `offset`, grouped in `groups` order.

    Within mt_bench the order is round-robin over its categories (writing, roleplay, ...), so
    the first 8 questions cover all 8 categories; other groups keep the file order.
    """
    by_group: dict[str, list[Question]] = {g: [] for g in groups}
    for q in questions:
        if q.group in by_group:
            by_group[q.group].append(q)
    selected = []
    for group in groups:
        items = by_group[group]
        if group == "mt_bench":
            items = _round_robin(items)
        chosen = items[offset:offset + per_category]
        if len(chosen) < per_category:
            logger.warning("group %s: only %d questions after offset %d (asked %d)",
                           group, len(chosen), offset, per_category)
        selected.extend(chosen)
    return selected


def _round_robin(items: list[Question]) -> list[Question]:
    lanes: dict[str, list[Question]] = {}
    for q in items:
        lanes.setdefault(q.category, []).append(q)
    out = []
    for i in range(max((len(v) for v in lanes.values()), default=0)):
        out.extend(lane[i] for lane in lanes.values() if i < len(lane))
    return out


class Selection(Protocol):
    """Which questions a run uses (`bench.BenchOptions` is one)."""

    questions: str | None  # a question.jsonl (None: DEFAULT_QUESTIONS)
    question_list: list[Question] | None  # questions to use instead of a file
    categories: Sequence[str]
    per_category: int
    offset: int


def resolve_questions(options: Selection) -> list[Question]:
    """The questions a run uses: `options.question_list` or the questions file, selected."""
    if options.question_list is not None:
        return select_questions(options.question_list, options.categories, options.per_category,
                                options.offset)
    path = options.questions or DEFAULT_QUESTIONS
    if not os.path.isfile(path):
        where = "" if options.questions else f" (default, relative to {os.getcwd()})"
        raise FileNotFoundError(
            f"Spec-Bench questions file {path!r}{where} not found; pass --questions PATH "
            "to a Spec-Bench question.jsonl")
    return select_questions(load_questions(path), options.categories, options.per_category,
                            options.offset)


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as the user's turn in the chat template; a base model without one: the text
    itself, as a completion prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
    return text


def chat_prompts(tokenizer, questions: list[Question], max_model_len: int
                 ) -> tuple[list[Question], list[str], list[int]]:
    """Each question's first turn as a prompt (`chat_prompt`), and its length in tokens;
    questions whose prompt does not fit `max_model_len` are dropped (with a warning)."""
    prompts = [chat_prompt(tokenizer, q.text) for q in questions]
    special = not getattr(tokenizer, "chat_template", None)  # a template holds them already
    if special:
        logger.info("the model has no chat template: questions are completion prompts")
    prompt_tokens = [len(tokenizer(p, add_special_tokens=special)["input_ids"])
                     for p in prompts]
    keep = [i for i, n in enumerate(prompt_tokens) if n < max_model_len]
    if len(keep) < len(questions):
        logger.warning("skipping %d prompts longer than --max-model-len",
                       len(questions) - len(keep))
        questions = [questions[i] for i in keep]
        prompts = [prompts[i] for i in keep]
        prompt_tokens = [prompt_tokens[i] for i in keep]
    return questions, prompts, prompt_tokens
