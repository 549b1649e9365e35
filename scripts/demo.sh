#!/usr/bin/env bash
# Set up everything (idempotent), then run CLaSp vs plain decoding on the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/vllm-clasp demo "$@"
