"""Offline batch generation with CLaSp (layer-skip self-speculative decoding) in vLLM.

    VLLM_CPU_KVCACHE_SPACE=1 python examples/offline.py

Uses the embedded default model (SmolLM2-135M-Instruct, prepared on first use) and prints each
answer, then the mean acceptance length from vLLM's own spec-decode counters.
"""

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "Write a Python function that returns the factorial of n.",
]


def counter(metrics, name: str) -> float:
    return sum(m.value for m in metrics if m.name == name and hasattr(m, "value"))


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_clasp.tools.model_prep import prepare_model

    llm = LLM(
        model=str(prepare_model()), speculative_config={"method": "clasp"}, dtype="float32",
        enforce_eager=True, max_model_len=2048, disable_log_stats=False, seed=0,
    )
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                      add_generation_prompt=True)
        for p in PROMPTS
    ]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128))
    for question, out in zip(PROMPTS, outputs):
        print(f"### {question}\n{out.outputs[0].text.strip()}\n")

    metrics = llm.get_metrics()
    drafts = counter(metrics, "vllm:spec_decode_num_drafts")
    accepted = counter(metrics, "vllm:spec_decode_num_accepted_tokens")
    if drafts:
        print(f"mean acceptance length: {1 + accepted / drafts:.2f} "
              f"({int(accepted)} accepted tokens over {int(drafts)} drafts)")
    else:
        print("mean acceptance length: n/a (no drafts)")


if __name__ == "__main__":
    main()
