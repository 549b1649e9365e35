"""Results of `vllm-clasp bench`: Spec-Bench arithmetic, per-group summary, table, JSON, plots.

Pure functions over the records `vllm_clasp.tools.bench` collects (no vLLM, no engines).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
BASELINE = "plain"
#: A greedy method whose outputs differ from plain for more than this share of prompts fails.
MISMATCH_TOLERANCE = 0.05


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
        plan = totals.get("planning_time_s", 0.0)
        row["clasp"] = {
            **totals, "other_s": wall - dp - draft - plan,
            "dp_pct": 100 * dp / wall if wall else None,
            "draft_pct": 100 * draft / wall if wall else None,
            "planning_pct": 100 * plan / wall if wall else None,
            "other_pct": 100 * (wall - dp - draft - plan) / wall if wall else None,
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


def find_row(rows: list[dict], bs: int, group: str, method: str) -> dict | None:
    """The summary row of (batch size, group or "overall", method); None when absent."""
    return next((r for r in rows if r["batch_size"] == bs and r["group"] == group
                 and r["method"] == method), None)


# --------------------------------------------------------------------------- report


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_report(result: dict) -> str:
    """The printed report: settings, a table per batch size, memory, mismatches, errors."""
    cfg = result["config"]
    methods = [m["name"] for m in cfg["methods"]]
    lines = _header_lines(result)
    for name, why in result.get("skipped_methods", {}).items():
        lines.append(f"{name}: skipped: {why}")
    methods = [m for m in methods if m not in result.get("skipped_methods", {})]
    for bs in cfg["batch_sizes"]:
        lines += _batch_size_lines(result["summary"], cfg["categories"], methods, bs)
    if result.get("summary_repeat"):
        lines += ["", "REPEAT scenario: the same prompts sent again to the same engines (as "
                      "agentic loops do; memory across requests may help)"]
        for bs in cfg["batch_sizes"]:
            lines += _batch_size_lines(result["summary_repeat"], cfg["categories"], methods, bs)
    lines += _memory_lines(result, methods)
    lines += _mismatch_lines(result)
    for err in result.get("errors", []):
        lines.append(f"ERROR {err['method']} ({err['stage']}): {err['error']}")
    return "\n".join(lines)


def _header_lines(result: dict) -> list[str]:
    """The run's settings, model, machine and each method's speculative config."""
    cfg, machine = result["config"], result["machine"]
    lines = [
        f"Spec-Bench: {result['num_prompts']} prompts ({cfg['per_category']} per group, offset "
        f"{cfg['offset']}), max_tokens {cfg['max_tokens']}, temperature {cfg['temperature']}, "
        f"dtype {cfg['dtype']}, rounds {cfg['rounds']}, enforce_eager {cfg['enforce_eager']}",
        f"model: {cfg['model']}",
        f"machine: {machine.get('cpu_model')} ({machine.get('cpus')} CPUs, "
        f"engine worker torch threads {machine.get('worker_torch_threads', '?')}), "
        f"Intel OpenMP preloaded: {machine.get('iomp', {}).get('in_ld_preload')}, "
        f"load average {_fmt(machine.get('loadavg_start', [None])[0], '.1f')} at start",
    ]
    for m in cfg["methods"]:
        lines.append(f"  {m['name']:<14} {json.dumps(m['speculative_config'])}"
                     + (f"  resolved: {json.dumps(m['resolved'])}" if m.get("resolved") else ""))
    return lines


def _batch_size_lines(rows: list[dict], categories: Sequence[str], methods: Sequence[str],
                      bs: int) -> list[str]:
    """One batch size's table, whole-batch throughput, identity and CLaSp time split."""
    lines = ["", f"batch size {bs}: tokens/s per prompt (mean), speedup vs plain, "
                 f"tau = mean accepted tokens per step"]
    if not any(r["batch_size"] == bs for r in rows):
        return lines + ["(nothing measured)"]
    lines += _speed_table(rows, categories, methods, bs)
    lines += _versus_lines(rows, methods, bs)
    lines += _throughput_lines(rows, methods, bs)
    lines += _time_split_lines(rows, categories, methods, bs)
    return lines


def _speed_table(rows: list[dict], categories: Sequence[str], methods: Sequence[str],
                 bs: int) -> list[str]:
    """Per group: tokens/s of every method, and speedup and tau of each non-baseline one."""
    width = {m: max(8, len(m)) for m in methods}
    header = f"{'group':<15}{'n':>3}"
    for m in methods:
        header += f" | {m:>{width[m]}}" + ("" if m == BASELINE else f" {'x':>5} {'tau':>5}")
    lines = [header, "-" * len(header)]
    for group in [*categories, "overall"]:
        base = find_row(rows, bs, group, BASELINE)
        if bs > 1 and group != "overall" and base and not base["calls"]:
            continue  # no batch of this group alone: its rows would repeat mixed batches
        lines.append(_speed_table_line(rows, bs, group, methods, width))
    return lines


def _speed_table_line(rows: list[dict], bs: int, group: str, methods: Sequence[str],
                      width: dict[str, int]) -> str:
    line, n = "", None
    for m in methods:
        r = find_row(rows, bs, group, m)
        if r is None:
            line += f" | {'-':>{width[m]}}" + ("" if m == BASELINE else " " * 12)
            continue
        n = r["num_prompts"]
        line += f" | {_fmt(r['mean_tps'], '.2f'):>{width[m]}}"
        if m != BASELINE:
            line += f" {_fmt(r['speedup'], '4.2f') + 'x':>5} {_fmt(r['tau'], '5.2f'):>5}"
    return f"{group:<15}{_fmt(n, '3d')}{line}"


PEERS = ("suffix", "ngram")
"""vLLM's own methods a user without a draft model picks today: clasp is shown against each."""


def versus(rows: list[dict], bs: int, method: str, other: str,
           group: str = "overall") -> float | None:
    """mean tokens/s per prompt of `method` over that of `other` (same run, same prompts)."""
    a, b = find_row(rows, bs, group, method), find_row(rows, bs, group, other)
    if a is None or b is None or not a["mean_tps"] or not b["mean_tps"]:
        return None
    return a["mean_tps"] / b["mean_tps"]


def _versus_lines(rows: list[dict], methods: Sequence[str], bs: int) -> list[str]:
    """clasp against vLLM's own methods, directly (no arithmetic left to the reader)."""
    pairs = [(peer, versus(rows, bs, "clasp", peer)) for peer in PEERS
             if "clasp" in methods and peer in methods]
    pairs = [(peer, ratio) for peer, ratio in pairs if ratio is not None]
    if not pairs:
        return []
    return ["clasp vs " + ", vs ".join(f"{peer} {ratio:.2f}x" for peer, ratio in pairs)
            + " (tokens/s per prompt, overall)"]


def _throughput_lines(rows: list[dict], methods: Sequence[str], bs: int) -> list[str]:
    """Whole-batch tokens/s of every method (and vs plain); outputs identical to plain."""
    thr = [(m, find_row(rows, bs, "overall", m)) for m in methods]
    base = find_row(rows, bs, "overall", BASELINE)
    lines = ["whole-batch throughput (tokens/s): " + ", ".join(
        f"{m} {_fmt(r['batch_throughput_tps'], '.2f')}"
        + (f" ({r['batch_throughput_tps'] / base['batch_throughput_tps']:.2f}x)"
           if m != BASELINE and base and base["batch_throughput_tps"]
           and r["batch_throughput_tps"] else "")
        for m, r in thr if r)]
    ident = [f"{m} {r['identical']}/{r['compared']}" for m, r in thr
             if r and m != BASELINE and r["identical"] is not None]
    if ident:
        lines.append("outputs identical to plain: " + ", ".join(ident))
    return lines


def _time_split_lines(rows: list[dict], categories: Sequence[str], methods: Sequence[str],
                      bs: int) -> list[str]:
    """Per CLaSp method: DP / draft / verify+rest shares of wall time, per group."""
    lines = []
    for m in methods:
        split = [(g, find_row(rows, bs, g, m)) for g in [*categories, "overall"]]
        split = [(g, r["clasp"]) for g, r in split if r and r.get("clasp")]
        if split:
            lines.append(f"{m} time split (DP / draft / planning / verify+rest, % of wall): "
                         + "; ".join(
                             f"{g} {_fmt(s['dp_pct'], '.1f')}/{_fmt(s['draft_pct'], '.1f')}/"
                             f"{_fmt(s.get('planning_pct'), '.1f')}/"
                             f"{_fmt(s['other_pct'], '.1f')}" for g, s in split))
    return lines


def _mismatch_lines(result: dict) -> list[str]:
    """Per method whose greedy outputs differ from plain: which prompts, from which token."""
    lines = []
    for method, mm in result.get("mismatches", {}).items():
        if mm["differing"]:
            lines.append(f"{method}: {mm['differing']}/{mm['compared']} outputs differ from plain: "
                         + ", ".join(f"q{p['question_id']} (bs {p['batch_size']}, token "
                                     f"{p['first_difference']})" for p in mm["prompts"]))
    return lines


def _memory_lines(result: dict, methods: Sequence[str]) -> list[str]:
    peaks = {m: ((result.get("engines", {}).get(m) or {}).get("memory") or {}).get("peak_rss_mib")
             for m in methods}
    base = peaks.get(BASELINE)
    if not base:
        return []
    parts = [f"{m} {peak:.0f}" + ("" if m == BASELINE else f" ({100 * (peak / base - 1):+.1f}%)")
             for m, peak in peaks.items() if peak]
    return ["peak resident memory of the engine process, MiB (extra vs plain): "
            + ", ".join(parts)]


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
    """PNG plots into `out`; returns their paths. Speedup per group at the smallest batch
    size; with several batch sizes, speedup and throughput against batch size; with
    `--sweep-skip`, tau and speedup against the number of skipped layers."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported (by the helpers below)

    cfg, rows = result["config"], result["summary"]
    others = [m["name"] for m in cfg["methods"] if m["name"] != BASELINE]
    written = []
    if not others:
        return written
    bs = min(cfg["batch_sizes"])
    written.append(_plot_speedup_by_group(rows, cfg, others, bs, out))
    if len(cfg["batch_sizes"]) > 1:
        written.append(_plot_batch_sizes(rows, cfg["batch_sizes"], others, out))
    sweep = sorted(((m["speculative_config"] or {}).get("clasp_skip_layers"), m["name"])
                   for m in cfg["methods"] if m.get("sweep"))
    if sweep:
        written.append(_plot_skip_sweep(rows, sweep, bs, out))
    return written


def _plot_speedup_by_group(rows: list[dict], cfg: dict, others: Sequence[str], bs: int,
                           out: Path) -> Path:
    import matplotlib.pyplot as plt

    groups = [*cfg["categories"], "overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(others)) / 2), 4))
    width = 0.8 / len(others)
    for i, m in enumerate(others):
        values = [(find_row(rows, bs, g, m) or {}).get("speedup") or 0 for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=m)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([x + width * (len(others) - 1) / 2 for x in range(len(groups))], groups,
                  rotation=20)
    ax.set_ylabel("speedup vs plain")
    ax.set_title(f"Spec-Bench speedup per group (batch size {bs}, {cfg['dtype']})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    return _save(fig, out / "speedup_by_group.png")


def _plot_batch_sizes(rows: list[dict], batch_sizes: Sequence[int], others: Sequence[str],
                      out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, m in enumerate([BASELINE, *others]):
        pts = [(b, find_row(rows, b, "overall", m)) for b in batch_sizes]
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
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, out / "speedup_vs_batch_size.png")


def _plot_skip_sweep(rows: list[dict], sweep: Sequence[tuple[int, str]], bs: int,
                     out: Path) -> Path:
    import matplotlib.pyplot as plt

    xs = [s for s, _ in sweep]
    rs = [find_row(rows, bs, "overall", name) or {} for _, name in sweep]
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
    return _save(fig, out / "skip_sweep.png")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


