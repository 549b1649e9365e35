"""CLaSp with tensor parallelism over Ray (offline batch generation).

    ray start --head                      # on the head node; `ray start --address=HEAD:6379` on others
    python examples/ray_tp.py --model meta-llama/Llama-3.1-8B-Instruct --tensor-parallel-size 2

Every node needs the same vllm==0.32.0 and vllm-clasp installed; see docs/distributed.md.
Prints each answer and the mean acceptance length from vLLM's spec-decode counters.
"""

import argparse
import json

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CLaSp + tensor parallelism over Ray")
    parser.add_argument("--model", required=True, help="model name or local directory")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=2)
    parser.add_argument("--num-speculative-tokens", type=int, default=8)
    parser.add_argument("--clasp-config", default="{}", help='extra keys, e.g. \'{"clasp_loi": 8}\'')
    parser.add_argument("--max-tokens", type=int, default=128)
    return parser.parse_args(argv)


def counter(metrics, name: str) -> float:
    return sum(m.value for m in metrics if m.name == name and hasattr(m, "value"))


def main(argv=None) -> None:
    args = parse_args(argv)
    from vllm import LLM, SamplingParams

    speculative_config = {"method": "clasp", "num_speculative_tokens": args.num_speculative_tokens,
                          **json.loads(args.clasp_config)}
    llm = LLM(model=args.model, tensor_parallel_size=args.tensor_parallel_size,
              distributed_executor_backend="ray", speculative_config=speculative_config,
              disable_log_stats=False)
    prompts = [llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS]
    for question, out in zip(PROMPTS, llm.generate(prompts, SamplingParams(
            temperature=0, max_tokens=args.max_tokens))):
        print(f"### {question}\n{out.outputs[0].text.strip()}\n")
    metrics = llm.get_metrics()
    drafts = counter(metrics, "vllm:spec_decode_num_drafts")
    accepted = counter(metrics, "vllm:spec_decode_num_accepted_tokens")
    print(f"mean acceptance length: {1 + accepted / drafts:.2f}" if drafts else "no drafts")


if __name__ == "__main__":
    main()
