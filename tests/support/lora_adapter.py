"""A random LoRA adapter in PEFT's format for the default model (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(out: Path, model_dir: str | Path, rank: int = 8, seed: int = 0,
                         scale: float = 0.05) -> Path:
    """A rank-`rank` adapter on every projection of every decoder layer of the Llama-style
    model in `model_dir`, weights ~ N(0, scale^2); returns its directory."""
    from safetensors.torch import save_file

    config = json.loads((Path(model_dir) / "config.json").read_text())
    d, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, kv),
              "self_attn.v_proj": (d, kv), "self_attn.o_proj": (d, d),
              "mlp.gate_proj": (d, inter), "mlp.up_proj": (d, inter),
              "mlp.down_proj": (inter, d)}  # module -> (in, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in,
                                                             generator=generator) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank,
                                                             generator=generator) * scale
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": list(TARGETS),
        "base_model_name_or_path": str(model_dir)}))
    return out
