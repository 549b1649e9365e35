"""`vllm-clasp layers` on a few prompts: the real CLI, one engine, the report files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

QUESTIONS = Path(__file__).resolve().parents[3] / "shared" / "data" / "spec_bench" / "question.jsonl"


@pytest.mark.skipif(not QUESTIONS.is_file(), reason=f"Spec-Bench data not found at {QUESTIONS}")
def test_layers_report_on_a_few_prompts(tmp_path, model_dir):
    out = tmp_path / "layers"
    cmd = [sys.executable, "-m", "vllm_clasp.tools.cli", "layers", "--questions", str(QUESTIONS),
           "--categories", "translation,math_reasoning", "--per-category", "2",
           "--max-tokens", "48", "--model", model_dir, "--out", str(out)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    result = json.loads((out / "layers.json").read_text())
    assert list(result["groups"]) == ["translation", "math_reasoning"]
    num_layers = result["num_layers"]
    for group in result["groups"].values():
        assert group["dp_runs"] >= 2  # each prompt's first draft runs the DP
        assert len(group["skip_frequency"]) == num_layers
        assert group["skip_frequency"][0] == group["skip_frequency"][-1] == 0  # never skipped
        chosen = [int(m) for m in group["chosen_m"]]
        assert all(3 <= m <= 18 for m in chosen), chosen  # "auto": round(0.1 L)..round(0.6 L)
        curve = group["mean_cosine_by_m"]
        assert curve[0] == pytest.approx(1.0)
        assert curve[3] is not None and curve[18] is not None
        assert group["acceptance_by_m"], "model drafts were verified"
    for name in ("layer_skip_heatmap.png", "cosine_vs_m.png", "acceptance_vs_m.png"):
        assert (out / name).stat().st_size > 0
    assert "M chosen most" in proc.stdout
