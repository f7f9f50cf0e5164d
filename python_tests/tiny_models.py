"""Tiny random HF checkpoints (saved with transformers' save_pretrained) for the tests."""

from __future__ import annotations

import torch
import transformers

from medusa_kernels import MedusaHeads, save_medusa_heads

VOCAB = 101

ARCHS = {
    "llama-mha": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama-gqa-llama3rope": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=64),
        ),
    ),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True)),
}


def make_hf_model(
    arch: str, seed: int = 0, layers: int = 2, max_shard_size=None, path=None, hidden: int = 64
):
    """A random transformers model of ``arch`` (fp32, eval); saved to ``path`` when given.
    4 attention heads: head dim ``hidden // 4`` (16 by default; 256 gives 64, a Triton size)."""
    config_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=512, eos_token_id=None,
        bos_token_id=None, pad_token_id=None, **extra,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the default init: sharper, tie-free logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    if path is not None:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kwargs)
    return model


def save_random_heads(path, num_heads=5, num_layers=1, d=64, vocab=VOCAB, seed=0, base=""):
    torch.manual_seed(seed)
    heads = MedusaHeads(num_heads, num_layers, d, vocab)
    with torch.no_grad():
        heads.w1.normal_(0, 0.05)
        heads.b1.normal_(0, 0.05)
    save_medusa_heads(heads, path, base)
    return heads
