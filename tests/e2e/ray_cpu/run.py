"""Run vLLM's Ray executor on CPU with the shim and report what each rank did, as JSON.

    CLASP_TEST_RAY_CPU=1 PYTHONPATH=<site dir>:<repo> python -m tests.e2e.ray_cpu.run \
        --model DIR --tp 2 --methods plain,clasp --out result.json

Starts its own Ray instance (`num_gpus=tp` logical placement slots, no GPU; see __init__.py)
and shuts it down at the end, so no Ray process outlives the run. For each method: greedy
token ids, vLLM's spec-decode counters, and per rank its pid, platform class, whether the
vllm_clasp plugin registered there, whether the worker drafts with CLaSp, and CLaSp's counters.
"""

from __future__ import annotations

import argparse
import json
import os

from tests.e2e.prompts import CHAT_PROMPTS

CLASP = {"method": "clasp", "clasp_adaptive": False, "clasp_prompt_lookup_max": 0}


def rank_report(worker) -> dict:
    import vllm_clasp.plugin as plugin
    from vllm.distributed import get_tp_group
    from vllm.platforms import current_platform

    from vllm_clasp.vllm.worker_state import read

    state = read(worker)
    stats = None if state is None else state["stats"]
    if stats:
        stats = {k: v for k, v in stats.items() if not k.endswith("_time_s")}
    return {
        "pid": os.getpid(), "tp_rank": get_tp_group().rank_in_group,
        "platform": type(current_platform).__name__, "plugin_registered": plugin._registered,
        "clasp_drafter": state is not None, "stats": stats,
    }


def run_method(args, method: str) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_clasp.tools.engine import shutdown, spec_counters

    llm = LLM(
        model=args.model, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
        tensor_parallel_size=args.tp, distributed_executor_backend="ray",
        speculative_config=CLASP if method == "clasp" else None, disable_log_stats=False,
    )
    try:
        tokenizer = llm.get_tokenizer()
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True)
            for p in CHAT_PROMPTS[: args.num_prompts]
        ]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return {
            "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
            "spec": spec_counters(llm) if method == "clasp" else None,
            "ranks": llm.collective_rpc(rank_report),
        }
    finally:
        shutdown(llm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--methods", default="plain,clasp")
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import ray

    # Ray's memory monitor kills workers when the whole machine's memory passes 95 %, which on a
    # shared CI machine other jobs can cause; the mp executor has no such policy, so turn it off
    # for this instance (read by the raylet that ray.init starts).
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(address="local", num_cpus=2, num_gpus=args.tp, object_store_memory=256 * 2**20,
             include_dashboard=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # the engine core joins
    try:
        result = {m: run_method(args, m) for m in args.methods.split(",")}
    finally:
        ray.shutdown()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
