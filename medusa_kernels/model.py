"""A Llama-family decoder (Llama 1/2/3, Vicuna, Mistral, Qwen2) with a static KV cache.

gpt-fast sized: RMSNorm, RoPE (default, linear and llama3 scaling), GQA, SwiGLU, fused QKV and
gate/up projections. Two entry points:

- ``prefill(tokens [B, P], lengths [B])``: causal attention over right-padded prompts, fills the
  cache at [0, P) and sets ``cache.seqlens = lengths``.
- ``step(tokens [B, T], cache, tree_mask [T, T], depths [T])``: T tokens per sequence at
  positions ``seqlens + depths``; their KV is written at ``[seqlens, seqlens + T)`` and attention
  goes through ``ops.tree_attention``. ``seqlens`` is left alone (the loop compacts or advances).

Both return the final normed hidden state [B, *, d]; ``logits(hidden)`` applies the lm_head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops import lm_head_topk, tree_attention


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        """From a transformers config.json dict (llama, mistral, qwen2; v4 and v5 layouts)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"config.json model_type {model_type!r} is not llama/mistral/qwen2")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=None if kind == "default" else rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] (float32, as transformers computes them), scaled if asked."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, D] (halves repeated, HF's rotate_half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache:
    """Static cache: k, v [num_layers, B, S, Hkv, D] and seqlens [B] int32 on the device."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype, device):
        shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, write_pos, tree_mask):
        cfg = self.cfg
        B, T, _ = x.shape
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = self.wqkv(x).split([q_out, kv_out, kv_out], dim=-1)
        q = apply_rope(q.view(B, T, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        batch = torch.arange(B, device=x.device)[:, None]
        cache.k[layer][batch, write_pos] = k
        cache.v[layer][batch, write_pos] = v
        if tree_mask is None:  # prefill: causal over the new tokens, cache empty before
            group = cfg.num_heads // cfg.num_kv_heads
            kr = k.repeat_interleave(group, dim=2).transpose(1, 2)
            vr = v.repeat_interleave(group, dim=2).transpose(1, 2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, is_causal=True)
            out = out.transpose(1, 2)
        else:
            out = tree_attention(q, cache.k[layer], cache.v[layer], cache.seqlens, tree_mask)
        return self.wo(out.reshape(B, T, q_out))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, layer, write_pos, tree_mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, write_pos, tree_mask)
        return h + self.mlp(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # .to(dtype) must not round the RoPE frequencies
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg, batch, capacity, p.dtype, p.device)

    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq  # [B, T, D/2]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _run(self, tokens, positions, cache, write_pos, tree_mask) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self._rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, write_pos, tree_mask)
        return self.norm(x)

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: KVCache):
        """tokens [B, P] right-padded, lengths [B] int: returns hidden [B, P, d]."""
        P = tokens.shape[1]
        positions = torch.arange(P, device=tokens.device).expand(tokens.shape[0], P)
        hidden = self._run(tokens, positions, cache, positions, None)
        cache.seqlens.copy_(lengths)
        return hidden

    def step(self, tokens, cache: KVCache, tree_mask, depths) -> torch.Tensor:
        """tokens [B, T] at positions seqlens + depths [T]; KV written at seqlens + arange(T)."""
        T = tokens.shape[1]
        start = cache.seqlens.to(torch.long)[:, None]
        positions = start + depths[None, :]
        write_pos = start + torch.arange(T, device=tokens.device)[None, :]
        return self._run(tokens, positions, cache, write_pos, tree_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax of ``logits(hidden)`` [..., d] -> [...] int64 (ties: lower id), without
        writing the logits (``lm_head_topk`` with k = 1: fused on the GPU)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return lm_head_topk(flat, self.lm_head.weight, 1)[1].view(hidden.shape[:-1])

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights named as in transformers' LlamaForCausalLM (and Mistral, Qwen2)."""
        mine = {"embed.weight": state["model.embed_tokens.weight"]}
        mine["norm.weight"] = state["model.norm.weight"]
        if "lm_head.weight" in state:
            mine["lm_head.weight"] = state["lm_head.weight"]
        elif self.cfg.tie_word_embeddings:
            mine["lm_head.weight"] = state["model.embed_tokens.weight"]
        else:
            raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        for i in range(self.cfg.num_layers):
            hf, me = f"model.layers.{i}.", f"layers.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            for kind in ("weight", "bias"):
                qkv = [attn + f"{p}_proj.{kind}" for p in "qkv"]
                if qkv[0] in state:
                    mine[me + f"attention.wqkv.{kind}"] = torch.cat([state[n] for n in qkv])
                if attn + f"o_proj.{kind}" in state:
                    mine[me + f"attention.wo.{kind}"] = state[attn + f"o_proj.{kind}"]
                gate_up = [mlp + f"{p}_proj.{kind}" for p in ("gate", "up")]
                if gate_up[0] in state:
                    mine[me + f"mlp.w13.{kind}"] = torch.cat([state[n] for n in gate_up])
                if mlp + f"down_proj.{kind}" in state:
                    mine[me + f"mlp.w2.{kind}"] = state[mlp + f"down_proj.{kind}"]
            mine[me + "attention_norm.weight"] = state[hf + "input_layernorm.weight"]
            mine[me + "ffn_norm.weight"] = state[hf + "post_attention_layernorm.weight"]
        missing, unexpected = self.load_state_dict(mine, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not fit the config: missing {missing}, unexpected {unexpected}"
            )

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights named as in transformers (the inverse of ``load_hf_state_dict``)."""
        cfg = self.cfg
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        out = {"model.embed_tokens.weight": self.embed.weight}
        out["model.norm.weight"] = self.norm.weight
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.layers):
            hf = f"model.layers.{i}."
            for kind in ("weight", "bias"):
                wqkv = getattr(layer.attention.wqkv, kind)
                if wqkv is not None:
                    for name, part in zip("qkv", wqkv.split([q_out, kv_out, kv_out]), strict=True):
                        out[hf + f"self_attn.{name}_proj.{kind}"] = part
                if getattr(layer.attention.wo, kind) is not None:
                    out[hf + f"self_attn.o_proj.{kind}"] = getattr(layer.attention.wo, kind)
                w13 = getattr(layer.mlp.w13, kind)
                if w13 is not None:
                    gate, up = w13.chunk(2)
                    out[hf + f"mlp.gate_proj.{kind}"], out[hf + f"mlp.up_proj.{kind}"] = gate, up
                    out[hf + f"mlp.down_proj.{kind}"] = getattr(layer.mlp.w2, kind)
            out[hf + "input_layernorm.weight"] = layer.attention_norm.weight
            out[hf + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
        return {k: v.detach().contiguous() for k, v in out.items()}
