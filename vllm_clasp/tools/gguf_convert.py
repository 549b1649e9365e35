"""Converting a GGUF file into a Hugging Face model directory (float32 safetensors, config,
tokenizer with its chat template), checked against the model's spec. torch, transformers and
safetensors are imported inside the functions, so importing this module stays cheap."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vllm_clasp.tools.model_specs import ModelPrepError, ModelSpec, installed_version

logger = logging.getLogger("vllm_clasp.tools.model_prep")



# Keys that transformers' GGUF loader leaves in the config and that must not reach config.json
# (``quantization_config`` makes vLLM/transformers treat the directory as GGUF-quantised).
_GGUF_CONFIG_LEFTOVERS = ("quantization_config", "gguf_file", "_model_name_or_path")


def convert_gguf_to_hf(spec: ModelSpec, gguf_path: Path, out_dir: Path) -> dict:
    """Dequantise ``gguf_path`` and write an HF directory into the existing ``out_dir``.

    Returns extra facts for the marker.  Heavy imports happen here and in the
    ``_save_*`` / ``_check_*`` helpers only.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    logger.info("loading tokenizer from %s", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    logger.info("loading and dequantising weights from %s", gguf_path)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    model.eval()

    num_tensors, n_params, tied = _save_weights(model, out_dir)
    dropped = _save_config(model, out_dir)
    save_tokenizer(tokenizer, model.config, out_dir, add_bos_token=spec.add_bos_token)
    cfg = _check_converted(spec, tokenizer, out_dir)
    return {
        "architectures": cfg.get("architectures"),
        "dtype": "float32",
        "num_tensors": num_tensors,
        "num_parameters": n_params,
        "tied_lm_head_dropped": tied,
        "dropped_config_keys": dropped,
        "transformers_version": installed_version("transformers"),
        "torch_version": torch.__version__,
    }


def _save_weights(model, out_dir: Path) -> tuple[int, int, bool]:
    """``model.safetensors`` in float32 (lossless w.r.t. the dequantised Q4_1 values), tied
    lm_head dropped; returns (tensors, parameters, whether the lm_head was tied)."""
    import torch
    from safetensors.torch import save_file

    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    n_params = sum(t.numel() for t in tensors.values())
    logger.info("writing %d tensors (%d parameters, float32)", len(tensors), n_params)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return len(tensors), n_params, tied


def _save_config(model, out_dir: Path) -> list[str]:
    """``config.json`` without GGUF leftovers, with explicit architecture and dtype, plus the
    generation config; returns the dropped keys."""
    config = model.config
    dropped = []
    for key in _GGUF_CONFIG_LEFTOVERS:
        if key in config.__dict__:
            delattr(config, key)
            dropped.append(key)
    if dropped:
        logger.info("dropped GGUF config leftovers: %s", ", ".join(dropped))
    config.architectures = [type(model).__name__]
    config.dtype = "float32"
    config.save_pretrained(str(out_dir))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))
    return dropped


def save_tokenizer(tokenizer, config, out_dir: Path, add_bos_token: bool = False) -> None:
    """The tokenizer with its chat template (saved as chat_template.jinja by transformers 5).

    ``add_bos_token``: make it prepend BOS.  transformers 5 keeps that in tokenizer.json's
    post-processor (the setter rebuilds it; tokenizer_config.json's ``add_bos_token`` is
    dropped on save and ignored on load), which vLLM's tokenizer uses too.
    """
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0:
        tokenizer.model_max_length = max_pos  # GGUF gives none (1e30 placeholder)
    if add_bos_token:
        tokenizer.add_bos_token = True
    tokenizer.save_pretrained(str(out_dir))


def _check_converted(spec: ModelSpec, tokenizer, out_dir: Path) -> dict:
    """Sanity checks on what was written (cheap; no weight reload); returns config.json."""
    from transformers import AutoTokenizer

    with open(out_dir / "config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    for key in _GGUF_CONFIG_LEFTOVERS:
        if key in cfg:
            raise ModelPrepError(f"config.json still contains {key!r}")
    for key, want in spec.expected_config:
        if cfg.get(key) != want:
            raise ModelPrepError(f"converted config.json has {key}={cfg.get(key)!r}, expected {want!r}")
    reloaded = AutoTokenizer.from_pretrained(str(out_dir))
    check_tokenizer(spec, tokenizer, reloaded)
    return cfg


def check_tokenizer(spec: ModelSpec, tokenizer, reloaded) -> None:
    """The reloaded tokenizer reproduces the converted one; chat template and BOS per spec."""
    if spec.chat_template:
        if not getattr(reloaded, "chat_template", None):
            raise ModelPrepError("the saved tokenizer has no chat template")
        probe = [{"role": "user", "content": "What is the capital of France?"}]
        a = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        b = reloaded.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    else:
        a = b = "The capital of France is"
    if a != b or tokenizer(a)["input_ids"] != reloaded(b)["input_ids"]:
        raise ModelPrepError("the saved tokenizer does not reproduce the GGUF tokenizer")
    if spec.add_bos_token:
        ids = reloaded("Hello")["input_ids"]
        if reloaded.bos_token_id is None or not ids or ids[0] != reloaded.bos_token_id:
            raise ModelPrepError(
                f"the saved tokenizer does not prepend BOS ({reloaded.bos_token!r}): "
                f"'Hello' -> {ids}"
            )
