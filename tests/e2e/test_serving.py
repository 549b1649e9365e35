"""`vllm serve ... --speculative-config '{"method": "clasp"}'` through the real OpenAI client.

The server fixture (`clasp_server`) lives in conftest.py so test_examples.py can share it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.request

import pytest

from .conftest import free_port, log_tail, stop_process, vllm_serve_cmd
from .prompts import CHAT_PROMPTS

pytestmark = pytest.mark.engine

MAX_TOKENS = 64
COMPARE_PROMPTS = [CHAT_PROMPTS[0], CHAT_PROMPTS[2], CHAT_PROMPTS[8]]


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _chat(server, prompt: str, **kwargs) -> str:
    resp = server.client().chat.completions.create(
        model=server.model, messages=_messages(prompt), temperature=0, max_tokens=MAX_TOKENS,
        **kwargs,
    )
    return resp.choices[0].message.content


def _metrics(server) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


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
