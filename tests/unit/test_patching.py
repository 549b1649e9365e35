"""Tests of vllm_clasp.vllm.patching: `Patch` and `when_imported`, on toy classes and modules.

Host-free and instant: no vLLM import. Toy modules get unique names so tests do not interfere.
"""

from __future__ import annotations

import importlib
import sys
import types
import uuid

import pytest

from vllm_clasp.vllm import patching
from vllm_clasp.vllm.patching import Patch, when_imported


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def toy_module():
    """A registered module with a function, a class (with a nested class) and a subclass."""
    name = _unique("clasp_toy")
    module = types.ModuleType(name)

    def greet(who):
        return f"hello {who}"

    class Base:
        def inherited(self):
            return "base"

    class Toy(Base):
        value = 1

        def method(self, x):
            return x + 1

        @property
        def prop(self):
            return "prop"

        class Inner:
            def inner(self):
                return "inner"

    module.greet = greet
    module.Base = Base
    module.Toy = Toy
    sys.modules[name] = module
    yield module
    del sys.modules[name]


def _patch(owner_path, attribute, make):
    return Patch(owner_path, attribute, make, why="test", removal="test")


# --------------------------------------------------------------------------- Patch


def test_patch_class_method_applies_and_keeps_original(toy_module):
    original = toy_module.Toy.__dict__["method"]
    calls = []

    def make(orig):
        calls.append(orig)

        def method(self, x):
            return orig(self, x) * 10

        return method

    patch = _patch(f"{toy_module.__name__}:Toy", "method", make)
    assert not patch.applied
    assert patch.module_name == toy_module.__name__
    assert patch.owner() is toy_module.Toy

    patch.apply()
    assert patch.applied
    assert patch.original is original
    assert calls == [original]  # make() got the original, once
    assert toy_module.Toy().method(1) == 20

    patch.revert()
    assert not patch.applied
    assert toy_module.Toy.__dict__["method"] is original
    assert toy_module.Toy().method(1) == 2


def test_patch_property(toy_module):
    patch = _patch(
        f"{toy_module.__name__}:Toy", "prop",
        lambda orig: property(lambda self: orig.fget(self).upper()),
    )
    patch.apply()
    assert isinstance(patch.original, property)
    assert toy_module.Toy().prop == "PROP"
    patch.revert()
    assert toy_module.Toy().prop == "prop"


def test_patch_module_function(toy_module):
    original = toy_module.greet
    patch = _patch(toy_module.__name__, "greet", lambda orig: lambda who: orig(who) + "!")
    patch.apply()
    assert patch.original is original
    assert toy_module.greet("x") == "hello x!"
    patch.revert()
    assert toy_module.greet is original


def test_patch_nested_class(toy_module):
    patch = _patch(
        f"{toy_module.__name__}:Toy.Inner", "inner", lambda orig: lambda self: "patched"
    )
    assert patch.owner() is toy_module.Toy.Inner
    patch.apply()
    assert toy_module.Toy.Inner().inner() == "patched"
    patch.revert()
    assert toy_module.Toy.Inner().inner() == "inner"


def test_double_patch_refused(toy_module):
    patch = _patch(f"{toy_module.__name__}:Toy", "method", lambda orig: lambda self, x: 0)
    patch.apply()
    replacement = toy_module.Toy.__dict__["method"]
    with pytest.raises(RuntimeError, match="already patched"):
        patch.apply()
    # The refused second apply changed nothing: still one layer of patching.
    assert toy_module.Toy.__dict__["method"] is replacement
    patch.revert()
    assert toy_module.Toy().method(1) == 2


def test_missing_attribute_names_the_file_to_update(toy_module):
    patch = _patch(f"{toy_module.__name__}:Toy", "no_such_method", lambda orig: orig)
    with pytest.raises(AttributeError) as info:
        patch.apply()
    message = str(info.value)
    assert f"{toy_module.__name__}:Toy.no_such_method" in message
    assert "vllm_clasp/vllm/patches.py" in message
    assert not patch.applied
    assert "no_such_method" not in vars(toy_module.Toy)

    module_patch = _patch(toy_module.__name__, "no_such_function", lambda orig: orig)
    with pytest.raises(AttributeError, match="vllm_clasp/vllm/patches.py"):
        module_patch.apply()


def test_inherited_attribute_counts_as_missing(toy_module):
    """A class patch targets the class that defines the attribute, not a subclass."""
    patch = _patch(f"{toy_module.__name__}:Toy", "inherited", lambda orig: orig)
    with pytest.raises(AttributeError, match="vllm_clasp/vllm/patches.py"):
        patch.apply()
    assert "inherited" not in vars(toy_module.Toy)


def test_make_failure_leaves_owner_untouched(toy_module):
    def make(orig):
        raise ValueError("boom")

    patch = _patch(f"{toy_module.__name__}:Toy", "method", make)
    original = toy_module.Toy.__dict__["method"]
    with pytest.raises(ValueError, match="boom"):
        patch.apply()
    assert not patch.applied
    assert toy_module.Toy.__dict__["method"] is original


def test_revert_unapplied_is_a_noop(toy_module):
    patch = _patch(f"{toy_module.__name__}:Toy", "method", lambda orig: orig)
    patch.revert()
    assert not patch.applied


def test_reapply_after_revert(toy_module):
    patch = _patch(f"{toy_module.__name__}:Toy", "value", lambda orig: orig + 1)
    patch.apply()
    assert toy_module.Toy.value == 2
    patch.revert()
    patch.apply()
    assert toy_module.Toy.value == 2
    patch.revert()
    assert toy_module.Toy.value == 1


def test_owner_imports_the_module_lazily(tmp_path, monkeypatch):
    name = _unique("clasp_lazy_owner")
    (tmp_path / f"{name}.py").write_text("class C:\n    x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    patch = _patch(f"{name}:C", "x", lambda orig: orig + 41)
    assert name not in sys.modules
    try:
        patch.apply()
        assert sys.modules[name].C.x == 42
    finally:
        patch.revert()
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- when_imported


def test_when_imported_already_imported_runs_at_once():
    calls = []
    when_imported("json", lambda: calls.append("json"))
    assert calls == ["json"]
    assert "json" not in patching._hooks


@pytest.fixture
def fresh_module(tmp_path, monkeypatch):
    """Name of a not-yet-imported module on sys.path whose body records its own completion."""
    name = _unique("clasp_fresh")
    (tmp_path / f"{name}.py").write_text(
        "import sys\n"
        "EXECUTIONS = getattr(sys, '_clasp_test_executions', 0) + 1\n"
        "sys._clasp_test_executions = EXECUTIONS\n"
        "def defined_first():\n"
        "    return 1\n"
        "BODY_DONE = True  # the last statement of the module body\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    sys.__dict__.pop("_clasp_test_executions", None)
    yield name
    sys.modules.pop(name, None)
    patching._hooks.pop(name, None)
    sys.__dict__.pop("_clasp_test_executions", None)


def test_when_imported_not_yet_imported_runs_after_body(fresh_module):
    seen = []

    def callback():
        module = sys.modules[fresh_module]
        # The whole body has run when the callback fires.
        seen.append((getattr(module, "BODY_DONE", False), module.EXECUTIONS))

    when_imported(fresh_module, callback)
    assert seen == []  # registering does not import
    assert fresh_module not in sys.modules
    assert patching._finder in sys.meta_path

    module = importlib.import_module(fresh_module)
    assert seen == [(True, 1)]
    assert module.BODY_DONE is True
    assert fresh_module not in patching._hooks  # hooks are consumed

    # A second import is served from sys.modules: no re-execution, no second callback.
    again = importlib.import_module(fresh_module)
    assert again is module
    __import__(fresh_module)
    assert seen == [(True, 1)]

    # Even a fresh re-import of the file does not re-run the consumed hook.
    del sys.modules[fresh_module]
    importlib.import_module(fresh_module)
    assert sys.modules[fresh_module].EXECUTIONS == 2
    assert seen == [(True, 1)]


def test_when_imported_several_callbacks_run_in_order(fresh_module):
    order = []
    when_imported(fresh_module, lambda: order.append("first"))
    when_imported(fresh_module, lambda: order.append("second"))
    importlib.import_module(fresh_module)
    assert order == ["first", "second"]
    # Registering after the import runs at once.
    when_imported(fresh_module, lambda: order.append("late"))
    assert order == ["first", "second", "late"]


def test_when_imported_keeps_the_module_loader_usable(fresh_module):
    when_imported(fresh_module, lambda: None)
    module = importlib.import_module(fresh_module)
    assert module.__spec__.name == fresh_module
    # Tools that ask the loader for source still get it (forwarded to the real loader).
    assert "BODY_DONE" in module.__spec__.loader.get_source(fresh_module)


def test_finder_ignores_modules_without_hooks():
    assert patching._finder.find_spec(_unique("clasp_nohook"), None) is None
