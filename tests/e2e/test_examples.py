"""The scripts in examples/ run as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=EXAMPLES.parent)


def test_offline_example():
    proc = _run([str(EXAMPLES / "offline.py")], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    m = re.search(r"mean acceptance length: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-4000:]
    assert float(m.group(1)) >= 1.0
    assert proc.stdout.count("### ") == 4


def test_serve_client_example(clasp_server):
    proc = _run([str(EXAMPLES / "serve_client.py"), "--base-url", clasp_server.base_url,
                 "--model", clasp_server.model], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:] + clasp_server.log_tail()
    plain = re.search(r"^plain:\s+(.+)$", proc.stdout, re.M)
    streaming = re.search(r"^streaming:\s+(.+)$", proc.stdout, re.M)
    assert plain and streaming, proc.stdout


def test_ray_tp_example_imports_and_parses_arguments():
    """examples/ray_tp.py needs a Ray cluster to run; here: importing it starts nothing (no
    vLLM import), its arguments parse, and `--help` works."""
    check = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ray_tp', {str(EXAMPLES / 'ray_tp.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "args = module.parse_args(['--model', 'm', '--tensor-parallel-size', '4'])\n"
        "assert (args.model, args.tensor_parallel_size) == ('m', 4), args\n"
        "assert 'vllm' not in sys.modules and 'ray' not in sys.modules\n"
    )
    proc = _run(["-c", check], timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _run([str(EXAMPLES / "ray_tp.py"), "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "--tensor-parallel-size" in proc.stdout
