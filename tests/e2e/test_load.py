"""CLaSp under load and faults, against a real `vllm serve` (float32, the default model).

- 64 concurrent streaming clients: no errors, greedy outputs equal plain decoding (>= 95 %;
  a difference must be a near-tie flip, as in test_exactness.py: batch composition changes the
  float reduction order).
- A KV cache too small for the load: the scheduler preempts and recomputes (proved by
  `vllm:num_preemptions_total`); a resumed request gets a fresh skip set and the outputs still
  equal plain decoding.
- Clients that disconnect or cancel mid-stream: the server keeps serving and frees the
  per-request CLaSp state (`vllm:clasp_tracked_requests` back to 0 when idle, bounded RSS).
- Requests CLaSp cannot help (parameters spec decoding refuses or ignores, prompts at the
  context limit, max_tokens 1): CLaSp answers exactly as vLLM's own `ngram` method does.

Plain references come from the shared offline plain engine (`engines`): same chat template,
same max_tokens; tests/e2e/test_serving.py checks that the server and the offline engine agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.error
import urllib.request

import pytest

from .conftest import chat, scrape_metrics, serve
from .prompts import CHAT_PROMPTS
from .test_exactness import assert_matches_plain

pytestmark = pytest.mark.engine

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
# Drafting on every step (as test_exactness.py): the adaptive draft budget could otherwise turn
# drafting off under load and leave the draft path untested exactly where it matters.
CLASP_ALWAYS_DRAFT = {"method": "clasp", "clasp_adaptive": False}


# ---------------------------------------------------------------------------------- helpers
metrics = scrape_metrics


def wait_idle(server, timeout_s: float = 120) -> dict[str, float]:
    """Metrics once nothing runs or waits (aborts reach the engine asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(server)
        if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle after {timeout_s} s: "
                        f"{ {k: v for k, v in m.items() if 'num_requests' in k} }")
        time.sleep(0.5)


def post(server, path: str, payload: dict, timeout: float = 300) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a POST, error statuses included."""
    request = urllib.request.Request(
        f"{server.url}{path}", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def server_tree_rss(server) -> dict[str, int]:
    """RSS in bytes of the server and each of its descendants (engine core, worker), by name."""
    import psutil

    root = psutil.Process(server.proc.pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            out[f"{proc.name()}[{proc.pid}]"] = proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def load_prompts(n: int) -> list[str]:
    """n distinct chat prompts (the fixed prompts, then with an instruction appended)."""
    suffixes = ["", " Answer briefly.", " Explain your answer.", " Use simple words."]
    out = [p + s for s in suffixes for p in CHAT_PROMPTS]
    assert n <= len(out)
    return out[:n]


def plain_reference(engines, prompts: list[str], max_tokens: int):
    """(chat-templated prompts, plain greedy token ids) from the offline plain engine."""
    from vllm import SamplingParams

    plain = engines.get(dtype="float32")
    templated = [chat(plain.get_tokenizer(), p) for p in prompts]
    results = plain.generate(templated, SamplingParams(temperature=0, max_tokens=max_tokens),
                             use_tqdm=False)
    return plain, templated, [list(r.outputs[0].token_ids) for r in results]


async def stream_chat(client, model: str, prompt: str, max_tokens: int) -> list[int]:
    """Greedy streamed chat completion; the generated token ids (from `return_token_ids`)."""
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=max_tokens, stream=True, extra_body={"return_token_ids": True},
    )
    token_ids: list[int] = []
    async for chunk in stream:
        for choice in chunk.choices:
            token_ids.extend(getattr(choice, "token_ids", None) or [])
    return token_ids


async def run_concurrently(server, prompts: list[str], max_tokens: int, concurrency: int):
    """Each prompt as its own streaming client, `concurrency` at a time; results or exceptions."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", timeout=600,
                                max_retries=0)
    limit = asyncio.Semaphore(concurrency)

    async def one(prompt):
        async with limit:
            return await stream_chat(client, server.model, prompt, max_tokens)

    try:
        return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
    finally:
        await client.close()


def check_against_plain(server, engines, prompts, max_tokens, concurrency, label):
    plain, templated, expected = plain_reference(engines, prompts, max_tokens)
    started = time.monotonic()
    results = asyncio.run(run_concurrently(server, prompts, max_tokens, concurrency))
    elapsed = time.monotonic() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} requests failed, first: {errors[0]!r}\n{server.log_tail()}"
    assert all(results), "a request returned no tokens (return_token_ids missing?)"
    print(f"[{label}] {len(prompts)} requests, {sum(map(len, results))} tokens in {elapsed:.1f} s")
    assert_matches_plain(plain, templated, expected, results, "float32", label)
    return elapsed


# ------------------------------------------------------------------ 64 concurrent clients
CONCURRENT_CLIENTS = 64
CONCURRENT_MAX_TOKENS = 48


def test_64_concurrent_streams_equal_plain(clasp_server, engines):
    before = metrics(clasp_server)
    check_against_plain(clasp_server, engines, load_prompts(CONCURRENT_CLIENTS),
                        CONCURRENT_MAX_TOKENS, CONCURRENT_CLIENTS, "64 concurrent")
    after = metrics(clasp_server)
    drafts = (after.get("vllm:spec_decode_num_drafts_total", 0)
              - before.get("vllm:spec_decode_num_drafts_total", 0))
    assert drafts > 0, "no speculative steps under load: CLaSp was not exercised"


# --------------------------------------------------------------------- aborts and leaks
ABORT_MAX_TOKENS = 24
ABORT_CONCURRENCY = 32


async def abusive_clients(server, n: int, seed: int = 0) -> dict[str, int]:
    """n short requests, most of them abandoned mid-way in different ways; outcome counts."""
    import openai

    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", timeout=120,
                                max_retries=0)
    limit = asyncio.Semaphore(ABORT_CONCURRENCY)
    prompts = load_prompts(4 * len(CHAT_PROMPTS))
    counts = {"completed": 0, "closed_mid_stream": 0, "cancelled": 0, "timed_out": 0,
              "finished_before_abort": 0}

    async def complete(prompt):
        await stream_chat(client, server.model, prompt, ABORT_MAX_TOKENS)
        counts["completed"] += 1

    async def close_mid_stream(prompt, after_chunks):
        stream = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": prompt}],
            temperature=0, max_tokens=ABORT_MAX_TOKENS, stream=True,
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen >= after_chunks:
                await stream.close()  # drops the connection: the server must abort
                counts["closed_mid_stream"] += 1
                return
        counts["finished_before_abort"] += 1

    async def cancel_after(prompt, delay_s):
        task = asyncio.ensure_future(stream_chat(client, server.model, prompt, ABORT_MAX_TOKENS))
        done, _ = await asyncio.wait({task}, timeout=delay_s)
        if done:
            task.result()
            counts["finished_before_abort"] += 1
            return
        task.cancel()  # the connection goes away at an arbitrary point
        with contextlib.suppress(asyncio.CancelledError):
            await task
        counts["cancelled"] += 1

    async def time_out(prompt, timeout_s):
        try:
            await client.with_options(timeout=timeout_s).chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": prompt}],
                temperature=0, max_tokens=ABORT_MAX_TOKENS,
            )
            counts["finished_before_abort"] += 1
        except openai.APITimeoutError:
            counts["timed_out"] += 1

    async def one(i):
        prompt = prompts[i % len(prompts)]
        kind = i % 4
        async with limit:
            if kind == 0:
                await complete(prompt)
            elif kind == 1:
                await close_mid_stream(prompt, rng.randint(1, 6))
            elif kind == 2:
                await cancel_after(prompt, rng.uniform(0.05, 1.5))
            else:
                await time_out(prompt, rng.uniform(0.2, 1.5))

    try:
        results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    finally:
        await client.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} clients failed unexpectedly, first: {errors[0]!r}"
    return counts


def tracked_requests(m: dict[str, float]) -> float:
    name = "vllm:clasp_tracked_requests"
    assert name in m, f"{name} missing from /metrics: {sorted(k for k in m if 'clasp' in k)}"
    return m[name]


def tracked_when_idle(server, settle_s: float = 10) -> tuple[float, dict[str, float]]:
    """vllm:clasp_tracked_requests once the server is idle, given `settle_s` for the step
    that frees the last requests' state: the scheduler reports a finished request to the
    worker one step after the step that finished it, and that step's stats reach /metrics
    after the running-requests gauge has already dropped to 0. A leak stays above 0."""
    m = wait_idle(server)
    deadline = time.monotonic() + settle_s
    while tracked_requests(m) != 0 and time.monotonic() < deadline:
        time.sleep(0.25)
        m = metrics(server)
    return tracked_requests(m), m


@pytest.mark.parametrize("num_requests", [
    120, pytest.param(1000, marks=pytest.mark.slow),
])
def test_aborted_clients_free_clasp_state(clasp_server, num_requests):
    server = clasp_server
    # Warm up (allocator pools, prefix cache) before the RSS baseline.
    asyncio.run(abusive_clients(server, 40, seed=1))
    idle = wait_idle(server)
    rss_before = server_tree_rss(server)
    success_before = idle.get("vllm:request_success_total", 0)

    started = time.monotonic()
    counts = asyncio.run(abusive_clients(server, num_requests, seed=2))
    elapsed = time.monotonic() - started
    tracked_after_load, idle = tracked_when_idle(server)
    rss_after = server_tree_rss(server)
    print(f"[aborts x{num_requests}] {elapsed:.1f} s, outcomes {counts}")
    print(f"[aborts x{num_requests}] vllm:clasp_tracked_requests when idle after the load: "
          f"{tracked_after_load:.0f}")
    print(f"[aborts x{num_requests}] requests finished normally meanwhile: "
          f"{idle.get('vllm:request_success_total', 0) - success_before:.0f}")
    for name in rss_before:
        if name in rss_after:
            print(f"[aborts x{num_requests}] RSS {name}: {rss_before[name] / 2**20:.0f} -> "
                  f"{rss_after[name] / 2**20:.0f} MiB")
    abandoned = counts["closed_mid_stream"] + counts["cancelled"] + counts["timed_out"]
    assert abandoned >= num_requests // 3, counts

    # Still serving: a normal request completes.
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
        assert r.status == 200
    status, body = post(server, "/v1/chat/completions", {
        "model": server.model, "messages": [{"role": "user", "content": CHAT_PROMPTS[0]}],
        "temperature": 0, "max_tokens": 16,
    })
    assert status == 200 and body["choices"][0]["message"]["content"].strip(), body

    # No CLaSp state outlives its request once the server is idle. (vLLM reports finished
    # requests to the worker in the next step, which has nothing scheduled when the server
    # goes idle: the state must be freed on that step too.)
    tracked, _ = tracked_when_idle(server)
    print(f"[aborts x{num_requests}] vllm:clasp_tracked_requests when idle after one more "
          f"request: {tracked:.0f}")
    assert (tracked_after_load, tracked) == (0, 0), (
        f"CLaSp still tracks requests on an idle server: {tracked_after_load:.0f} after "
        f"{num_requests} requests, {tracked:.0f} after one more"
    )

    # vLLM's own worker grows by ~0.1-0.2 MiB per request over its first ~1,000 (allocator;
    # measured the same with the ngram method, Python object counts flat), so the bound is
    # loose; a leaked per-request draft tensor (K x vocab floats, 1.5 MiB) would break it.
    growth = sum(rss_after.values()) - sum(rss_before.values())
    print(f"[aborts x{num_requests}] RSS growth of the server tree: {growth / 2**20:.0f} MiB")
    assert growth < 384 * 2**20, f"server RSS grew by {growth / 2**20:.0f} MiB"


# ------------------------------------------------------------------ KV-cache pressure
# CPU blocks hold 128 tokens. 6 blocks (one is vLLM's null block) hold 640 tokens, enough for
# one request of max_model_len 512, while 8 concurrent requests need about 16 blocks: the
# scheduler must preempt running requests (V1 recomputes them) to make progress.
TINY_KV_BLOCKS = 6
TINY_KV_MAX_MODEL_LEN = 512
PRESSURE_REQUESTS = 8
PRESSURE_MAX_TOKENS = 128


@pytest.fixture(scope="class")
def tiny_kv_server(model_dir, tmp_path_factory):
    with serve(model_dir, tmp_path_factory.mktemp("tiny_kv"), CLASP_ALWAYS_DRAFT, (
        "--num-gpu-blocks-override", str(TINY_KV_BLOCKS),
        "--max-model-len", str(TINY_KV_MAX_MODEL_LEN),
    )) as server:
        yield server


class TestKVCachePressure:
    def test_preemption_recomputes_and_equals_plain(self, tiny_kv_server, engines):
        server = tiny_kv_server
        before = metrics(server)
        assert before.get("vllm:num_preemptions_total", 0) == 0
        prompts = load_prompts(PRESSURE_REQUESTS * 3)[::3]  # mixed lengths and kinds
        check_against_plain(server, engines, prompts, PRESSURE_MAX_TOKENS, PRESSURE_REQUESTS,
                            "KV pressure")
        after = metrics(server)
        preemptions = after.get("vllm:num_preemptions_total", 0)
        drafts = (after.get("vllm:spec_decode_num_drafts_total", 0)
                  - before.get("vllm:spec_decode_num_drafts_total", 0))
        print(f"[KV pressure] {preemptions:.0f} preemptions, {drafts:.0f} speculative steps")
        assert preemptions > 0, "the tiny KV cache never forced a preemption: test too weak"
        assert drafts > 0


# ------------------------------------------------- requests CLaSp cannot help: as ngram does
@pytest.fixture(scope="class")
def ngram_server(model_dir, tmp_path_factory):
    with serve(model_dir, tmp_path_factory.mktemp("ngram"), NGRAM) as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def prompt_of_length(tokenizer, n: int) -> list[int]:
    """Exactly n token ids of real text (the passage repeated)."""
    from .prompts import SHORT_PASSAGE

    ids = tokenizer.encode(SHORT_PASSAGE + "\n", add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def chat_payload(**kwargs) -> dict:
    return {"messages": [{"role": "user", "content": CHAT_PROMPTS[0]}], "temperature": 0,
            "max_tokens": 32, **kwargs}


# (endpoint, payload builder taking the tokenizer): what spec decoding refuses (min_p,
# logit_bias), what it applies only in verification (penalties, bad words, allowed tokens,
# min_tokens, logprobs), and the context-limit edges.
CASES = {
    # Refused with spec decoding when sampling; dropped for greedy requests.
    "min_p_sampled": ("chat", lambda tok: chat_payload(min_p=0.1, temperature=0.8, seed=1)),
    "min_p_greedy": ("chat", lambda tok: chat_payload(min_p=0.1)),
    "logit_bias": ("chat", lambda tok: chat_payload(logit_bias={"504": 5})),
    "repetition_penalty": ("chat", lambda tok: chat_payload(repetition_penalty=1.3)),
    "presence_frequency_penalty": (
        "chat", lambda tok: chat_payload(presence_penalty=0.8, frequency_penalty=0.8)),
    "bad_words": ("chat", lambda tok: chat_payload(bad_words=[" Paris"])),
    "allowed_token_ids": (
        "chat", lambda tok: chat_payload(allowed_token_ids=list(range(100, 3000)))),
    # The answer is ~8 tokens: min_tokens keeps EOS out until 24.
    "min_tokens": ("chat", lambda tok: chat_payload(min_tokens=24)),
    "logprobs": ("chat", lambda tok: chat_payload(logprobs=True, top_logprobs=3)),
    "prompt_logprobs": (
        "completions", lambda tok: {"prompt": prompt_of_length(tok, 40), "max_tokens": 16,
                                    "temperature": 0, "prompt_logprobs": 2}),
    "max_tokens_1": ("chat", lambda tok: chat_payload(max_tokens=1)),
    "prompt_len_max_minus_1_max_tokens_1": (
        "completions", lambda tok: {"prompt": prompt_of_length(tok, 2047), "max_tokens": 1,
                                    "temperature": 0}),
    "prompt_len_max_minus_1_default_max_tokens": (
        "completions", lambda tok: {"prompt": prompt_of_length(tok, 2047), "temperature": 0}),
    # Fewer context slots left (5) than CLaSp's K (8): the draft budget is clipped.
    "prompt_len_max_minus_5_default_max_tokens": (
        "completions", lambda tok: {"prompt": prompt_of_length(tok, 2043), "temperature": 0}),
    "prompt_len_max_minus_1_max_tokens_16": (
        "completions", lambda tok: {"prompt": prompt_of_length(tok, 2047), "max_tokens": 16,
                                    "temperature": 0}),
    "prompt_len_max": (
        "completions", lambda tok: {"prompt": prompt_of_length(tok, 2048), "max_tokens": 1,
                                    "temperature": 0}),
    "prompt_len_overflow": (
        "completions", lambda tok: {"prompt": prompt_of_length(tok, 2100), "max_tokens": 8,
                                    "temperature": 0}),
}


def comparable(status: int, body: dict) -> dict:
    """What must agree between methods: status, error class and message, or the outputs."""
    if status != 200:
        error = body.get("error", body)
        return {"status": status, "type": error.get("type"), "message": error.get("message")}
    choice = body["choices"][0]
    out = {"status": status, "finish_reason": choice["finish_reason"],
           "completion_tokens": body["usage"]["completion_tokens"]}
    if "message" in choice:
        out["text"] = choice["message"]["content"]
        if choice.get("logprobs"):
            out["logprob_tokens"] = [
                [t["token"] for t in entry["top_logprobs"]]
                for entry in choice["logprobs"]["content"]
            ]
    else:
        out["text"] = choice["text"]
    if body.get("prompt_logprobs") or choice.get("prompt_logprobs"):
        prompt_logprobs = body.get("prompt_logprobs") or choice.get("prompt_logprobs")
        out["prompt_logprob_tokens"] = [
            None if entry is None else sorted(entry) for entry in prompt_logprobs
        ]
    return out


class TestLikeNgram:
    @pytest.mark.parametrize("case", list(CASES))
    def test_same_answer_as_ngram(self, clasp_server, ngram_server, tokenizer, case):
        endpoint, build = CASES[case]
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        payload = build(tokenizer)
        got = {}
        for name, server in (("ngram", ngram_server), ("clasp", clasp_server)):
            status, body = post(server, path, {"model": server.model, **payload})
            got[name] = comparable(status, body)
        print(f"[{case}] {got['ngram']}")
        assert got["clasp"] == got["ngram"]
        # The server survives whatever the request was.
        with urllib.request.urlopen(f"{clasp_server.url}/health", timeout=10) as r:
            assert r.status == 200
