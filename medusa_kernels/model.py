"""The decoder: Llama, Mistral, Qwen2/3, Phi-3 and Gemma-2/3 (text) with a static KV cache.

gpt-fast sized, with the per-family differences as config switches: RMSNorm (Gemma: ``1 + w``,
and sandwich norms around attention and MLP), RoPE (default, linear, llama3, yarn, longrope,
dynamic; partial rotary; Gemma-3: another rope for its local layers), GQA with optional q/k
RMSNorm (Qwen3, Gemma-3), per-layer sliding windows, attention and final logit soft-capping
(Gemma-2), gated MLPs with transformers' activations. ``hidden_states -> [q | k | v]`` and
``[gate | up]`` are one Linear each, stacked by rows in transformers' order, so a tensor-parallel
split by KV-head group (q, k, v rows) or by MLP columns is a row slice of each part. Two entry
points:

- ``prefill(tokens [B, P], lengths [B])``: causal attention (windowed per layer) over
  right-padded prompts, fills the cache at [0, P) and sets ``cache.seqlens = lengths``.
- ``step(tokens [B, T], cache, tree_mask [T, T], depths [T])``: T tokens per sequence at
  positions ``seqlens + depths``; their KV is written at ``[seqlens, seqlens + T)`` and attention
  goes through ``ops.tree_attention`` (windowed layers pass ``sliding_window`` and the depths).
  ``seqlens`` is left alone (the loop compacts or advances).

Both return the final normed hidden state [B, *, d]; ``logits(hidden)`` applies the lm_head (and
the final soft-cap). ``ModelConfig.from_hf`` audits a transformers config.json (``hf_config``).

A layer is one launch a line (``Block.forward``): (add +) ``ops.rms_norm``, qkv,
``ops.rope_kv_write`` (q/k norms, rotary, K/V into the cache), attention, o, add +
``ops.rms_norm``, gate_up, ``ops.gated_act``, down; the residual add of one block rides in the
next block's first norm. What every layer shares (rope tables, write slots, the attention
rule) is computed once per forward into a ``Pass``. Three paths compute the same thing: the
fused ops (a GPU, and torch.compile), the ops' differentiable references (training, no cache),
and the CPU's eager path (``CPU_FAST_PATH``: plain PyTorch calls without the custom ops'
dispatch and checks).

Tensor parallelism (``Transformer(cfg, tp)``, Megatron style, ``parallel/``): a rank holds its KV
heads and the query heads that read them, its MLP columns, its vocabulary rows of the embedding
and lm_head; o_proj and down_proj end in an all-reduce (then their bias, once), so the residual
stream, every norm (Gemma's post-norms included) and the hidden states are whole and identical
on every rank. ``logits`` gathers the vocabulary, ``greedy`` merges per-rank top-1s exactly,
the cache holds the rank's KV heads; the generation loop runs unchanged on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import hf_config
from .ops import (
    embedding,
    gated_act,
    lm_head_topk,
    rms_norm,
    rope_kv_write,
    tree_attention,
    unpack_tree_mask,
)
from .ops._backend import triton_interpreted
from .ops._linear import linear, llc_bytes
from .ops.activation import ACTIVATIONS, gated_act_ref
from .ops.rms_norm import rms_norm_ref
from .ops.rotary import apply_rope_ref
from .parallel import (
    SINGLE,
    WHOLE,
    Shard,
    TPGroup,
    TPLayout,
    gather_vocab,
    lm_head_topk_parallel,
    row_parallel_linear,
    vocab_parallel_embedding,
)


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
    rope_scaling: dict | None = None  # resolved by hf_config: {"rope_type": ..., parameters}
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    hidden_act: str = "silu"
    partial_rotary_factor: float = 1.0  # Phi-3: RoPE on the first head_dim x this dims
    layer_windows: tuple[int | None, ...] | None = None  # per layer W (None: full attention)
    local_rope_theta: float | None = None  # Gemma-3: the windowed layers' own rope
    local_rope_scaling: dict | None = None
    qk_norm: bool = False  # Qwen3, Gemma-3: RMSNorm over head_dim of q and k
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), in fp32
    sandwich_norms: bool = False  # Gemma: norms after attention and MLP, before the residual
    embed_scale: float | None = None  # Gemma: embeddings x sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # Gemma: softmax scale = this ** -0.5
    attn_softcap: float | None = None  # Gemma-2: softcap * tanh(scores / softcap)
    final_softcap: float | None = None  # Gemma-2/3: the same on the logits

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be an int >= 1, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads = {self.num_heads} is not a multiple of "
                             f"num_kv_heads = {self.num_kv_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.hidden_act = {self.hidden_act!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.layer_windows is not None:
            self.layer_windows = tuple(self.layer_windows)
            if len(self.layer_windows) != self.num_layers or not all(
                    w is None or (isinstance(w, int) and w >= 1) for w in self.layer_windows):
                raise ValueError(f"ModelConfig.layer_windows must hold num_layers = "
                                 f"{self.num_layers} ints >= 1 or None, got {self.layer_windows}")

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        """From a transformers config.json dict, audited by ``hf_config.audit``: every key that
        changes the math is implemented or refused (ValueError/TypeError naming it)."""
        return cls(**hf_config.audit(cfg))

    def window(self, layer: int) -> int | None:
        return None if self.layer_windows is None else self.layer_windows[layer]

    @property
    def softmax_scale(self) -> float | None:
        """None: 1 / sqrt(head_dim)."""
        qpas = self.query_pre_attn_scalar
        return None if qpas is None else qpas**-0.5

    def rotary_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [2, R/2] float32, attention factor) of the global rope, or of the
    windowed layers' own rope (Gemma-3) when ``local``. R = rotary dims. Row 1 serves sequences
    longer than longrope's original_max_position_embeddings, row 0 the rest (equal rows for
    every other rope). Computed as transformers computes them."""
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    scaling = (cfg.local_rope_scaling if local else cfg.rope_scaling) or {}
    kind = scaling.get("rope_type", "default")
    R = cfg.rotary_dims()
    exponents = torch.arange(0, R, 2, dtype=torch.int64).float() / R
    inv_freq = 1.0 / theta**exponents
    attention = scaling.get("attention_factor", 1.0)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        pos_freqs = theta ** (torch.arange(0, R, 2).float() / R)
        orig = scaling["original_max_position_embeddings"]

        def correction_dim(rotations):
            return (R * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
        if scaling["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, R - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(R // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (1.0 / (scaling["factor"] * pos_freqs)) * (1 - extrapolation) + \
            (1.0 / pos_freqs) * extrapolation
    elif kind == "longrope":
        short, long = (1.0 / (torch.tensor(scaling[k], dtype=torch.float32) * theta**exponents)
                       for k in ("short_factor", "long_factor"))
        return torch.stack([short, long]), attention
    return torch.stack([inv_freq, inv_freq]), attention


def _differentiable(*tensors) -> bool:
    """Autograd must see through this op (training): the plain PyTorch references run, which
    have gradients; inference (no_grad, inference_mode, a compiled or graphed step) takes the
    fused ops."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# The CPU's eager path: "auto" = on CPU tensors, outside torch.compile and the Triton
# interpreter (whose tests route the ops to Triton), the layer ops run as plain PyTorch calls:
# the ops' references (the same math, without a custom op's dispatch and argument checks),
# rotary on q and k together from cos/sin tables expanded once per step, and attention through
# scaled_dot_product_attention over the used part of the cache with one mask per step.
# "on": also under the interpreter (tests); "off": the ops everywhere (the GPU's path).
CPU_FAST_PATH = "auto"
_INTERPRETED = triton_interpreted()  # set before the kernels are imported, so fixed by now


def cpu_fast(t: torch.Tensor) -> bool:
    """Whether a forward on ``t``'s device takes the CPU's eager path (``CPU_FAST_PATH``)."""
    if CPU_FAST_PATH == "off" or t.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return CPU_FAST_PATH == "on" or not _INTERPRETED


class RMSNorm(nn.Module):
    """x / rms(x) * w (Llama: w times the normed x cast back), or Gemma's ``unit_offset``:
    (normed x * (1 + w)) in fp32, then cast. ``forward(x, residual)``: the norm of
    x + residual and that sum (the new residual stream), one launch (``ops.rms_norm``)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [..., N] -> normed; with ``residual`` (may be None: the first layer's, where x
        is the stream): (normed x + residual, x + residual)."""
        if _differentiable(x, residual, self.weight):
            out, h = rms_norm_ref(x, self.weight, self.eps, residual, self.unit_offset)
        elif residual is None:
            out, h = rms_norm(x, self.weight, self.eps, unit_offset=self.unit_offset), None
        else:
            out, h = rms_norm(x, self.weight, self.eps, residual, self.unit_offset)
        return out if residual is None else (out, h)

    def add(self, x: torch.Tensor, residual: torch.Tensor | None):
        """(norm of x + residual, x + residual); residual None: (norm of x, x)."""
        return (self(x), x) if residual is None else self(x, residual)

    def fast(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The CPU's eager path of ``add``: fp32 through ``F.rms_norm`` (bit for bit the
        reference's result in fp32: tested), other dtypes through the reference."""
        h = x if residual is None else x + residual
        if h.dtype != torch.float32:
            return rms_norm_ref(h, self.weight, self.eps, None, self.unit_offset)[0], h
        w = 1.0 + self.weight.float() if self.unit_offset else self.weight
        return F.rms_norm(h, (h.shape[-1],), w, self.eps), h


class KVCache:
    """Static cache: k, v [num_layers, B, S, Hkv, D] and seqlens [B] int32 on the device.

    A full cache in every layer (slot p holds position p), windowed layers included: their
    attention only reads the window, so a rolling cache is a later memory saving. Under tensor
    parallelism Hkv is this rank's KV heads (``num_kv_heads``)."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype, device,
                 num_kv_heads: int | None = None, empty: bool = False):
        """``empty``: leave k and v unset (the caller fills every slot); else zeros."""
        heads = cfg.num_kv_heads if num_kv_heads is None else num_kv_heads
        shape = (cfg.num_layers, batch, capacity, heads, cfg.head_dim)
        alloc = torch.empty if empty else torch.zeros
        self.k = alloc(shape, dtype=dtype, device=device)
        self.v = alloc(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


def causal_attention(q, k, v, scale=None, window=None, softcap=None, mask=None) -> torch.Tensor:
    """Causal self-attention of T new tokens (no cache before them).

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; window W: token i sees tokens j > i - W; softcap:
    ``softcap * tanh(scores / softcap)`` before the mask; mask: optional extra bool mask
    [B, 1, T, T] (True = may attend). Returns [B, T, Hq, D].
    """
    T, group = q.shape[1], q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2),
                                           v.repeat_interleave(group, 2)))
    allowed = mask
    if window is not None or mask is not None or softcap is not None:
        i = torch.arange(T, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed = allowed & (i[None, :] > i[:, None] - window)
        if mask is not None:
            allowed = allowed & mask
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             is_causal=allowed is None, scale=scale)
    else:  # SDPA has no soft-capping: the plain math, in fp32
        scores = q.float() @ k.float().transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        scores = softcap * torch.tanh(scores / softcap)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = (probs @ v.float()).to(q.dtype)
    return out.transpose(1, 2)


@dataclass
class Pass:
    """What one forward (a prefill, a step) shares with every layer, computed once:
    ``rope[kind]``: (cos, sin) [B, T, R/2] float32 (attention factor applied) per rope kind;
    ``cache``/``write_pos`` [B, T]: where the layers write their roped K/V (None: no cache,
    the training forward); ``attend(attn, q)`` (cache) or ``attend(attn, q, k, v)`` (no
    cache): the attention proper, [B, T, Hq, D]."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    attend: Callable
    cache: KVCache | None = None
    write_pos: torch.Tensor | None = None
    fast: bool = False  # the CPU's eager path (``cpu_fast``)
    stream: bool | None = None  # fast path: the weights stream from memory (``ops._linear``)
    _full: dict | None = None  # fast path: per (rope kind, dtype) cos, sin [B, T, 1, R]
    _batch: torch.Tensor | None = None

    def rope_full(self, kind: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of ``kind`` repeated to R dims, in ``dtype`` [B, T, 1, R] (once per step)."""
        self._full = {} if self._full is None else self._full
        if (kind, dtype) not in self._full:
            cos, sin = (torch.cat([t, t], dim=-1).to(dtype)[:, :, None] for t in self.rope[kind])
            self._full[kind, dtype] = cos, sin
        return self._full[kind, dtype]

    starts: list[int] | None = None  # fast path: each row's first write slot (slots in a row)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fast path: k, v [B, T, Hkv, D] into the cache at ``write_pos`` (row by row as
        slices when the host knows the rows' first slots, for a few rows)."""
        if self.starts is not None:
            T = k.shape[1]
            for b, s in enumerate(self.starts):
                self.cache.k[layer, b, s:s + T] = k[b]
                self.cache.v[layer, b, s:s + T] = v[b]
            return
        if self._batch is None:
            self._batch = torch.arange(k.shape[0], device=k.device)[:, None]
        self.cache.k[layer][self._batch, self.write_pos] = k
        self.cache.v[layer][self._batch, self.write_pos] = v


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, R] in x's dtype (halves repeated, HF's rotate_half
    convention): the first R dims rotate, the rest pass (partial rotary). The CPU path's
    rotation; ``ops.rope_kv_write`` computes the same."""
    return _rotate(x, cos[:, :, None], sin[:, :, None])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos, sin [B, T, 1, R] in x's dtype (``apply_rope_ref``'s math:
    rotate_half; dims >= R pass)."""
    R = cos.shape[-1]
    rot = x[..., :R]
    x1, x2 = rot.chunk(2, dim=-1)
    out = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return out if R == x.shape[-1] else torch.cat([out, x[..., R:]], dim=-1)


class Attention(nn.Module):
    """GQA attention. Under tensor parallelism (``tp``) it holds this rank's KV heads and the
    query heads that read them: wqkv is column-parallel ([q_r | k_r | v_r] rows), wo
    row-parallel (its all-reduce completes the sum; the bias, whole, is added once after)."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg, self.layer, self.window, self.tp = cfg, layer, cfg.window(layer), tp
        local = self.window is not None and cfg.local_rope_theta is not None
        self.rope = "local" if local else "global"  # Gemma-3's windowed layers: their own rope
        self.num_heads, self.num_kv_heads = cfg.num_heads // tp.world, cfg.num_kv_heads // tp.world
        q_out, kv_out = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]: qkv, (q/k norm +) rope + cache write, attention, o."""
        B, T, _ = x.shape
        H, Hkv, cfg = self.num_heads, self.num_kv_heads, self.cfg
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, cfg.head_dim)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
        cos, sin = p.rope[self.rope]
        qn, kn = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
        if p.cache is not None:  # one launch: q/k norms, rope, k and v into the cache
            q = rope_kv_write(q, k, v, cos, sin, p.cache.k, p.cache.v, self.layer, p.write_pos,
                              qn, kn, cfg.rms_norm_eps, cfg.norm_unit_offset)  # fmt: skip
            out = p.attend(self, q)
        else:  # no cache (training): the references, which autograd sees through
            if qn is not None:
                q = rms_norm_ref(q, qn, cfg.rms_norm_eps, unit_offset=cfg.norm_unit_offset)[0]
                k = rms_norm_ref(k, kn, cfg.rms_norm_eps, unit_offset=cfg.norm_unit_offset)[0]
            q, k = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
            out = p.attend(self, q, k, v)
        return row_parallel_linear(out.reshape(B, T, H * cfg.head_dim), self.wo.weight,
                                   self.wo.bias, self.tp)  # fmt: skip


    def fast(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        """The CPU's eager path of ``forward`` (the same math as plain PyTorch calls)."""
        B, T, _ = x.shape
        H, Hkv, cfg = self.num_heads, self.num_kv_heads, self.cfg
        qkv = linear(x, self.wqkv.weight, self.wqkv.bias, p.stream)
        qkv = qkv.view(B, T, H + 2 * Hkv, cfg.head_dim)
        cos, sin = p.rope_full(self.rope, qkv.dtype)
        if self.q_norm is None:  # q and k are adjacent in qkv: rotated together
            qk = _rotate(qkv[:, :, :H + Hkv], cos, sin)
            q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q = _rotate(self.q_norm.fast(qkv[:, :, :H])[0].to(qkv.dtype), cos, sin)
            k = _rotate(self.k_norm.fast(qkv[:, :, H:H + Hkv])[0].to(qkv.dtype), cos, sin)
        p.write(self.layer, k, qkv[:, :, H + Hkv:])
        out = p.attend(self, q)
        return row_parallel_linear(out.reshape(B, T, H * cfg.head_dim), self.wo.weight,
                                   self.wo.bias, self.tp, p.stream)  # fmt: skip


class MLP(nn.Module):
    """Gated MLP; under tensor parallelism this rank's intermediate chunk: w13 column-parallel
    ([gate_r | up_r] rows), w2 row-parallel (all-reduce, then the bias once)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.act, self.tp = cfg.hidden_act, tp
        inter = cfg.intermediate_size // tp.world
        self.w13 = nn.Linear(cfg.hidden_size, 2 * inter, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)
        act = gated_act_ref if _differentiable(gate_up) else gated_act
        return row_parallel_linear(act(gate_up, self.act), self.w2.weight, self.w2.bias, self.tp)

    def fast(self, x: torch.Tensor, stream: bool | None = None) -> torch.Tensor:
        gate_up = linear(x, self.w13.weight, self.w13.bias, stream)
        return row_parallel_linear(gated_act_ref(gate_up, self.act), self.w2.weight,
                                   self.w2.bias, self.tp, stream)  # fmt: skip


class Block(nn.Module):
    """Pre-norm residual block; Gemma's post-norms act on the all-reduced (full) outputs.

    ``forward(x, residual, p) -> (out, residual)``: the residual add of the previous block's
    ``out`` is fused into this block's first norm (the last block's into the final norm), so
    a layer is nine launches (eleven with Gemma's sandwich norms)."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup = SINGLE):
        super().__init__()
        d, eps, offset = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset
        self.attention_norm = RMSNorm(d, eps, offset)
        self.attention = Attention(cfg, layer, tp)
        self.ffn_norm = RMSNorm(d, eps, offset)
        self.mlp = MLP(cfg, tp)
        self.post_attention_norm = RMSNorm(d, eps, offset) if cfg.sandwich_norms else None
        self.post_ffn_norm = RMSNorm(d, eps, offset) if cfg.sandwich_norms else None

    def forward(self, x, residual, p: Pass):
        """x: the previous block's output (the embedding for the first, with residual None);
        residual: the stream before it. Returns this block's output and the stream."""
        if p.fast:
            return self.fast(x, residual, p)
        h, residual = self.attention_norm.add(x, residual)  # (add +) norm
        h = self.attention(h, p)  # qkv, rope + cache write, attention, o
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        h, residual = self.ffn_norm(h, residual)  # add + norm
        h = self.mlp(h)  # gate_up, act, down
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return h, residual


    def fast(self, x, residual, p: Pass):
        """The CPU's eager path of ``forward``: the same layer as plain PyTorch calls."""
        h, residual = self.attention_norm.fast(x, residual)
        h = self.attention.fast(h, p)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm.fast(h)[0]
        h, residual = self.ffn_norm.fast(h, residual)
        h = self.mlp.fast(h, p.stream)
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm.fast(h)[0]
        return h, residual


class Transformer(nn.Module):
    """The decoder, whole (``tp`` = ``SINGLE``) or this rank's part of a tensor-parallel one:
    ``layout`` (a ``parallel.TPLayout``, None for one process) says which heads, MLP columns
    and vocabulary rows it holds; ``cfg`` always describes the whole model. Every method
    returns what one process would (hidden states, full logits, greedy ids), identical on every
    rank, so the generation loop runs unchanged on each."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg, self.tp, self.layout = cfg, tp, None
        vocab_rows = cfg.vocab_size
        if tp.world > 1:  # ValueErrors naming the config.json key that does not divide
            self.layout = TPLayout(tp.world, tp.rank, cfg.num_heads, cfg.num_kv_heads,
                                   cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
            vocab_rows = self.layout.local_vocab_size
        self.embed = nn.Embedding(vocab_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_rows, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self._rope_tables()
        self._stream: bool | None = None  # ``weights_stream``
        self._col_major = False  # ``_cpu_layout``

    def _rope_tables(self, device=None):
        """Buffers of every rope kind side by side (one cos/sin table per forward): inv_freq
        [2, kinds x R/2] (longrope's short and long rows; equal rows elsewhere), rope_scale
        [kinds x R/2] (attention factors), and the embedding scale per dtype."""
        cfg = self.cfg
        self.rope_kinds = ("global", "local") if cfg.local_rope_theta is not None else ("global",)
        tables, scales, longs = [], [], set()
        for kind in self.rope_kinds:
            inv_freq, scale = rope_inv_freq(cfg, local=kind == "local")
            tables.append(inv_freq)
            scales.append(float(scale))
            scaling = (cfg.rope_scaling if kind == "global" else cfg.local_rope_scaling) or {}
            if scaling.get("rope_type") == "longrope":
                longs.add(scaling["original_max_position_embeddings"])
        if len(longs) > 1:
            raise ValueError(f"two longrope ropes with different original_max_position_embeddings "
                             f"{sorted(longs)} are not supported")
        self.rope_long = longs.pop() if longs else None  # longrope's switch length
        self.rope_scaled = any(s != 1.0 for s in scales)
        scale = torch.cat([torch.full((t.shape[1],), s)
                           for t, s in zip(tables, scales, strict=True)])
        for name, t in (("inv_freq", torch.cat(tables, 1)), ("rope_scale", scale)):
            self.register_buffer(name, t if device is None else t.to(device), persistent=False)
        self._rope_table = None  # rope_rows' cos | sin by position
        self._embed_scales = {}
        if cfg.embed_scale is not None:  # the scale rounded to the weights' dtype, as a float
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                rounded = torch.tensor(cfg.embed_scale, device="cpu").to(dtype)
                self._embed_scales[dtype] = float(rounded)

    def _cpu_layout(self, fast: bool) -> None:
        """The weight layout of the CPU's eager path for weights that fit in the CPU's cache
        (``weights_stream`` False; the demo's): the fp32 CPU matrices with at least as many
        rows as columns (q|k|v, o, gate|up, the lm_head, tied or not; not the down projection)
        stored column-major (``w.t()`` contiguous, same shape and values) while the fast path
        runs, row-major again before any other forward. From the cache, MKL's one-token
        ``x @ w.t()`` is faster on the column-major weight (the demo's plain step: 1.60 against
        1.92 ms, paired runs in one process). Weights that stream from memory stay row-major:
        ``ops._linear`` reads them faster that way, at one token and at a tree's few. The sums
        are the same products added in another order (fp32 rounding). Switched lazily by
        ``_run``: once per change of path, in place (each matrix copied once); the custom ops
        (the embedding's contiguous rows) get the row-major one."""
        if fast == self._col_major:
            return
        if fast and any(p.is_inference() for p in self._col_major_params()):
            return  # made under torch.inference_mode: stays as it is (only a speed-up)
        with torch.inference_mode(False), torch.no_grad():
            seen = set()
            for p in self._col_major_params():
                if id(p) in seen:  # tied lm_head: the embedding's parameter
                    continue
                seen.add(id(p))
                p.data = p.data.t().contiguous().t() if fast else p.data.contiguous()
        self._col_major = fast

    def _col_major_params(self) -> list[nn.Parameter]:
        params = [self.lm_head.weight]
        for layer in self.layers:
            params += [layer.attention.wqkv.weight, layer.attention.wo.weight,
                       layer.mlp.w13.weight]
        return [p for p in params if p.device.type == "cpu" and p.dtype == torch.float32
                and p.dim() == 2 and p.shape[0] >= p.shape[1]]

    def weights_stream(self) -> bool:
        """Whether a step reads the layers' weights from memory rather than the CPU's cache:
        their bytes over the last-level cache (``ops._linear``: the call that reads them
        fastest depends on it)."""
        if self._stream is None:
            size = sum(p.numel() * p.element_size() for p in self.layers.parameters())
            self._stream = size > llc_bytes()
        return self._stream

    def _apply(self, fn, recurse=True):
        if getattr(self, "_col_major", False):  # moved or cast row-major (``_cpu_layout``)
            self._cpu_layout(False)
        self._stream = None
        super()._apply(fn, recurse)  # .to(dtype) must not round the RoPE frequencies
        self._rope_tables(self.inv_freq.device)
        return self

    def new_cache(self, batch: int, capacity: int, empty: bool = False) -> KVCache:
        """A cache for this rank's KV heads (all of them for one process); zeroed, or with
        ``empty`` unset (the caller fills every slot)."""
        p = self.lm_head.weight
        if p.device.type != "meta":
            self.rope_rows(capacity)
        return KVCache(self.cfg, batch, capacity, p.dtype, p.device,
                       self.cfg.num_kv_heads // self.tp.world, empty=empty)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.embed.weight
        scale = None if self.cfg.embed_scale is None else self._embed_scales[w.dtype]
        if self.tp.world > 1:  # this rank's rows, zeros elsewhere, all-reduced
            x = vocab_parallel_embedding(tokens, w, self.tp, self.cfg.vocab_size)
            return x if scale is None else x * scale
        if _differentiable(w) or cpu_fast(w) or w.stride(-1) != 1:  # column-major under
            x = F.embedding(tokens, w)  # torch.compile after the CPU path: ``_cpu_layout``
            return x if scale is None else x * scale
        return embedding(tokens, w, scale)  # one launch, Gemma's scale (rounded) included

    def rope(self, positions: torch.Tensor, seq_len: torch.Tensor | None = None) -> dict:
        """{kind: (cos, sin)} [B, T, R/2] float32 (attention factor applied) per rope kind
        ("global", "local") for positions [B, T] int, all kinds in one table (3 launches, 4
        with an attention factor, 2 more for longrope). Longrope takes its long factors for a
        sequence whose length in this forward, ``seq_len`` [B], exceeds
        original_max_position_embeddings (transformers, per forward); without ``seq_len``, per
        token: position >= it (the same for every sequence ``_check_rope_reach`` admits)."""
        table = self.inv_freq
        if self.rope_long is None:
            inv_freq = table[0]
        else:
            long = positions >= self.rope_long if seq_len is None else \
                (seq_len > self.rope_long)[:, None]
            inv_freq = torch.where(long[..., None], table[1], table[0])
        angles = positions[..., None] * inv_freq  # [B, T, kinds x R/2] float32
        cs = angles.new_empty((2, *angles.shape))
        torch.cos(angles, out=cs[0])
        torch.sin(angles, out=cs[1])
        if self.rope_scaled:
            cs.mul_(self.rope_scale)
        return self._rope_split(cs[0], cs[1])

    def _rope_split(self, cos: torch.Tensor, sin: torch.Tensor) -> dict:
        """{kind: (cos, sin)}: column slices [..., R/2] of tables [..., kinds x R/2]."""
        half = self.inv_freq.shape[1] // len(self.rope_kinds)
        return {kind: (cos[..., i * half:(i + 1) * half], sin[..., i * half:(i + 1) * half])
                for i, kind in enumerate(self.rope_kinds)}

    def rope_rows(self, capacity: int) -> torch.Tensor:
        """cos | sin of positions [0, capacity) [capacity, 2 x kinds x R/2] float32 (built once
        per capacity and device, here or by ``new_cache``): a step gathers its rows in one
        launch. Longrope's rows take the long factors from original_max_position_embeddings on
        (``rope``'s per-token rule)."""
        table = self._rope_table
        device = self.inv_freq.device
        if table is None or table.shape[0] < capacity or table.device != device:
            positions = torch.arange(capacity, device=device)[None]
            cos, sin = zip(*self.rope(positions).values(), strict=True)
            table = torch.cat([*cos, *sin], dim=-1)[0].contiguous()
            self._rope_table = table
        return table

    def _run(self, tokens: torch.Tensor, p: Pass) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self._cpu_layout(p.fast and not self.weights_stream())
        x, residual = self.embed_tokens(tokens), None
        for layer in self.layers:
            x, residual = layer(x, residual, p)
        if p.fast:
            return self.norm.fast(x, residual)[0]
        return self.norm(x, residual)[0]  # the last residual add fused into the final norm

    def _check_rope_reach(self, lengths: torch.Tensor, capacity: int, P: int) -> None:
        """Refuse what would differ from transformers: dynamic NTK beyond
        max_position_embeddings, and a longrope sequence that starts within
        original_max_position_embeddings but may outgrow it in this cache (transformers then
        recomputes every earlier position with the long factors)."""
        for key in ("rope_scaling", "local_rope_scaling"):
            scaling = getattr(self.cfg, key) or {}
            kind = scaling.get("rope_type")
            if kind == "dynamic" and capacity > scaling["max_position_embeddings"]:
                raise ValueError(
                    f"rope_type 'dynamic' changes the frequencies beyond max_position_embeddings "
                    f"= {scaling['max_position_embeddings']}, which this decoder does not do: the "
                    f"cache needs {capacity} positions")
            if kind == "longrope" and capacity > scaling["original_max_position_embeddings"]:
                orig = scaling["original_max_position_embeddings"]
                reach = lengths.long() + capacity - P  # above any position the cache can hold
                bad = (lengths.long() <= orig) & (reach > orig)
                if bool(bad.any()):
                    n = int(lengths[bad.nonzero()[0, 0]])
                    raise ValueError(
                        f"rope_type 'longrope': a prompt of {n} tokens (<= "
                        f"original_max_position_embeddings = {orig}) may grow past it in this "
                        f"cache ({capacity} positions); transformers then recomputes every "
                        f"position with the long factors, which this decoder does not: keep "
                        f"prompt + new tokens within {orig}, or start from a longer prompt")

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: KVCache):
        """tokens [B, P] right-padded, lengths [B] int: returns hidden [B, P, d]."""
        B, P = tokens.shape
        self._check_rope_reach(lengths, cache.capacity, P)
        positions = torch.arange(P, device=tokens.device).expand(B, P)

        def attend(attn, q):  # the prompt's roped K/V, as the layer just wrote them
            k, v = cache.k[attn.layer, :, :P], cache.v[attn.layer, :, :P]
            return causal_attention(q, k, v, self.cfg.softmax_scale, attn.window,
                                    self.cfg.attn_softcap)

        p = Pass(self.rope(positions, lengths), attend, cache, positions, cpu_fast(tokens))
        hidden = self._run(tokens, p)
        cache.seqlens.copy_(lengths)
        return hidden

    def step(self, tokens, cache: KVCache, tree_mask, depths) -> torch.Tensor:
        """tokens [B, T] at positions seqlens + depths [T]; KV written at seqlens + arange(T).
        ``depths`` may also be [2, T]: the depths over the write offsets arange(T)
        (``TreeBuffers.offsets``), so one add gives positions and slots."""
        B, T = tokens.shape
        start = cache.seqlens[:, None]
        offsets = depths if depths.dim() == 2 else None
        depths = depths[0] if offsets is not None else depths
        if T == 1:  # a one-node tree (plain decoding): depth 0, nothing to add
            positions = write_pos = start
        elif offsets is not None:
            positions, write_pos = start[None] + offsets[:, None]  # [2, B, T]
        else:
            positions = start + depths
            write_pos = start + torch.arange(T, device=tokens.device)
        cs = self.rope_rows(cache.capacity)[positions]  # [B, T, 2 x kinds x R/2]
        rope = self._rope_split(*cs.chunk(2, dim=-1))
        if cpu_fast(tokens):
            attend = self._cpu_attend(cache, tree_mask, depths, T)
            p = Pass(rope, attend, cache, write_pos, fast=True, stream=self.weights_stream())
            if B <= 4:  # slots seqlens + [0, T) of each row: slice copies
                p.starts = cache.seqlens.tolist()
            return self._run(tokens, p)

        def attend(attn, q):
            return tree_attention(
                q, cache.k[attn.layer], cache.v[attn.layer], cache.seqlens, tree_mask,
                self.cfg.softmax_scale, sliding_window=attn.window,
                softcap=self.cfg.attn_softcap, tree_depths=None if attn.window is None else depths,
            )  # fmt: skip

        return self._run(tokens, Pass(rope, attend, cache, write_pos))

    def _cpu_attend(self, cache: KVCache, tree_mask, depths, T: int) -> Callable:
        """The fast path's tree attention (``tree_attention``'s rule): SDPA over the cache's
        slots [0, max(seqlens) + T) (the lengths read on the host: a CPU has nothing to sync),
        under a visibility mask built once per window (none for one sequence decoding one
        token). Soft-capped scores (Gemma-2) go to ``tree_attention``."""
        used = int(cache.seqlens.max()) + T
        lengths = cache.seqlens.to(torch.long)[:, None]  # [B, 1]
        if tree_mask.dtype != torch.bool:
            tree_mask = unpack_tree_mask(tree_mask, T)
        B, masks = lengths.shape[0], {}

        def mask(window):
            if window not in masks:
                if B == 1 and T == 1 and window is None:
                    masks[window] = None
                else:
                    slot = torch.arange(used)[None]  # [1, S]
                    rel = slot - lengths  # [B, S]
                    node = rel.clamp(0, T - 1)
                    visible = (rel < 0)[:, None] | (((rel >= 0) & (rel < T))[:, None]
                                                    & tree_mask[:, node].permute(1, 0, 2))
                    if window is not None:  # query t at L + depth[t] sees keys > it - W
                        key_pos = torch.where(rel >= 0, lengths + depths[node], slot)
                        query_pos = lengths + depths[None]  # [B, T]
                        visible &= key_pos[:, None] > query_pos[..., None] - window
                    masks[window] = visible[:, None]  # [B, 1, T, S]
            return masks[window]

        def attend(attn, q):
            if self.cfg.attn_softcap is not None:
                return tree_attention(
                    q, cache.k[attn.layer], cache.v[attn.layer], cache.seqlens, tree_mask,
                    self.cfg.softmax_scale, sliding_window=attn.window,
                    softcap=self.cfg.attn_softcap, tree_depths=depths,
                )  # fmt: skip
            k, v = cache.k[attn.layer, :, :used], cache.v[attn.layer, :, :used]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask(attn.window), scale=self.cfg.softmax_scale, enable_gqa=True)
            return out.transpose(1, 2)

        return attend

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits [..., V] (soft-capped where the config says so); under
        tensor parallelism each rank computes its vocabulary rows and gathers the rest."""
        logits = linear(hidden, self.lm_head.weight)
        cap = self.cfg.final_softcap
        logits = logits if cap is None else cap * torch.tanh(logits / cap)
        return gather_vocab(logits, self.tp, self.cfg.vocab_size) if self.tp.world > 1 else logits

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax of ``logits(hidden)`` [..., d] -> [...] int64 (ties: lower id; after the final
        soft-cap where the family has one), without writing the logits (``lm_head_topk`` with
        k = 1: fused on the GPU). Under tensor
        parallelism each rank's top-1 of its rows, merged exactly (``parallel.merge_topk``)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        cap, tp, V = self.cfg.final_softcap, self.tp, self.cfg.vocab_size
        if tp.world > 1:
            ids = lm_head_topk_parallel(flat, self.lm_head.weight, 1, tp, V, softcap=cap)[1]
        else:
            ids = lm_head_topk(flat, self.lm_head.weight, 1, softcap=cap)[1]
        return ids.view(hidden.shape[:-1])

    # ------------------------------------------------------------ transformers' tensor names

    def hf_layout(self) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
        """Each parameter's name -> the transformers tensors it stacks (rows, in order), each
        with its shape in the checkpoint (the whole model's, under tensor parallelism too):
        ``[q | k | v]`` from q/k/v_proj (Phi-3: its fused qkv_proj), ``[gate | up]`` from
        gate/up_proj (Phi-3: gate_up_proj)."""
        cfg = self.cfg
        if self.tp.world > 1:  # the names and full shapes are the whole model's
            with torch.device("meta"):
                return Transformer(cfg).hf_layout()
        fused = cfg.model_type == "phi3"
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        names = {"embed.weight": ["model.embed_tokens.weight"],
                 "norm.weight": ["model.norm.weight"]}
        if not cfg.tie_word_embeddings:
            names["lm_head.weight"] = ["lm_head.weight"]
        splits = {}
        for i in range(cfg.num_layers):
            hf, me = f"model.layers.{i}.", f"layers.{i}."
            attn, mlp = hf + "self_attn.", hf + "mlp."
            for kind in ("weight", "bias"):
                qkv, w13 = me + f"attention.wqkv.{kind}", me + f"mlp.w13.{kind}"
                if fused:
                    names[qkv] = [attn + f"qkv_proj.{kind}"]
                    names[w13] = [mlp + f"gate_up_proj.{kind}"]
                else:
                    names[qkv] = [attn + f"{p}_proj.{kind}" for p in "qkv"]
                    splits[qkv] = [q_out, kv_out, kv_out]
                    names[w13] = [mlp + f"{p}_proj.{kind}" for p in ("gate", "up")]
                names[me + f"attention.wo.{kind}"] = [attn + f"o_proj.{kind}"]
                names[me + f"mlp.w2.{kind}"] = [mlp + f"down_proj.{kind}"]
            for norm in ("q_norm", "k_norm"):
                names[me + f"attention.{norm}.weight"] = [attn + f"{norm}.weight"]
            names[me + "attention_norm.weight"] = [hf + "input_layernorm.weight"]
            if cfg.sandwich_norms:  # Gemma's post_attention_layernorm follows attention
                names[me + "post_attention_norm.weight"] = [hf + "post_attention_layernorm.weight"]
                names[me + "ffn_norm.weight"] = [hf + "pre_feedforward_layernorm.weight"]
                names[me + "post_ffn_norm.weight"] = [hf + "post_feedforward_layernorm.weight"]
            else:
                names[me + "ffn_norm.weight"] = [hf + "post_attention_layernorm.weight"]
        layout = {}
        for name, param in self.named_parameters():
            parts = names[name]
            rows = splits.get(name) or [param.shape[0] // len(parts)] * len(parts)
            layout[name] = [(n, (r, *param.shape[1:])) for n, r in zip(parts, rows, strict=True)]
        return layout

    def hf_slots(self) -> dict[str, tuple[str, int, Shard, tuple[int, ...]]]:
        """transformers tensor name -> (parameter name, its first row in the parameter, the
        ``Shard`` of it this rank holds (``WHOLE`` for one process), its checkpoint shape)."""
        slots = {}
        for name, parts in self.hf_layout().items():
            row = 0
            for hf_name, shape in parts:
                shard = WHOLE if self.layout is None else self.layout.shard(hf_name, shape)
                slots[hf_name] = (name, row, shard, shape)
                row += shard.local_shape(shape)[0]
        return slots

    def load_hf_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (transformers name, this rank's part of it) pairs into the parameters, one at
        a time (a stream from ``parallel.iter_shards`` keeps one tensor in flight); names
        outside ``hf_layout`` are skipped. Every expected tensor must come, in this rank's
        shape: else a ValueError naming it."""
        slots, params = self.hf_slots(), dict(self.named_parameters())
        missing = set(slots)
        with torch.no_grad():
            for hf_name, tensor in tensors:
                if hf_name not in slots:
                    continue
                name, row, shard, shape = slots[hf_name]
                local = shard.local_shape(shape)
                if tuple(tensor.shape) != local:
                    what = "config.json implies" if shard.replicated else \
                        f"rank {self.tp.rank} of {self.tp.world} holds"
                    raise ValueError(f"tensor {hf_name} has shape {list(tensor.shape)}, {what} "
                                     f"{list(local)}")
                params[name][row: row + local[0]].copy_(tensor)
                missing.discard(hf_name)
        if missing:
            hf_name = sorted(missing)[0]
            raise ValueError(f"checkpoint has no tensor {hf_name} (expected shape "
                             f"{list(slots[hf_name][3])}); {len(missing)} missing")

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy whole weights named as in transformers (``hf_layout``) into the parameters
        (under tensor parallelism, this rank's slices of them); a missing tensor or a wrong
        shape raises a ValueError naming it (checkpoint.py checks files)."""
        slots = self.hf_slots()
        for hf_name, (_, _, _, shape) in slots.items():
            if hf_name not in state:
                raise ValueError(f"checkpoint has no tensor {hf_name} (expected shape "
                                 f"{list(shape)})")
            if tuple(state[hf_name].shape) != shape:
                raise ValueError(f"tensor {hf_name} has shape {list(state[hf_name].shape)}, "
                                 f"config.json implies {list(shape)}")
        self.load_hf_tensors((n, slots[n][2].take(state[n])) for n in slots)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights named as in transformers (the inverse of ``load_hf_state_dict``); one
        process's model only (a tensor-parallel rank holds slices: a ValueError)."""
        if self.tp.world > 1:
            raise ValueError(f"hf_state_dict: this model is rank {self.tp.rank} of a "
                             f"{self.tp.world}-way tensor-parallel one and holds only its "
                             "slices; save from a model loaded in one process")
        out, layout = {}, self.hf_layout()
        for name, param in self.named_parameters():
            parts = param.split([shape[0] for _, shape in layout[name]])
            out.update({hf: part for (hf, _), part in zip(layout[name], parts, strict=True)})
        return {k: v.detach().contiguous() for k, v in out.items()}
