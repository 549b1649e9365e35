"""Tiny random-weight checkpoints of each model family CLaSp claims, made with transformers.

Each has 4 decoder layers, hidden 128 (2 heads of 64: a head size vLLM's CPU attention has), the default model's tokenizer and vocabulary (so prompts
are built the same way), seeded weights and a wide output head (std 0.5) so that greedy
decoding has no near-ties for floating-point noise to flip. Outputs are meaningless text:
fine for "the draft computes what the model computes" (a full-model draft is accepted every
time) and greedy equality, not for acceptance rates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
)
SEED = 0
HEAD_STD = 0.5
COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
              tie_word_embeddings=False)

# family -> (transformers config class, model class, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64}),
    # A sliding window shorter than the prompts below, so it matters.
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16,
                                                                 "head_dim": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    # Alternating sliding-window and full attention: two KV-cache groups in vLLM.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 64, "sliding_window": 16, "query_pre_attn_scalar": 64,
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
        "tie_word_embeddings": True}),  # vLLM's Gemma always ties the head
    # Sliding-window layers with a full one (Gemma 3's pattern, shortened to 4 layers), each
    # kind with its own RoPE base.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 64, "sliding_window": 16, "query_pre_attn_scalar": 64,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                        "full_attention"], "tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 64, "decoder_sparse_step": 1}),
    # Not drafted by CLaSp: its forward scales the embeddings outside embed_input_ids and its
    # layers take no residual.
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 12.0,
                                                         "residual_multiplier": 0.2}),
}


def build_tiny_model(family: str, out_dir: Path, tokenizer_dir: Path) -> Path:
    """Write a float32 safetensors checkpoint of `family` to out_dir (once); return out_dir."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    config_name, model_name, overrides = FAMILIES[family]
    base = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    config = getattr(transformers, config_name)(
        vocab_size=base["vocab_size"], bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"), **{**COMMON, **overrides},
    )
    torch.manual_seed(SEED)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    return save_with_wide_head(model, out_dir, tokenizer_dir)


def save_with_wide_head(model, out_dir: Path, tokenizer_dir: Path) -> Path:
    """Redraw the output head wide (no near-ties), save the checkpoint with the default
    model's tokenizer files, atomically (a .partial directory renamed into place)."""
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=generator) * HEAD_STD)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        source = Path(tokenizer_dir) / name
        if source.exists():
            shutil.copy(source, tmp / name)
    tmp.rename(out_dir)
    return out_dir
