#!/usr/bin/env bash
# The benchmark runs of 2026-12-06 (docs/benchmarks.md), code 3cec0d9 unless stated, compiled engines
# (the bench's default: no --enforce-eager), float32, 2-core CPU.
set -u
cd "$(dirname "$0")/../../.."   # the repository root (run from a checkout of the measured commit)
Q=../shared/data/spec_bench/question.jsonl
B=.venv/bin/vllm-clasp
D=docs/bench/2026-12-06
F='{"method":"clasp","clasp_adaptive":false,"clasp_copy_source":"none","clasp_draft_exit_threshold":0,"clasp_skip_layers":12}'
FE='{"method":"clasp","clasp_adaptive":false,"clasp_copy_source":"none","clasp_draft_exit_threshold":0,"clasp_skip_layers":12,"clasp_compile_layers":false}'
run() { echo "=== $1 $(date -u +%H:%M)"; shift; "$B" bench --questions $Q --offset 40 --no-progress "$@"; echo "rc=$?"; }
run forced-compiled --per-category 2 --max-tokens 64 --batch-sizes 1,8 --methods "plain,forced12=$F,forced12-eager=$FE" --out $D/forced-compiled
run layers-compiled --per-category 2 --max-tokens 96 --batch-sizes 1,8 --methods plain,clasp-layers,clasp --out $D/layers-compiled
run layers-compiled-b32 --per-category 4 --max-tokens 96 --batch-sizes 32 --methods plain,clasp-layers --out $D/layers-compiled-b32

# Later the same day, code f2b1396 (steps without draft tokens sample as plain decoding):
# clasp against plain and vLLM's suffix at batch 1 (greedy; temperature 1 with a seed per
# request) and at batch 8 / 32.
run b1-greedy --per-category 4 --max-tokens 128 --batch-sizes 1 --methods plain,clasp,suffix --out $D/b1-greedy
run b1-t1-seeded --per-category 2 --max-tokens 96 --batch-sizes 1 --temperature 1 --seeded --methods plain,clasp,suffix --out $D/b1-t1-seeded
run b8-b32-greedy --per-category 4 --max-tokens 96 --batch-sizes 8,32 --methods plain,clasp,suffix --out $D/b8-b32-greedy

# Evening, code cc3aa2a (a bucket without a fit decides with the nearest fitted bucket's;
# unfitted buckets explore the model only on steps without copies):
run b8-b32-greedy-cc3aa2a --per-category 4 --max-tokens 96 --batch-sizes 8,32 --methods plain,clasp,suffix --out $D/b8-b32-greedy-cc3aa2a
# Code 047b232 (closed batches weigh drafts by the critical path; run from a checkout whose
# files equal 047b232's but for one docstring, with --out $D/b8-b32-greedy-closed, renamed):
run b8-b32-greedy-047b232 --per-category 4 --max-tokens 96 --batch-sizes 8,32 --methods plain,clasp,suffix --out $D/b8-b32-greedy-047b232
# Code 047b232: temperature 1 unseeded, and the repeat scenario (every prompt sent twice).
run b1-t1 --per-category 2 --max-tokens 96 --batch-sizes 1 --temperature 1 --methods plain,clasp,suffix --out $D/b1-t1
run repeat --per-category 1 --max-tokens 64 --batch-sizes 1 --repeat --methods plain,clasp,suffix --out $D/repeat
echo "=== done $(date -u +%H:%M)"
