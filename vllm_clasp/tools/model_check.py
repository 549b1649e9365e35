"""Do transformers and vLLM agree on a prepared model? (`vllm-clasp model NAME --check`)

A converted checkpoint (GGUF dequantised to a Hugging Face directory) can load in both and
still be wrong in one of them: a tokenizer that drops `<bos>`, a config key either reads
differently. Both run greedy decoding in float32 on the same token ids; the check passes when
every continuation is identical, or first differs where transformers' top two logits are
within `TIE_MARGIN` of each other (float32 rounding can pick either of a near-tie).
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Here is a list of the planets of the solar system, in order from the Sun:\n1. Mercury\n",
)
MAX_TOKENS = 24
TIE_MARGIN = 1e-3  # logits


@dataclass
class Agreement:
    prompt: str
    transformers: list[int]  # greedy token ids
    vllm: list[int]
    first_difference: int | None  # index into the continuation, None when identical
    margin: float | None  # transformers' top-1 minus top-2 logit there

    @property
    def ok(self) -> bool:
        return self.first_difference is None or (self.margin is not None
                                                 and self.margin < TIE_MARGIN)


def transformers_greedy(path: str, prompt_ids: list[list[int]], max_tokens: int):
    """[(continuation ids, per-step top-2 logit margins)] with transformers, float32, CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for ids in prompt_ids:
            generated = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens,
                                       do_sample=False, output_scores=True,
                                       return_dict_in_generate=True, pad_token_id=0)
            tokens = generated.sequences[0, len(ids):].tolist()
            margins = []
            for scores in generated.scores:  # [1, V] per step
                top2 = scores[0].float().topk(2).values
                margins.append(float(top2[0] - top2[1]))
            out.append((tokens, margins))
    return out


def check_agreement(path: str, llm=None, prompts=PROMPTS, max_tokens: int = MAX_TOKENS
                    ) -> list[Agreement]:
    """Greedy continuations of `prompts` (tokenised once, by the model's tokenizer) in
    transformers and in vLLM (`llm`, a plain float32 `vllm.LLM` on `path`, or one made here)."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    reference = transformers_greedy(path, prompt_ids, max_tokens)
    owned = llm is None
    if owned:
        import os

        from vllm import LLM

        # A small KV cache: on CPU, vLLM's default reserves 92 % of memory, and transformers'
        # copy of the model has just been freed in this process.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=1024)
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                               params, use_tqdm=False)
    finally:
        if owned:
            from vllm_clasp.tools.engine import shutdown

            shutdown(llm)
    report = []
    for prompt, (hf_tokens, margins), result in zip(prompts, reference, results):
        got = list(result.outputs[0].token_ids)
        n = min(len(hf_tokens), len(got))
        first = next((i for i in range(n) if hf_tokens[i] != got[i]),
                     None if len(hf_tokens) == len(got) else n)
        margin = margins[first] if first is not None and first < len(margins) else None
        report.append(Agreement(prompt, hf_tokens, got, first, margin))
    return report
