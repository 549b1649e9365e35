"""A small random-weight Llama whose head counts divide by 2 (the default model's 9 heads do
not), for tensor-parallel tests at TP=2: 8 layers, hidden 256, 4 heads, 2 KV heads.

It reuses the default model's tokenizer, vocabulary and chat template, so prompts are built the
same way. Weights are seeded; the output head is drawn wider than the rest (std 0.5) so that
the top-2 logits are far apart and greedy decoding has no near-ties for floating-point noise
to flip. Outputs are meaningless text: fine for lock-step and equality tests, not for
acceptance rates.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny_models import SEED, save_with_wide_head


def build_small_llama(out_dir: Path, tokenizer_dir: Path) -> Path:
    """Write a float32 safetensors LlamaForCausalLM to out_dir (once) and return out_dir."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    base = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"], hidden_size=256, intermediate_size=512,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"),
        pad_token_id=base.get("pad_token_id"),
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    return save_with_wide_head(model, out_dir, Path(tokenizer_dir))
