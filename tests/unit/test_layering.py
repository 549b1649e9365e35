"""Layering: the host-free modules of vllm_clasp never import vLLM.

They hold the algorithm (optimizer, options, skip sets, draft sampling, prompt lookup, the
draft budget, stats), the patching mechanism and the tooling (model preparation, HF
reference layers, CLI, benchmark, demo); they must stay usable, testable and cheap to import
without vLLM. Only `spec_config`, `patches` (lazily), `proposer`, `decoder_stack` and
`paged_rows` may touch the host; `bench` and `demo` only inside the functions that run an
engine. An AST check catches an import anywhere in a host-free file (also inside functions); a
subprocess check catches indirect imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "vllm_clasp"

# Files that must not import vLLM anywhere (module level or inside functions).
HOST_FREE = [
    "__init__.py",
    "optimizer.py",
    "options.py",
    "skip_state.py",
    "draft_sampling.py",
    "stats.py",
    "patching.py",
    "model_prep.py",
    "hf_layers.py",
    "prompt_lookup.py",
    "draft_budget.py",
    "bench_report.py",
    "cpu_env.py",
]
# Files that must not import vLLM at module level (their subcommands may, lazily): the CLI
# builds its parser from bench/demo, so `vllm-clasp --help` would otherwise import vLLM.
HOST_FREE_AT_TOP_LEVEL = ["cli.py", "bench.py", "demo.py"]

# Modules a subprocess imports; vLLM must not be in sys.modules afterwards. `plugin` and
# `patches` are included because vLLM imports the entry point in every process: registering
# must stay cheap and import vLLM modules only when they are patched.
IMPORTABLE_WITHOUT_VLLM = [
    "vllm_clasp",
    "vllm_clasp.options",
    "vllm_clasp.optimizer",
    "vllm_clasp.skip_state",
    "vllm_clasp.draft_sampling",
    "vllm_clasp.stats",
    "vllm_clasp.patching",
    "vllm_clasp.model_prep",
    "vllm_clasp.hf_layers",
    "vllm_clasp.prompt_lookup",
    "vllm_clasp.draft_budget",
    "vllm_clasp.cli",
    "vllm_clasp.bench",
    "vllm_clasp.demo",
    "vllm_clasp.plugin",
    "vllm_clasp.patches",
]


def _is_vllm(module: str | None) -> bool:
    return module is not None and (module == "vllm" or module.startswith("vllm."))


def _imports(tree: ast.AST, descend_into_functions: bool):
    """(line, imported module) for every import statement and literal import_module call."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                yield node.lineno, node.args[0].value
        for child in ast.iter_child_nodes(node):
            if not descend_into_functions and isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            ):
                continue
            stack.append(child)


def _vllm_imports(filename: str, descend_into_functions: bool) -> list[str]:
    path = PACKAGE_DIR / filename
    tree = ast.parse(path.read_text(), filename=str(path))
    return sorted(
        f"vllm_clasp/{filename}:{line}: imports {module}"
        for line, module in _imports(tree, descend_into_functions)
        if _is_vllm(module)
    )


@pytest.mark.parametrize("filename", HOST_FREE)
def test_host_free_module_never_imports_vllm(filename):
    found = _vllm_imports(filename, descend_into_functions=True)
    assert not found, (
        f"vllm_clasp/{filename} must stay host-free (no vLLM import, not even inside a "
        "function); move host code to spec_config/proposer/decoder_stack/paged_rows:\n"
        + "\n".join(found)
    )


@pytest.mark.parametrize("filename", HOST_FREE_AT_TOP_LEVEL)
def test_tooling_top_level_never_imports_vllm(filename):
    found = _vllm_imports(filename, descend_into_functions=False)
    assert not found, (
        f"vllm_clasp/{filename} must not import vLLM at module level (import it inside the "
        "function that needs it):\n" + "\n".join(found)
    )


def test_checker_sees_nested_and_dynamic_imports():
    """The AST walk finds imports in functions, methods, try/if blocks and import_module()."""
    source = (
        "import os\n"
        "def f():\n"
        "    from vllm.config import VllmConfig\n"
        "class C:\n"
        "    def m(self):\n"
        "        import vllm\n"
        "try:\n"
        "    import vllm.envs as envs\n"
        "except ImportError:\n"
        "    pass\n"
        "importlib.import_module('vllm.v1.worker.gpu_model_runner')\n"
        "from vllm_clasp import options\n"
        "import vllm_clasp.patching\n"
    )
    tree = ast.parse(source)
    every = sorted(m for _, m in _imports(tree, True) if _is_vllm(m))
    assert every == ["vllm", "vllm.config", "vllm.envs", "vllm.v1.worker.gpu_model_runner"]
    top = sorted(m for _, m in _imports(tree, False) if _is_vllm(m))
    assert top == ["vllm.envs", "vllm.v1.worker.gpu_model_runner"]


def test_every_listed_file_exists():
    for filename in HOST_FREE + HOST_FREE_AT_TOP_LEVEL:
        assert (PACKAGE_DIR / filename).is_file(), f"vllm_clasp/{filename} is missing"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )


def test_importing_the_package_does_not_import_vllm():
    result = _run("import vllm_clasp, sys; assert 'vllm' not in sys.modules")
    assert result.returncode == 0, result.stderr


def test_importing_host_free_modules_does_not_import_vllm():
    imports = "; ".join(f"import {name}" for name in IMPORTABLE_WITHOUT_VLLM)
    imports += "; import vllm_clasp.cli as cli; cli.build_parser()"  # parser of every subcommand
    code = (
        f"{imports}; import sys; "
        "loaded = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')); "
        "assert not loaded, loaded"
    )
    result = _run(code)
    assert result.returncode == 0, (
        "importing " + ", ".join(IMPORTABLE_WITHOUT_VLLM) + " pulled in vLLM:\n" + result.stderr
    )
