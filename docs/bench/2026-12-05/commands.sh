#!/usr/bin/env bash
# The benchmark runs of 2026-12-05 (docs/benchmarks.md), in the order they ran.
set -u
cd "$(dirname "$0")/../../.."   # the repository root (run from a checkout of the measured commit)
Q=../shared/data/spec_bench/question.jsonl
B=.venv/bin/vllm-clasp
D=docs/bench/2026-12-05
F='{"method":"clasp","clasp_adaptive":false,"clasp_copy_source":"none","clasp_draft_exit_threshold":0,"clasp_skip_layers":12}'
FO='{"method":"clasp","clasp_adaptive":false,"clasp_copy_source":"none","clasp_draft_exit_threshold":0,"clasp_skip_layers":12,"clasp_share_skip_sets":false}'
run() { echo "=== $1 $(date -u +%H:%M)"; shift; "$B" bench --questions $Q --enforce-eager --offset 40 --no-progress "$@"; echo "rc=$?"; }
run b1-greedy --per-category 4 --max-tokens 128 --batch-sizes 1 --methods plain,clasp,suffix,ngram,clasp-layers --out $D/b1-greedy
run forced-layers --per-category 2 --max-tokens 64 --batch-sizes 1,8 --methods "plain,forced12=$F,forced12-own=$FO" --out $D/forced-layers
run b1-t1 --per-category 2 --max-tokens 96 --batch-sizes 1 --temperature 1 --methods plain,clasp,suffix --out $D/b1-t1
run b1-t1-seeded --per-category 2 --max-tokens 96 --batch-sizes 1 --temperature 1 --seeded --methods plain,clasp,suffix --out $D/b1-t1-seeded
run repeat --per-category 1 --max-tokens 64 --batch-sizes 1 --repeat --methods plain,clasp,suffix,ngram --out $D/repeat
run b8-b32-greedy --per-category 6 --max-tokens 96 --batch-sizes 8,32 --methods plain,clasp,suffix,clasp-layers --out $D/b8-b32-greedy
echo "=== done $(date -u +%H:%M)"

# Later the same day (code 5d293a4 unless stated): the n-gram extension of suffix copies on
# the tuning half (offset 0; code 353c621), and batch 8 / 32 after the unfitted-bucket
# exploration change.
SN='clasp-sn={"method":"clasp","clasp_copy_source":"suffix+ngram"}'
"$B" bench --questions $Q --enforce-eager --offset 0 --no-progress --per-category 3 --max-tokens 128 --batch-sizes 1 --methods "plain,clasp,$SN,suffix" --out $D/tune-suffix-ngram
"$B" bench --questions $Q --enforce-eager --offset 40 --no-progress --per-category 4 --max-tokens 96 --batch-sizes 8,32 --methods plain,clasp,suffix --out $D/b8-b32-unfitted-every-4th
