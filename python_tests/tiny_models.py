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


# The new families, each with the features that set it apart switched on at tiny sizes (windows
# of a few tokens, caps that bind). 3 layers: local and global layers both occur.
_LONG = dict(short_factor=[1.0 + 0.1 * i for i in range(6)],
             long_factor=[1.5 + 0.4 * i for i in range(6)])
FAMILIES = {
    "qwen3": (transformers.Qwen3Config,
              dict(num_key_value_heads=2, head_dim=16, attention_bias=True)),
    "qwen3-window": (transformers.Qwen3Config,  # layer 0 full, layers 1-2 windowed
                     dict(num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                          sliding_window=5, max_window_layers=1)),
    "qwen2-window": (transformers.Qwen2Config,
                     dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                          max_window_layers=2)),
    "mistral-window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=4)),
    "phi3": (transformers.Phi3Config, dict(num_key_value_heads=4, sliding_window=6)),
    # Phi-4-mini-like: partial rotary 0.75 (12 of 16 dims), longrope, GQA
    "phi3-longrope": (transformers.Phi3Config,
                      dict(num_key_value_heads=2, partial_rotary_factor=0.75,
                           rope_scaling=dict(type="longrope", **_LONG),
                           original_max_position_embeddings=40)),
    "gemma2": (transformers.Gemma2Config,
               dict(num_key_value_heads=2, head_dim=16, sliding_window=4,
                    query_pre_attn_scalar=12, attn_logit_softcapping=1.5,
                    final_logit_softcapping=2.0)),
    "gemma3": (transformers.Gemma3TextConfig,
               dict(num_key_value_heads=2, head_dim=16, sliding_window=5,
                    sliding_window_pattern=2, rope_local_base_freq=100.0,
                    rope_scaling=dict(rope_type="linear", factor=2.0),
                    final_logit_softcapping=2.0)),
}
ALL = {**ARCHS, **FAMILIES}


def make_hf_model(
    arch: str, seed: int = 0, layers: int = 2, max_shard_size=None, path=None, hidden: int = 64,
    head_dim: int | None = None, **overrides,
):
    """A random transformers model of ``arch`` (fp32, eval); saved to ``path`` when given.
    4 attention heads: head dim ``hidden // 4`` (16 by default; 256 gives 64, a Triton size)
    unless the arch (or ``head_dim``) sets one; ``overrides`` go into the config. ``arch`` may
    also be a (config class, kwargs) pair. All but ``ARCHS`` also get random norm weights and
    biases (the default init leaves them at 1 / 0)."""
    config_cls, extra = ALL[arch] if isinstance(arch, str) else arch
    extra = dict(extra, **({} if head_dim is None else {"head_dim": head_dim}), **overrides)
    torch.manual_seed(seed)
    config = config_cls(**dict(
        dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden // 2,
             num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=512,
             eos_token_id=None, bos_token_id=None, pad_token_id=None), **extra))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the default init: sharper, tie-free logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            elif not (isinstance(arch, str) and arch in ARCHS):
                p.add_(torch.randn_like(p), alpha=0.1)
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


def step_inputs(medusa: bool):
    """One decode step to compile: (model, tree buffers, step fn, root [2], last_hidden [2, d],
    running [2], two equal caches with random contents at lengths 37 / 50), the tiny e2e model;
    a finished row rides along."""
    from medusa_kernels.bench.e2e import SHAPES, random_model
    from medusa_kernels.decoding import medusa_step, plain_step
    from medusa_kernels.model import ModelConfig
    from medusa_kernels.tree import TREES, build_tree

    torch._dynamo.reset()
    m = random_model(ModelConfig(**SHAPES["tiny"]), 4, torch.float32, "cpu", seed=5)
    tb = build_tree(TREES["small_15"] if medusa else [], 4 if medusa else None)
    step = medusa_step if medusa else plain_step
    g = torch.Generator().manual_seed(1)
    root, last_hidden = torch.randint(0, 512, (2,), generator=g), torch.randn(2, 128, generator=g)
    running = torch.tensor([True, False])  # a finished row rides along, accepting nothing
    caches = []
    for _ in range(2):
        cache = m.base.new_cache(2, 96)
        cache.k.normal_(generator=torch.Generator().manual_seed(2))
        cache.v.normal_(generator=torch.Generator().manual_seed(3))
        cache.seqlens.copy_(torch.tensor([37, 50], dtype=torch.int32))
        caches.append(cache)
    return m, tb, step, root, last_hidden, running, caches
