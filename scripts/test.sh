#!/usr/bin/env bash
# Run the test suite (after making sure the environment is set up).
#   scripts/test.sh          the contract suite against vLLM 0.33.0's sources (scripts/check-host.sh),
#                            then everything but the long tests (what CI runs, ~50 min on 2 cores)
#   scripts/test.sh --long   only the long tests (marked `slow`: 1,000 requests with aborts
#                            against a live server, ~12 min)
# Extra arguments go to pytest and come last, so a `-m` of yours wins, e.g.
# `scripts/test.sh -m "not engine"` for the fast host-free tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
selection=(-m "not slow")
if [[ "${1:-}" == "--long" ]]; then
  shift
  selection=(-m slow)
fi
if [[ "${selection[1]}" != slow ]]; then
  # The contract suite against each other supported vLLM release's sources (~1 min).
  scripts/check-host.sh 0.33.0
fi
exec .venv/bin/python -m pytest -ra "${selection[@]}" "$@"
