#!/usr/bin/env bash
# Contract-check vllm-clasp against another vLLM release's Python sources, without installing it.
#
#   scripts/check-host.sh 0.33.0          # or any release on PyPI
#
# Downloads the `vllm` wheel of that release (no dependencies; cached under
# ~/.cache/vllm-clasp/wheels), lays its Python sources over a copy of the installed CPU build
# (whose compiled parts stay: this machine has no CUDA), and runs the contract suite plus the
# config / plugin / planner unit tests against them. An upgrade is reviewed by running this one
# command: a failing contract test names the patch or glue file to look at.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/check-host.sh VLLM_VERSION [pytest args]}
shift
scripts/setup.sh >/dev/null
PY=.venv/bin/python
cache=${VLLM_CLASP_CACHE:-$HOME/.cache/vllm-clasp}/wheels
mkdir -p "$cache"
wheel=$(ls "$cache"/vllm-"$version"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "check-host: downloading vllm==$version (no dependencies)" >&2
  "$PY" -m pip download --disable-pip-version-check -q --no-deps -d "$cache" "vllm==$version"
  wheel=$(ls "$cache"/vllm-"$version"-*.whl | head -1)
fi
overlay=$(mktemp -d)
trap 'rm -rf "$overlay"' EXIT
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp -r "$site/vllm" "$overlay/vllm"
"$PY" - "$wheel" "$overlay" <<'PY'
import sys, zipfile
wheel, overlay = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    sources = [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")]
    zf.extractall(overlay, members=sources)
print(f"check-host: {len(sources)} Python files of {wheel.rsplit('/', 1)[-1]} over the installed build",
      file=sys.stderr)
PY
found=$(PYTHONPATH="$overlay" "$PY" -c 'import vllm; print(vllm.__version__)')
echo "check-host: vLLM sources imported: $found" >&2
# The installed distribution's metadata still names the CPU build; the version check is about
# the sources, which are the ones under test here.
export PYTHONPATH="$overlay" VLLM_CLASP_SKIP_VERSION_CHECK=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "$PY" -m pytest -q -p no:cacheprovider tests/contract tests/unit/test_spec_config.py \
  tests/unit/test_plugin.py tests/unit/test_planner.py tests/unit/test_docs.py "$@"
