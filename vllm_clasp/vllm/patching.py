"""A small, host-free mechanism for patching attributes of another package.

`Patch` replaces one attribute of a class or module, keeps the original, and refuses to patch
twice. `when_imported` runs a callback right after a module is imported (or at once if it
already is), so patches of heavy modules are applied only in the processes that import them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

_MISSING = object()


@dataclass
class Patch:
    """One replaced attribute: `owner.attribute = make(original)`."""

    owner_path: str
    """Dotted import path of the module, or `module:Class` for a class attribute."""
    attribute: str
    make: Callable[[Any], Any]
    """Builds the replacement from the original attribute."""
    why: str
    removal: str
    """What vLLM would need to offer for this patch to go away."""
    original: Any = field(default=_MISSING, repr=False)
    number: int = 0
    """Its number in the manifest (two symbols may share one change)."""
    what: str = ""
    """What the replacement does."""
    host_parameters: tuple[str, ...] | None = None
    """The parameters the wrapper expects of the host function (checked by the contract)."""
    scope: str = ""
    """When it is applied (vllm_clasp.vllm.patches.Scope)."""

    @property
    def applied(self) -> bool:
        return self.original is not _MISSING

    @property
    def module_name(self) -> str:
        return self.owner_path.split(":")[0]

    def owner(self) -> Any:
        module_name, _, class_name = self.owner_path.partition(":")
        owner = importlib.import_module(module_name)
        for part in filter(None, class_name.split(".")):
            owner = getattr(owner, part)
        return owner

    def apply(self) -> None:
        if self.applied:
            raise RuntimeError(f"{self.owner_path}.{self.attribute} is already patched")
        owner = self.owner()
        original = owner.__dict__.get(self.attribute, _MISSING) if isinstance(owner, type) \
            else getattr(owner, self.attribute, _MISSING)
        if original is _MISSING:
            raise AttributeError(
                f"cannot patch {self.owner_path}.{self.attribute}: the host has no such "
                "attribute (vLLM changed; see vllm_clasp/vllm/patches.py)"
            )
        setattr(owner, self.attribute, self.make(original))
        self.original = original

    def revert(self) -> None:
        if not self.applied:
            return
        setattr(self.owner(), self.attribute, self.original)
        self.original = _MISSING


_hooks: dict[str, list[Callable[[], None]]] = {}
_hooks_lock = threading.Lock()


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, name: str):
        self._inner = inner
        self._name = name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        with _hooks_lock:
            callbacks = _hooks.pop(self._name, [])
        for callback in callbacks:
            callback()

    def __getattr__(self, name):  # get_code, get_source, ... for tools that ask
        return getattr(self._inner, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PostImportLoader(spec.loader, fullname)
                return spec
        return None


_finder = _PostImportFinder()


def when_imported(module_name: str, callback: Callable[[], None]) -> None:
    """Run `callback()` once `module_name` is imported; at once if it already is."""
    if module_name in sys.modules:
        callback()
        return
    with _hooks_lock:
        _hooks.setdefault(module_name, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


@dataclass
class FieldPatch:
    """One defaulted field added to a host dataclass, so that serialisers that walk
    `dataclasses.fields` (msgspec, `asdict`) carry it across processes."""

    owner_path: str
    """`module:Class` of the dataclass."""
    attribute: str
    annotation: Any
    why: str
    removal: str
    default: Any = None
    applied: bool = False
    number: int = 0
    what: str = ""
    scope: str = ""

    @property
    def module_name(self) -> str:
        return self.owner_path.split(":")[0]

    def owner(self) -> Any:
        return Patch(self.owner_path, self.attribute, None, "", "").owner()

    def apply(self) -> None:
        import dataclasses

        if self.applied:
            raise RuntimeError(f"{self.owner_path}.{self.attribute} is already patched")
        cls = self.owner()
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"cannot add a field to {self.owner_path}: not a dataclass "
                            "(vLLM changed; see vllm_clasp/vllm/patches.py)")
        if self.attribute in cls.__dataclass_fields__ or hasattr(cls, self.attribute):
            raise AttributeError(f"{self.owner_path} already has {self.attribute!r} "
                                 "(vLLM changed; see vllm_clasp/vllm/patches.py)")
        new = dataclasses.field(default=self.default)
        new.name, new.type = self.attribute, self.annotation
        new._field_type = dataclasses._FIELD  # what @dataclass sets for an ordinary field
        cls.__dataclass_fields__[self.attribute] = new
        cls.__annotations__[self.attribute] = self.annotation
        setattr(cls, self.attribute, self.default)  # instances built by __init__ see it
        self.applied = True

    def revert(self) -> None:
        if not self.applied:
            return
        cls = self.owner()
        del cls.__dataclass_fields__[self.attribute]
        del cls.__annotations__[self.attribute]
        delattr(cls, self.attribute)
        self.applied = False
