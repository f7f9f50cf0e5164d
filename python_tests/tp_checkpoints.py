"""What the tensor-parallel tests share: a tiny checkpoint in raw transformers tensor names (the
building blocks' decoder, ``parallel_worker.tiny_forward``) and logits full of ties."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

# The tiny model the ranks run: GQA 2, head_dim 6 (q rows 48 != d 24), a vocabulary that
# 2 and 4 ranks split unevenly (19 + 18; 10 + 9 + 9 + 9).
TINY = dict(vocab_size=37, hidden_size=24, num_attention_heads=8, num_key_value_heads=4,
            head_dim=6, intermediate_size=40, num_hidden_layers=2)
MEDUSA_HEADS = 3
# every shard boundary of 2 and 4 ranks (19; 10, 19, 28) from both sides, and both ends
TOKENS = torch.tensor([[0, 9, 10, 18, 19, 36, 5], [36, 27, 28, 1, 2, 3, 20]])
KS = (1, 2, 5, 9, 12)  # 9: the smallest shard at 4 ranks; 12: above it (short lists padded)


def tiny_tensors(cfg: dict, medusa_heads: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under transformers' names. Layer 0: separate q/k/v and gate/up with
    biases (Qwen2), o_proj and MLP biases. Layer 1: Phi-3's fused qkv_proj and gate_up_proj,
    Gemma's sandwich norms. Then Medusa heads (one ResBlock each), layout (b) names."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    V, d = cfg["vocab_size"], cfg["hidden_size"]
    Hq, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    I, q, kv = cfg["intermediate_size"], Hq * D, Hkv * D
    t = {"model.embed_tokens.weight": rnd(V, d, scale=1.0), "lm_head.weight": rnd(V, d),
         "model.norm.weight": 1 + rnd(d, scale=0.1)}
    p = "model.layers.0."
    for name, rows in (("q", q), ("k", kv), ("v", kv)):
        t[p + f"self_attn.{name}_proj.weight"] = rnd(rows, d)
        t[p + f"self_attn.{name}_proj.bias"] = rnd(rows)
    t[p + "self_attn.o_proj.weight"], t[p + "self_attn.o_proj.bias"] = rnd(d, q), rnd(d)
    for name in ("gate", "up"):
        t[p + f"mlp.{name}_proj.weight"], t[p + f"mlp.{name}_proj.bias"] = rnd(I, d), rnd(I)
    t[p + "mlp.down_proj.weight"], t[p + "mlp.down_proj.bias"] = rnd(d, I), rnd(d)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        t[p + norm + ".weight"] = 1 + rnd(d, scale=0.1)
    if cfg["num_hidden_layers"] > 1:
        p = "model.layers.1."
        t[p + "self_attn.qkv_proj.weight"] = rnd(q + 2 * kv, d)
        t[p + "self_attn.o_proj.weight"] = rnd(d, q)
        t[p + "mlp.gate_up_proj.weight"] = rnd(2 * I, d)
        t[p + "mlp.down_proj.weight"] = rnd(d, I)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            t[p + norm + ".weight"] = 1 + rnd(d, scale=0.1)
    for h in range(medusa_heads):
        t[f"medusa_head.{h}.0.linear.weight"] = rnd(d, d, scale=0.1)
        t[f"medusa_head.{h}.0.linear.bias"] = rnd(d, scale=0.1)
        t[f"medusa_head.{h}.1.weight"] = rnd(V, d)
    return t


def write_checkpoint(path, tensors: dict, cfg: dict, files: int = 2) -> list[str]:
    """config.json + ``files`` safetensors shards with model.safetensors.index.json."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = sorted(tensors)
    weight_map, paths = {}, []
    for i in range(files):
        shard = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::files]}
        save_file(part, os.path.join(path, shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        paths.append(os.path.join(path, shard))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return paths




def tie_logits() -> torch.Tensor:
    """[6, 2, 37] logits full of exact ties, many across shard boundaries: small integers; a
    constant row; the maximum on both sides of every boundary; -0.0 against +0.0; NaN and
    +-inf."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 3, (6, 2, 37), generator=g).float()
    logits[0] = 1.0
    logits[1] = 0.0
    logits[1, :, [9, 10, 18, 19, 27, 28]] = 5.0
    logits[2] = torch.where(torch.rand(2, 37, generator=g) < 0.5, -0.0, 0.0)
    logits[2, 0, 30] = -1.0
    logits[3, 0, [4, 20, 33]] = float("nan")
    logits[3, 1, [10, 36]] = float("inf")
    logits[3, 1, [0, 19]] = -float("inf")
    return logits


