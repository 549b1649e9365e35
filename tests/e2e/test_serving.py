"""`vllm serve ... --speculative-config '{"method": "clasp"}'` through the real OpenAI client.

The server fixture (`clasp_server`) lives in conftest.py so test_examples.py can share it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import (
    VLLM_BIN, free_port, log_tail, scrape_metrics, stop_process, vllm_serve_cmd,
)
from .prompts import CHAT_PROMPTS

pytestmark = pytest.mark.engine

MAX_TOKENS = 64
COMPARE_PROMPTS = [CHAT_PROMPTS[0], CHAT_PROMPTS[2], CHAT_PROMPTS[8]]
SPEC_BENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "spec_bench" / "question.jsonl"
BENCH_SERVE_TIMEOUT_S = 300


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _chat(server, prompt: str, **kwargs) -> str:
    resp = server.client().chat.completions.create(
        model=server.model, messages=_messages(prompt), temperature=0, max_tokens=MAX_TOKENS,
        **kwargs,
    )
    return resp.choices[0].message.content


_metrics = scrape_metrics


def test_chat_and_streaming(clasp_server):
    text = _chat(clasp_server, CHAT_PROMPTS[0])
    assert text and text.strip(), clasp_server.log_tail()

    stream = clasp_server.client().chat.completions.create(
        model=clasp_server.model, messages=_messages(CHAT_PROMPTS[0]), temperature=0,
        max_tokens=MAX_TOKENS, stream=True,
    )
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == text


def test_greedy_matches_offline(clasp_server, engines):
    from vllm import SamplingParams

    from .conftest import chat

    llm = engines.get(dtype="float32", speculative_config={"method": "clasp"})
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    offline = llm.generate([chat(tokenizer, p) for p in COMPARE_PROMPTS], params, use_tqdm=False)
    for prompt, out in zip(COMPARE_PROMPTS, offline):
        served = _chat(clasp_server, prompt)
        assert served == out.outputs[0].text, f"prompt {prompt!r}"


def test_spec_decode_metrics(clasp_server):
    _chat(clasp_server, CHAT_PROMPTS[1])
    metrics = _metrics(clasp_server)
    drafts = metrics.get("vllm:spec_decode_num_drafts_total", 0.0)
    assert drafts > 0, {k: v for k, v in metrics.items() if "spec_decode" in k}
    assert metrics.get("vllm:spec_decode_num_draft_tokens_total", 0.0) > 0


def test_clasp_metrics_and_log_line(clasp_server):
    """CLaSp's own metrics reach /metrics from the worker, and the front end logs a summary."""
    import time

    before = _metrics(clasp_server)
    _chat(clasp_server, CHAT_PROMPTS[2])
    after = _metrics(clasp_server)
    grew = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after
            if name.startswith("vllm:clasp_")}
    # The adaptive draft budget may keep this request from model drafts (it learnt from the
    # earlier ones that they do not pay here), so DP counters are checked as totals: the
    # server's first requests always try model drafts, and each then needs a DP run.
    assert after.get("vllm:clasp_dp_runs_total", 0) >= 1, after
    assert after.get("vllm:clasp_layer_skipped_total", 0) >= 1, after
    assert after.get("vllm:clasp_skipped_layers_count", 0) >= 1, after
    assert "vllm:clasp_tracked_requests" in after
    # Every step of this request drafted by the model, by copying, or was counted off.
    decided = sum(grew.get(f"vllm:clasp_{name}_rounds_total", 0)
                  for name in ("model_draft", "copy_draft", "speculation_off"))
    assert decided >= 1, grew
    deadline = time.monotonic() + 25  # vLLM logs stats every 10 s
    while "DP runs" not in clasp_server.log_tail(200_000) and time.monotonic() < deadline:
        time.sleep(1)  # not "CLaSp: ": the start-up line has it too
    assert "CLaSp: " in clasp_server.log_tail(200_000) and "DP runs" in clasp_server.log_tail(
        200_000), clasp_server.log_tail()


@pytest.mark.skipif(not SPEC_BENCH.is_file(), reason=f"Spec-Bench data not found at {SPEC_BENCH}")
def test_vllm_bench_serve_spec_bench(clasp_server, tmp_path):
    """vLLM's own `vllm bench serve --dataset-name spec_bench` against the CLaSp server.

    It reads the server's /metrics before and after the run, so its "Speculative Decoding"
    block is CLaSp's acceptance on exactly these requests. Needs pandas (vLLM's SpecBench
    loader), which the `bench` extra installs.
    """
    cmd = [VLLM_BIN, "bench", "serve", "--base-url", clasp_server.url,
           "--model", clasp_server.model, "--dataset-name", "spec_bench",
           "--dataset-path", str(SPEC_BENCH), "--num-prompts", "12",
           "--spec-bench-output-len", "64", "--temperature", "0", "--disable-tqdm",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_SERVE_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    print(proc.stdout)  # vLLM's result table (shown with -s or on failure)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-6000:]}"
    assert re.search(r"Successful requests:\s+12\b", output), output[-4000:]
    assert "Speculative Decoding" in output, output[-4000:]
    length = float(re.search(r"Acceptance length:\s+([0-9.]+)", output).group(1))
    drafts = int(re.search(r"Drafts:\s+(\d+)", output).group(1))
    assert drafts > 0
    # Greedy Spec-Bench prompts: the layer-skipped draft gets some tokens accepted.
    assert length > 1.0, output[-4000:]

    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 12
    assert result["spec_decode_num_drafts"] == drafts
    assert result["spec_decode_draft_tokens"] >= drafts
    assert 0 < result["spec_decode_accepted_tokens"] <= result["spec_decode_draft_tokens"]
    assert abs(result["spec_decode_acceptance_length"] - length) < 0.01


def test_bad_requests_get_4xx_and_server_keeps_serving(clasp_server):
    import openai

    client = clasp_server.client()
    with pytest.raises(openai.APIStatusError) as bad_tokens:
        client.chat.completions.create(
            model=clasp_server.model, messages=_messages("Hi"), max_tokens=-1)
    assert 400 <= bad_tokens.value.status_code < 500

    with pytest.raises(openai.APIStatusError) as bad_model:
        client.chat.completions.create(
            model="no-such-model", messages=_messages("Hi"), max_tokens=8)
    assert 400 <= bad_model.value.status_code < 500

    with urllib.request.urlopen(f"{clasp_server.url}/health", timeout=10) as r:
        assert r.status == 200
    assert _chat(clasp_server, CHAT_PROMPTS[13]).strip()


def test_bad_clasp_config_fails_fast(model_dir):
    """A bad clasp option must make `vllm serve` exit non-zero, naming the option: no hang."""
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "server.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                vllm_serve_cmd(model_dir, port, {"method": "clasp", "clasp_loi": 0}),
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        start = time.monotonic()
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vllm serve with a bad clasp config still running after 120 s:\n"
                        f"{log_tail(log_path)}")
        finally:
            stop_process(proc)
        elapsed = time.monotonic() - start
        output = log_tail(log_path, 20000)
    assert rc != 0, output
    # Not just the echo of the arguments ("non-default args: {... 'clasp_loi': 0}"): an error.
    errors = [line for line in output.splitlines()
              if "clasp_loi" in line and "non-default args" not in line]
    assert any("error" in line.lower() or "must" in line for line in errors), output
    assert elapsed < 120, elapsed


def test_sampling_parameters_through_the_openai_client(clasp_server):
    """top_k / top_p (which `vllm serve` also takes from a model's generation_config.json)
    and a seed, through the OpenAI client: served, reproducible by seed; min_p is refused for
    the request alone (HTTP 400) and the server keeps serving."""
    import openai

    client = clasp_server.client()

    def sampled(**kwargs):
        resp = client.chat.completions.create(
            model=clasp_server.model, messages=_messages(CHAT_PROMPTS[1]), temperature=0.8,
            top_p=0.9, max_tokens=32, seed=42, extra_body={"top_k": 20, **kwargs})
        return resp.choices[0].message.content

    first = sampled()
    assert first and sampled() == first
    with pytest.raises(openai.BadRequestError, match="min_p"):
        sampled(min_p=0.1)
    assert _chat(clasp_server, CHAT_PROMPTS[0]).strip()
