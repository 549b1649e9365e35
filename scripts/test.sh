#!/usr/bin/env bash
# Run the whole test suite (after making sure the environment is set up). Extra arguments go
# to pytest, e.g. `scripts/test.sh -m "not engine"` for the fast host-free tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/python -m pytest -ra "$@"
