"""With the plugin installed but CLaSp not requested, vLLM behaves exactly as without it.

The same greedy generations run in this process (plugin loaded through vLLM's entry point)
and in a subprocess with `VLLM_PLUGINS=""` (vLLM loads no plugin at all): no speculative
config, and vLLM's own `ngram` method. Token ids must be identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.e2e.conftest import MAX_MODEL_LEN, chat
from tests.e2e.prompts import CHAT_PROMPTS

pytestmark = pytest.mark.engine

PROMPTS = CHAT_PROMPTS[:6]
MAX_TOKENS = 48
NGRAM = {"method": "ngram", "num_speculative_tokens": 4}

WITHOUT_PLUGIN = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        import vllm.plugins
        model_dir, prompts, max_tokens, max_len, configs = json.loads(sys.argv[1])
        results = []
        for spec in configs:
            llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0,
                      max_model_len=max_len, speculative_config=spec)
            texts = [llm.get_tokenizer().apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts]
            outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=max_tokens),
                                use_tqdm=False)
            results.append([list(o.outputs[0].token_ids) for o in outs])
            llm.llm_engine.engine_core.shutdown()
        import vllm_clasp.plugin as plugin
        print("CLASP_REGISTERED", plugin._registered)
        print("RESULT " + json.dumps(results))
""")


def generate(llm) -> list[list[int]]:
    from vllm import SamplingParams

    texts = [chat(llm.get_tokenizer(), p) for p in PROMPTS]
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def without_plugin(model_dir, tmp_path_factory):
    script = tmp_path_factory.mktemp("inert") / "without_plugin.py"
    script.write_text(WITHOUT_PLUGIN)
    env = dict(os.environ, VLLM_PLUGINS="")
    args = json.dumps([model_dir, PROMPTS, MAX_TOKENS, MAX_MODEL_LEN, [None, NGRAM]])
    proc = subprocess.run([sys.executable, str(script), args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CLASP_REGISTERED False" in proc.stdout, "VLLM_PLUGINS='' still loaded the plugin"
    line = next(li for li in proc.stdout.splitlines() if li.startswith("RESULT "))
    plain, ngram = json.loads(line[len("RESULT "):])
    return {"plain": plain, "ngram": ngram}


def test_plain_decoding_unchanged_by_plugin(engines, without_plugin):
    llm = engines.get(dtype="float32", own_process=True)
    import vllm_clasp.plugin

    assert vllm_clasp.plugin._registered, "the plugin did not load through vLLM's entry point"
    assert generate(llm) == without_plugin["plain"]


def test_ngram_unchanged_by_plugin(engines, without_plugin):
    llm = engines.get(dtype="float32", speculative_config=NGRAM, own_process=True)
    assert type(llm.llm_engine.vllm_config.speculative_config).__name__ == "SpeculativeConfig"
    assert generate(llm) == without_plugin["ngram"]
