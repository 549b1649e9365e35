"""`vllm-clasp layers`: which decoder layers CLaSp's DP skips, per task group, and how M is
chosen: the layer-importance analysis and skip statistics of a model.

Runs one CLaSp engine (layer-skip drafts on every step, so every request runs the DP every
LOI steps, exactly as the engine drafts) over Spec-Bench prompts group by group, reads the
worker's log of DP runs after each group, and writes `layers.json` plus PNG plots:

* `layer_skip_heatmap.png`: per group (rows) and decoder layer (columns), the share of DP
  runs that skipped the layer;
* `cosine_vs_m.png`: per group, the mean DP fit (cosine of the skipped stack's final state
  against the full model's) for each M, with the M chosen most often marked;
* `acceptance_vs_m.png`: per group, measured acceptance of model-draft tokens at each M
  where drafts were verified.

`--from-metrics URL` renders the same heatmap from a live server's `/metrics`
(`vllm:clasp_layer_skipped_total{layer}` over `vllm:clasp_dp_runs_total`) without an engine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vllm_clasp.tools.questions import DEFAULT_QUESTIONS

DEFAULT_CONFIG = {"method": "clasp", "clasp_copy_source": "none", "clasp_adaptive": False}
"""Layer-skip drafts on every step: every request runs the DP, as the engine drafts."""


# --------------------------------------------------------------------------- arithmetic


def summarize_group(runs: list[dict], num_layers: int,
                    acceptance: dict[int, list[int]]) -> dict:
    """One group's figures from its DP runs ({"m", "layers", "cosines"} each) and its
    measured acceptance per M ({M: [judged, accepted]})."""
    skips = [0] * num_layers
    for run in runs:
        for layer in run["layers"]:
            skips[layer] += 1
    width = max((len(r["cosines"]) for r in runs), default=0)
    mean_cos = []
    for m in range(width):
        values = [r["cosines"][m] for r in runs
                  if m < len(r["cosines"]) and r["cosines"][m] is not None
                  and not math.isnan(r["cosines"][m])]
        mean_cos.append(sum(values) / len(values) if values else None)
    chosen: dict[int, int] = {}
    for run in runs:
        chosen[run["m"]] = chosen.get(run["m"], 0) + 1
    return {
        "dp_runs": len(runs),
        "skip_frequency": [s / len(runs) if runs else 0.0 for s in skips],
        "mean_cosine_by_m": mean_cos,
        "chosen_m": {str(m): n for m, n in sorted(chosen.items())},
        "most_chosen_m": max(chosen, key=lambda m: (chosen[m], -m)) if chosen else None,
        "acceptance_by_m": {str(m): (a / j if j else None)
                            for m, (j, a) in sorted(acceptance.items())},
        "judged_tokens_by_m": {str(m): j for m, (j, _) in sorted(acceptance.items())},
    }


def acceptance_delta(before: dict, after: dict) -> dict[int, list[int]]:
    """Measured acceptance per M gained between two cumulative reads."""
    out = {}
    for m, (judged, accepted) in after.items():
        j0, a0 = before.get(m, (0, 0))
        if judged - j0:
            out[int(m)] = [judged - j0, accepted - a0]
    return out


def from_metrics_text(text: str) -> dict:
    """The heatmap's data from Prometheus text: per (model_name, engine), DP runs and the
    share of them that skipped each layer."""
    from prometheus_client.parser import text_string_to_metric_families

    runs: dict[tuple, float] = {}
    layers: dict[tuple, dict[int, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.labels.get("model_name", ""), sample.labels.get("engine", ""))
            if sample.name == "vllm:clasp_dp_runs_total":
                runs[key] = sample.value
            elif sample.name == "vllm:clasp_layer_skipped_total":
                layers.setdefault(key, {})[int(sample.labels["layer"])] = sample.value
    if not runs:
        raise ValueError("no vllm:clasp_dp_runs_total in the metrics: is this a CLaSp server "
                         "(--speculative-config '{\"method\": \"clasp\"}') that has drafted?")
    groups = {}
    for key, total in runs.items():
        counts = layers.get(key, {})
        num_layers = max(counts, default=-1) + 1
        name = f"{key[0]} (engine {key[1]})" if key[1] else key[0]
        groups[name] = {"dp_runs": int(total), "skip_frequency": [
            counts.get(i, 0.0) / total if total else 0.0 for i in range(num_layers)]}
    return {"source": "metrics", "groups": groups}


# --------------------------------------------------------------------------- the engine run


def collect(args: argparse.Namespace, console) -> dict:
    """Run the engine over each group's prompts; returns layers.json's content."""
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from vllm_clasp.tools.bench import BenchOptions
    from vllm_clasp.tools.engine import clasp_state, shutdown
    from vllm_clasp.tools.model_prep import prepare_model
    from vllm_clasp.tools.questions import chat_prompts, resolve_questions

    import os

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # the DP log over RPC
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    questions = resolve_questions(BenchOptions(
        questions=args.questions, categories=categories, per_category=args.per_category,
        offset=args.offset))
    config = json.loads(args.clasp_config)
    model = str(prepare_model(args.model))
    llm = LLM(model=model, dtype=args.dtype, enforce_eager=True, max_model_len=2048,
              speculative_config=config, seed=0)
    try:
        hf = llm.llm_engine.vllm_config.model_config.hf_config.get_text_config()
        num_layers = hf.num_hidden_layers
        questions, prompts, _ = chat_prompts(llm.get_tokenizer(), questions, 2048)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        groups, read = {}, clasp_state(llm, take_dp_log=True) or {"acceptance_by_m": {}}
        names = list(dict.fromkeys(q.group for q in questions))
        for group in tqdm(names, desc="groups", file=console or sys.stderr):
            mine = [p for q, p in zip(questions, prompts) if q.group == group]
            llm.generate(mine, params, use_tqdm=False)
            before, read = read, clasp_state(llm, take_dp_log=True)
            groups[group] = summarize_group(
                read["dp_log"], num_layers,
                acceptance_delta(before["acceptance_by_m"], read["acceptance_by_m"]))
            groups[group]["prompts"] = len(mine)
    finally:
        shutdown(llm)
    return {"source": "engine", "model": model, "num_layers": num_layers,
            "speculative_config": config, "max_tokens": args.max_tokens, "groups": groups}


# --------------------------------------------------------------------------- output


def write_report(result: dict, out: Path) -> list[Path]:
    """layers.json and the PNG plots (the cosine and acceptance plots need an engine run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    path = out / "layers.json"
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    written = [path]
    groups = result["groups"]
    names = list(groups)
    width = max(len(g["skip_frequency"]) for g in groups.values())
    grid = [g["skip_frequency"] + [0.0] * (width - len(g["skip_frequency"]))
            for g in groups.values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * width + 2), 0.45 * len(names) + 1.6))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(xlabel="decoder layer", yticks=range(len(names)), yticklabels=names,
           title="share of DP runs that skip each layer")
    fig.colorbar(image, ax=ax)
    written.append(_save(fig, out / "layer_skip_heatmap.png"))
    if result.get("source") == "engine":
        written.append(_plot_by_m(groups, "mean_cosine_by_m", "mean DP fit (final cosine)",
                                  out / "cosine_vs_m.png"))
        written.append(_plot_by_m(groups, "acceptance_by_m", "measured acceptance per token",
                                  out / "acceptance_vs_m.png"))
    return written


def _plot_by_m(groups: dict, key: str, ylabel: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, g) in enumerate(groups.items()):
        values = g[key]
        points = (list(enumerate(values)) if isinstance(values, list)
                  else [(int(m), v) for m, v in values.items()])
        points = [(m, v) for m, v in points if v is not None and m > 0]
        if not points:
            continue
        ax.plot([m for m, _ in points], [v for _, v in points], "o-", ms=3, color=f"C{i}",
                label=name)
        chosen = g.get("most_chosen_m")
        mark = dict(points).get(chosen)
        if mark is not None:
            ax.plot([chosen], [mark], "*", ms=14, color=f"C{i}")
    ax.set(xlabel="skipped layers M", ylabel=ylabel, title=f"{ylabel} vs M (star: M chosen most)")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_default(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def format_summary(result: dict) -> str:
    lines = []
    for name, g in result["groups"].items():
        top = sorted(range(len(g["skip_frequency"])), key=lambda i: -g["skip_frequency"][i])[:5]
        line = f"{name:<16} {g['dp_runs']:>5} DP runs; most skipped layers {top}"
        if "most_chosen_m" in g:
            line += f"; M chosen most {g['most_chosen_m']} ({g['chosen_m']})"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", default=DEFAULT_QUESTIONS, metavar="PATH",
                        help=f"Spec-Bench question.jsonl (default: {DEFAULT_QUESTIONS})")
    parser.add_argument("--categories",
                        default="mt_bench,translation,summarization,qa,math_reasoning,rag")
    parser.add_argument("--per-category", type=int, default=5, metavar="N")
    parser.add_argument("--offset", type=int, default=0, metavar="N")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None,
                        help="model name or HF directory (default: the prepared default model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clasp-config", default=json.dumps(DEFAULT_CONFIG), metavar="JSON",
                        help="the CLaSp speculative config to analyse (default: layer-skip "
                             "drafts on every step, M chosen automatically)")
    parser.add_argument("--out", default="layers-report", metavar="DIR")
    parser.add_argument("--from-metrics", default=None, metavar="URL",
                        help="render the heatmap from a live server's /metrics instead")
    parser.add_argument("--verbose", action="store_true",
                        help="show vLLM's own logs on the terminal (default: a log file)")


def run_cli(args: argparse.Namespace) -> int:
    try:
        if args.from_metrics:
            import urllib.request

            with urllib.request.urlopen(args.from_metrics, timeout=30) as response:
                result = from_metrics_text(response.read().decode())
        else:
            from vllm_clasp.tools.console import quiet
            from vllm_clasp.tools.cpu_env import maybe_reexec_with_iomp

            maybe_reexec_with_iomp(True)
            with quiet("layers", args.verbose) as console:
                result = collect(args, console)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"vllm-clasp layers: error: {e}", file=sys.stderr)
        return 1
    paths = write_report(result, Path(args.out))
    print(format_summary(result))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0
