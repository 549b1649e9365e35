"""CI-sized `vllm-clasp bench`: one Spec-Bench question per group, batch sizes 1 and 8.

Runs the real CLI in a subprocess (per batch size three fresh engines held at once: plain,
clasp, vLLM's suffix method) with the repeat scenario, and
checks that it finishes, writes results.json covering every group, batch size and scenario,
and that greedy outputs equal plain decoding's. It fails on output mismatch, never on speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

QUESTIONS = Path(__file__).resolve().parents[3] / "shared" / "data" / "spec_bench" / "question.jsonl"
GROUPS = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
# `clasp` with its defaults (its layer-skip drafts, forced on, are exercised by the engine
# tests; a fourth engine here would cost CI ~2 minutes).
METHOD_SPECS = METHODS = ["plain", "clasp", "suffix"]
TIMEOUT_S = 900


@pytest.mark.skipif(not QUESTIONS.is_file(), reason=f"Spec-Bench data not found at {QUESTIONS}")
def test_bench_small(tmp_path, model_dir):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "vllm_clasp.tools.cli", "bench", "--questions", str(QUESTIONS),
           "--per-category", "1", "--batch-sizes", "1,8", "--max-tokens", "32",
           "--methods", ",".join(METHOD_SPECS), "--warmup", "1", "--out", str(out), "--repeat",
           "--model", model_dir, "--no-progress", "--enforce-eager"]  # compiling: +10 min
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               VLLM_CLASP_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    print(proc.stdout)  # the table (shown with -s or on failure)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")

    result = json.loads((out / "results.json").read_text())
    assert result["errors"] == []
    assert result["config"]["categories"] == GROUPS
    assert [m["name"] for m in result["config"]["methods"]] == METHODS
    assert result["skipped_methods"] == {}
    rows = {(r["batch_size"], r["group"], r["method"]): r for r in result["summary"]}
    repeat = {(r["batch_size"], r["group"], r["method"]): r for r in result["summary_repeat"]}
    for bs in (1, 8):
        for group in [*GROUPS, "overall"]:
            for method in METHODS:
                assert (bs, group, method) in rows, (bs, group, method)
                assert (bs, group, method) in repeat, (bs, group, method)
    for method in METHODS[1:]:  # the repeat scenario is compared to plain too
        assert result["mismatches"][method]["compared"] == 2 * 2 * 6
    for method in ("clasp", "suffix"):
        for bs in (1, 8):
            row = rows[(bs, "overall", method)]
            assert row["identical"] == row["compared"] == 6, result["mismatches"][method]
            if method == "clasp":  # drafted, or measured drafting slower and said so
                assert row["drafts"] > 0 or row["clasp"]["num_speculation_off_steps"] > 0, row
            else:
                assert row["drafts"] > 0, f"{method} at batch size {bs} never drafted"
    clasp = rows[(1, "overall", "clasp")]["clasp"]
    assert clasp["planning_time_s"] > 0 and clasp["search_time_s"] >= 0
    assert "clasp vs suffix" in proc.stdout
    assert (out / "speedup_by_group.png").is_file()
    assert (out / "speedup_vs_batch_size.png").is_file()
    assert "outputs identical to plain" in proc.stdout
    assert "REPEAT scenario" in proc.stdout
    # vLLM's own logs went to the file named first, not to the terminal.
    assert "vLLM's own logs go to" in proc.stderr
    terminal = proc.stdout + proc.stderr
    assert " INFO " not in terminal and " WARNING " not in terminal, terminal[-3000:]
    (log,) = (tmp_path / "logs").glob("bench-*.log")
    assert " INFO " in log.read_text(errors="replace")
