"""Chat with a CLaSp-enabled vLLM server through the OpenAI client (plain and streaming).

Start the server first (the default model dir is printed by
`python -c "from vllm_clasp.tools.model_prep import prepare_model; print(prepare_model())"`):

    VLLM_CPU_KVCACHE_SPACE=1 vllm serve <model_dir> \
        --speculative-config '{"method": "clasp"}' \
        --dtype float32 --enforce-eager --max-model-len 2048 --host 127.0.0.1 --port 8000

then:

    python examples/serve_client.py --base-url http://127.0.0.1:8000/v1

--model defaults to the first model the server lists.
"""

import argparse

from openai import OpenAI

PROMPT = "Explain photosynthesis in two sentences."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="served model name (default: the first)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="x", timeout=120, max_retries=0)
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": PROMPT}]

    resp = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=args.max_tokens)
    print(f"plain:     {resp.choices[0].message.content.strip()}")

    print("streaming: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=args.max_tokens, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
