"""Preemptions under a small KV cache, one method per process (vLLM's metrics registry is per
process).

    .venv/bin/python scripts/measure_preemptions.py plain|clasp|clasp0|suffix [BLOCKS]

16 chat prompts (tests/e2e/prompts.py), 384 greedy tokens each with ignore_eos, sent twice to
one engine with BLOCKS KV-cache blocks (default 24); prints vLLM's preemption counter and the
two wall times. `clasp0` is clasp without layer-skip drafts (no lookahead slots).
"""

from __future__ import annotations

import json
import os
import sys
import time

SPECS = {"plain": None, "suffix": {"method": "suffix"}, "clasp": {"method": "clasp"},
         "clasp0": {"method": "clasp", "clasp_max_model_draft_tokens": 0}}

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vllm import LLM, SamplingParams

    from tests.e2e.prompts import CHAT_PROMPTS
    from vllm_clasp.tools.model_prep import prepare_model

    name = sys.argv[1]
    blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    llm = LLM(str(prepare_model()), dtype="float32", enforce_eager=True, max_model_len=2048,
              num_gpu_blocks_override=blocks, speculative_config=SPECS[name],
              disable_log_stats=False, seed=0)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
               for q in CHAT_PROMPTS[:16]]
    params = SamplingParams(temperature=0, max_tokens=384, ignore_eos=True)
    seconds = []
    for _ in range(2):
        started = time.time()
        llm.generate(prompts, params, use_tqdm=False)
        seconds.append(round(time.time() - started, 1))
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    print("RESULT", name, json.dumps({k: v for k, v in metrics.items() if "preempt" in k}),
          seconds)
