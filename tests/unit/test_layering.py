"""Layering: the tree shows three layers, and the host-free ones never import vLLM.

- `vllm_clasp/core/`: the algorithm (options, DP, skip sets, draft sampling, prompt lookup, the
  draft budget, the step planner, stats): plain torch/numpy, never vLLM, not even inside a
  function. Unit-testable in milliseconds.
- `vllm_clasp/vllm/`: the glue (config, patches, the proposer adapter, the skip forward on the
  paged cache, TP collectives, metrics): the only place that may import vLLM at module level.
- `vllm_clasp/tools/`: the command line, benchmark, demo, model preparation: vLLM only inside
  the functions that run an engine, so `vllm-clasp --help` stays cheap.
- `vllm_clasp/plugin.py` and `vllm_clasp/__init__.py`: the entry point vLLM imports in every
  process; no vLLM at module level.

Nothing in `core/` imports `vllm/` or `tools/`; nothing in `vllm/` imports `tools/`. An AST
check catches an import anywhere in a file; a subprocess check catches indirect imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "vllm_clasp"


def _files(folder: str) -> list[str]:
    return sorted(str(p.relative_to(PACKAGE_DIR)) for p in (PACKAGE_DIR / folder).rglob("*.py"))


CORE = _files("core")
GLUE = _files("vllm")
TOOLS = _files("tools")
TOP = ["__init__.py", "plugin.py"]
# Files that must not import vLLM anywhere (module level or inside functions).
HOST_FREE = CORE
# Files that must not import vLLM at module level (their subcommands may, lazily).
HOST_FREE_AT_TOP_LEVEL = TOOLS + TOP
# Which of the package's own layers each layer may import.
ALLOWED_LAYERS = {"core": {"core"}, "vllm": {"core", "vllm"}, "tools": {"core", "vllm", "tools"}}

# Modules a subprocess imports; vLLM must not be in sys.modules afterwards. `plugin` and
# `vllm.patches` are included because vLLM imports the entry point in every process:
# registering must stay cheap and import vLLM modules only when they are patched.
IMPORTABLE_WITHOUT_VLLM = [
    "vllm_clasp",
    "vllm_clasp.plugin",
    "vllm_clasp.vllm.patches",
    "vllm_clasp.vllm.patching",
    *("vllm_clasp." + f[:-3].replace("/", ".") for f in CORE + TOOLS if not f.endswith("__init__.py")),
]


def test_the_tree_has_three_layers():
    assert CORE and GLUE and TOOLS
    top_level = sorted(p.name for p in PACKAGE_DIR.iterdir() if p.suffix == ".py")
    assert top_level == sorted(TOP), "new modules go into core/, vllm/ or tools/"


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


@pytest.mark.parametrize("filename", CORE + GLUE + TOOLS)
def test_layers_import_only_downwards(filename):
    layer = filename.split("/")[0]
    path = PACKAGE_DIR / filename
    tree = ast.parse(path.read_text(), filename=str(path))
    upward = sorted(
        f"vllm_clasp/{filename}:{line}: imports {module}"
        for line, module in _imports(tree, descend_into_functions=True)
        if module and module.startswith("vllm_clasp.")
        and module.split(".")[1] in ALLOWED_LAYERS
        and module.split(".")[1] not in ALLOWED_LAYERS[layer]
    )
    assert not upward, f"{layer}/ may import only {sorted(ALLOWED_LAYERS[layer])}:\n" + \
        "\n".join(upward)


@pytest.mark.parametrize("filename", HOST_FREE)
def test_host_free_module_never_imports_vllm(filename):
    found = _vllm_imports(filename, descend_into_functions=True)
    assert not found, (
        f"vllm_clasp/{filename} must stay host-free (no vLLM import, not even inside a "
        "function); host code belongs in vllm_clasp/vllm/:\n"
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
        "from vllm_clasp.core import options\n"
        "import vllm_clasp.vllm.patching\n"
    )
    tree = ast.parse(source)
    every = sorted(m for _, m in _imports(tree, True) if _is_vllm(m))
    assert every == ["vllm", "vllm.config", "vllm.envs", "vllm.v1.worker.gpu_model_runner"]
    top = sorted(m for _, m in _imports(tree, False) if _is_vllm(m))
    assert top == ["vllm.envs", "vllm.v1.worker.gpu_model_runner"]


def test_each_layer_holds_what_it_owns():
    """The modules the docs' table of folders names are where it says (so the checks above
    cover them)."""
    expected = {
        "core": ["options", "optimizer", "planner", "draft_budget", "skip_state",
                 "draft_sampling", "prompt_lookup", "stats"],
        "vllm": ["config", "patches", "patching", "proposer", "skip_forward", "decoder_stack",
                 "paged_rows", "collective", "metrics"],
        "tools": ["cli", "bench", "questions", "methods", "engine", "demo", "model_prep",
                  "cpu_env", "report"],
    }
    for layer, modules in expected.items():
        for module in modules:
            assert f"{layer}/{module}.py" in CORE + GLUE + TOOLS, f"{layer}/{module}.py missing"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )


def test_importing_the_package_does_not_import_vllm():
    result = _run("import vllm_clasp, sys; assert 'vllm' not in sys.modules")
    assert result.returncode == 0, result.stderr


def test_importing_host_free_modules_does_not_import_vllm():
    imports = "; ".join(f"import {name}" for name in IMPORTABLE_WITHOUT_VLLM)
    imports += "; import vllm_clasp.tools.cli as cli; cli.build_parser()"  # parser of every subcommand
    code = (
        f"{imports}; import sys; "
        "loaded = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')); "
        "assert not loaded, loaded"
    )
    result = _run(code)
    assert result.returncode == 0, (
        "importing " + ", ".join(IMPORTABLE_WITHOUT_VLLM) + " pulled in vLLM:\n" + result.stderr
    )


def test_tools_and_tests_read_worker_state_only_through_worker_state():
    """One debug surface: tools, test helpers and scripts read CLaSp's state in a worker
    with `vllm_clasp.vllm.worker_state.read` (through collective_rpc), never by reaching
    into the runner's `drafter` or the proposer's `planner`."""
    root = PACKAGE_DIR.parent
    files = [*(PACKAGE_DIR / "tools").rglob("*.py"), *(root / "tests" / "e2e").rglob("*.py"),
             *(root / "tests" / "support").rglob("*.py"), *(root / "scripts").rglob("*.py")]
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("drafter", "planner"):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} .{node.attr}")
            if (isinstance(node, ast.Constant) and node.value == "drafter"):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} 'drafter'")
    assert not offenders, offenders
