"""Rotary embedding of q and k plus the KV-cache write, in one launch.

For token (b, t), head h, with c = cos[b, t], s = sin[b, t] rounded to x's dtype (transformers'
``apply_rotary_pos_emb``, rotate_half convention) and i < R/2::

    out[i]       = x[i] * c[i] - x[i + R/2] * s[i]
    out[i + R/2] = x[i + R/2] * c[i] + x[i] * s[i]            (dims >= R pass: partial rotary)

optionally after an RMSNorm of each head's x over D (Qwen3, Gemma-3's q/k norms: the rounding of
``rms_norm``, the normed head in x's dtype). The rotated q is returned; the rotated k and the v
of token (b, t) are written to ``k_cache[layer, b, write_pos[b, t]]`` and
``v_cache[layer, b, write_pos[b, t]]``.

Shapes: B batch, T new tokens, Hq/Hkv query/KV heads, D head dim, R rotary dims (even, <= D),
NL layers, S cache capacity. q [B, T, Hq, D], k, v [B, T, Hkv, D] (last dim contiguous, other
strides free: views into the fused q|k|v projection output [B, T, (Hq + 2 Hkv) D]); cos, sin
[B, T, R/2] float32 (the rope's attention factor already applied); caches [NL, B, S, Hkv, D];
write_pos [B, T] int (any strides). The whole cache and ``layer`` are passed (not a
``k_cache[layer]`` view) so torch.compile sees the mutation of a graph input and does it in
place.

Triton kernel: grid (B * T, q head blocks + KV head blocks); a program rotates BLOCK_H heads
(about 512 elements), loading each head row twice (x and its rotate_half partner, the partner
normed with the same rstd). fp32 arithmetic, rounded where the reference rounds (normed head,
cos/sin), the rope itself rounded once. A slot outside [0, S) is skipped on the device (never
written out of bounds); the launcher rejects it for CPU tensors.
"""

from __future__ import annotations

import torch

from ._backend import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INDEX_DTYPES,
    check_dim,
    check_real,
    check_tensor,
    check_values,
)
from .rms_norm import pick_impl, rms_norm_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [B, T, R/2] float32: transformers' rotation in x's dtype (cos
    and sin repeated to R and cast to x's dtype first); dims >= R pass unrotated."""
    return _rotate(x, *_tables(cos, sin, x.dtype))


def _tables(cos, sin, dtype):
    """cos, sin [B, T, R/2] -> [B, T, 1, R] in ``dtype`` (halves repeated), as transformers'."""
    return (torch.cat([cos, cos], dim=-1).to(dtype)[:, :, None],
            torch.cat([sin, sin], dim=-1).to(dtype)[:, :, None])  # fmt: skip


def _rotate(x, c, s):
    R = c.shape[-1]
    rot = x[..., :R]
    x1, x2 = rot.chunk(2, dim=-1)
    out = rot * c + torch.cat([-x2, x1], dim=-1) * s
    return out if R == x.shape[-1] else torch.cat([out, x[..., R:]], dim=-1)


def _check_slots(write_pos: torch.Tensor, S: int) -> None:
    if write_pos.numel() == 0:
        return
    lo, hi = torch.aminmax(write_pos)
    if int(lo) < 0 or int(hi) >= S:
        raise ValueError(
            f"write_pos must lie in [0, S = {S}) (the cache capacity), got values in "
            f"[{int(lo)}, {int(hi)}]"
        )


def rope_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    write_pos: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    unit_offset: bool = False,
) -> torch.Tensor:
    """Plain PyTorch (the ground truth and the ``torch`` backend): the decoder's q/k norm,
    ``apply_rope`` and ``index_put_`` cache write op for op. Returns the rotated q [B, T, Hq, D]
    (contiguous). On a CPU an out-of-range slot raises; elsewhere it is skipped."""
    if q_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps, unit_offset=unit_offset)[0].to(q.dtype)
    if k_norm_weight is not None:
        k = rms_norm_ref(k, k_norm_weight, eps, unit_offset=unit_offset)[0].to(k.dtype)
    c, s = _tables(cos, sin, q.dtype)
    q, k = _rotate(q, c, s), _rotate(k, c, s)
    write_slots_ref(k_cache[layer], v_cache[layer], k, v, write_pos,
                    checked=write_pos.device.type == "cpu")  # fmt: skip
    return q.contiguous()


def write_slots_ref(k_layer, v_layer, k, v, write_pos, checked: bool) -> None:
    """``k_layer[b, write_pos[b, t]] = k[b, t]`` (and v) for caches [B, S, Hkv, D]. ``checked``:
    an out-of-range slot raises (a host read); else it is skipped without one (its clamped slot
    is written back unchanged: a valid token writing the same clamped slot races with it)."""
    S = k_layer.shape[1]
    batch = torch.arange(write_pos.shape[0], device=write_pos.device)[:, None]
    if checked:
        _check_slots(write_pos, S)
        k_layer[batch, write_pos], v_layer[batch, write_pos] = k, v
        return
    ok = ((write_pos >= 0) & (write_pos < S))[:, :, None, None]
    pos = write_pos.clamp(0, S - 1)
    k_layer[batch, pos] = torch.where(ok, k, k_layer[batch, pos])
    v_layer[batch, pos] = torch.where(ok, v, v_layer[batch, pos])


def check_rope_kv_write_args(
    q, k, v, cos, sin, k_cache, v_cache, layer, write_pos, q_norm_weight=None,
    k_norm_weight=None, eps=1e-6, unit_offset=False, slots=True,
) -> None:  # fmt: skip
    """Validate shapes, dtypes, devices, strides and ``layer``; with ``slots``, where
    ``check_values`` (CPU tensors, or CUDA with MEDUSA_KERNELS_CHECKS=1), the write positions."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, T, Hq, D = q.shape
    if Hq == 0 or D == 0:
        raise ValueError(f"q {tuple(q.shape)} = [B, T, Hq, D] needs Hq >= 1 heads of D >= 1")
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    Hkv = k.shape[2]
    if tuple(k.shape) != (B, T, Hkv, D) or Hkv == 0:
        raise ValueError(
            f"k must be [B, T, Hkv, D] = [{B}, {T}, Hkv >= 1, {D}] like q, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and D > 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=3, dtypes=(torch.float32,), device=q.device)
        check_dim(name, t, 0, B, "batch B of q")
        check_dim(name, t, 1, T, "tokens T of q")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    half = cos.shape[-1]
    if half == 0 or 2 * half > D:
        raise ValueError(
            f"cos, sin must be [B, T, R/2] with 2 <= R <= D = {D} rotary dims, got last dim "
            f"{half}"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, ndim=5, dtypes=(q.dtype,), device=q.device)
        if tuple(t.shape[1:2]) + tuple(t.shape[3:]) != (B, Hkv, D):
            raise ValueError(
                f"{name} must be [NL, B, S, Hkv, D] = [NL, {B}, S, {Hkv}, {D}], got "
                f"{tuple(t.shape)}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    NL, S = k_cache.shape[0], k_cache.shape[2]
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < NL:
        raise ValueError(f"layer must be an int in [0, NL = {NL}), got {layer!r}")
    check_tensor("write_pos", write_pos, ndim=2, dtypes=INDEX_DTYPES, device=q.device)
    if tuple(write_pos.shape) != (B, T):
        raise ValueError(f"write_pos must be [B, T] = [{B}, {T}], got {tuple(write_pos.shape)}")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            check_tensor(name, w, ndim=1, dtypes=FLOAT_DTYPES, device=q.device)
            check_dim(name, w, 0, D, "head dim D of q")
    check_real("eps", eps)
    if not isinstance(unit_offset, bool):
        raise TypeError(f"unit_offset must be a bool, got {type(unit_offset).__name__}")
    if slots and check_values(q.device):
        _check_slots(write_pos, S)


if HAS_TRITON:

    @triton.jit
    def _norm_rope(
        p_x, o_d, o_p, m_x, W_ptr, b_c, b_s, eps,
        HEAD_DIM: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
        UNIT_OFFSET: tl.constexpr,
    ):  # fmt: skip
        """Rows p_x [BLOCK_H, 1] + o_d: normed (QK_NORM) then rotated, fp32, not yet rounded."""
        dtype = p_x.dtype.element_ty
        b_x = tl.load(p_x + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)
        b_xp = tl.load(p_x + o_p[None, :], mask=m_x, other=0.0).to(tl.float32)
        if QK_NORM:
            rstd = tl.math.rsqrt(tl.sum(b_x * b_x, 1) / HEAD_DIM + eps)[:, None]
            m_d = o_d < HEAD_DIM
            b_w = tl.load(W_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
            b_wp = tl.load(W_ptr + o_p, mask=m_d, other=0.0).to(tl.float32)[None, :]
            if UNIT_OFFSET:
                b_x = (b_x * rstd * (1.0 + b_w)).to(dtype).to(tl.float32)
                b_xp = (b_xp * rstd * (1.0 + b_wp)).to(dtype).to(tl.float32)
            else:
                b_x = ((b_x * rstd).to(dtype).to(tl.float32) * b_w).to(dtype).to(tl.float32)
                b_xp = ((b_xp * rstd).to(dtype).to(tl.float32) * b_wp).to(dtype).to(tl.float32)
        rotated = (o_d < 2 * HALF)[None, :]
        sign = tl.where(o_d < HALF, -1.0, 1.0)[None, :]
        return tl.where(rotated, b_x * b_c + sign * b_xp * b_s, b_x)

    @triton.jit
    def _rope_kv_write_kernel(
        Q_ptr, K_ptr, V_ptr, COS_ptr, SIN_ptr, KC_ptr, VC_ptr, POS_ptr, QW_ptr, KW_ptr, QO_ptr,
        T, Hq, Hkv, S, layer_off, eps,
        q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,
        cos_sb, cos_st, sin_sb, sin_st, pos_sb, pos_st, c_sb, c_ss, c_sh,
        HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_H: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
        UNIT_OFFSET: tl.constexpr,
    ):  # fmt: skip
        """Program (token b * T + t, head block j): q heads for j < cdiv(Hq, BLOCK_H), else
        KV heads (rotated k and v to the cache slot write_pos[b, t], skipped out of range).
        ``layer_off``: layer * the caches' layer stride, from the host (an i64 past 2**31)."""
        i_bt = tl.program_id(0)
        i_hb = tl.program_id(1)
        i_b = (i_bt // T).to(tl.int64)
        i_t = (i_bt % T).to(tl.int64)
        dtype = Q_ptr.dtype.element_ty
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < HEAD_DIM
        m_r = o_d < 2 * HALF
        o_p = tl.where(o_d < HALF, o_d + HALF, tl.where(m_r, o_d - HALF, o_d))  # partner dim
        o_c = tl.where(m_r, o_d % HALF, 0)
        b_c = tl.load(COS_ptr + i_b * cos_sb + i_t * cos_st + o_c, mask=m_r, other=1.0)
        b_s = tl.load(SIN_ptr + i_b * sin_sb + i_t * sin_st + o_c, mask=m_r, other=0.0)
        b_c = b_c.to(dtype).to(tl.float32)[None, :]
        b_s = b_s.to(dtype).to(tl.float32)[None, :]
        n_qb = tl.cdiv(Hq, BLOCK_H)
        if i_hb < n_qb:
            o_h = i_hb * BLOCK_H + tl.arange(0, BLOCK_H)
            m_x = (o_h < Hq)[:, None] & m_d[None, :]
            p_q = Q_ptr + i_b * q_sb + i_t * q_st + o_h.to(tl.int64)[:, None] * q_sh
            b_y = _norm_rope(p_q, o_d, o_p, m_x, QW_ptr, b_c, b_s, eps, HEAD_DIM, HALF, Q_NORM,
                             UNIT_OFFSET)  # fmt: skip
            p_o = QO_ptr + ((i_b * T + i_t) * Hq + o_h[:, None]) * HEAD_DIM + o_d[None, :]
            tl.store(p_o, b_y.to(dtype), mask=m_x)
        else:
            o_h = (i_hb - n_qb) * BLOCK_H + tl.arange(0, BLOCK_H)
            slot = tl.load(POS_ptr + i_b * pos_sb + i_t * pos_st).to(tl.int64)
            slot = slot + tl.zeros([BLOCK_H], dtype=tl.int64)
            m_w = ((o_h < Hkv) & (slot >= 0) & (slot < S))[:, None] & m_d[None, :]
            slot = tl.minimum(tl.maximum(slot, 0), S - 1)  # addresses stay inside even if masked
            m_x = (o_h < Hkv)[:, None] & m_d[None, :]
            p_k = K_ptr + i_b * k_sb + i_t * k_st + o_h.to(tl.int64)[:, None] * k_sh
            b_y = _norm_rope(p_k, o_d, o_p, m_x, KW_ptr, b_c, b_s, eps, HEAD_DIM, HALF, K_NORM,
                             UNIT_OFFSET)  # fmt: skip
            o_kv = layer_off + i_b * c_sb + (slot * c_ss + o_h.to(tl.int64) * c_sh)[:, None]
            tl.store(KC_ptr + o_kv + o_d[None, :], b_y.to(dtype), mask=m_w)
            p_v = V_ptr + i_b * v_sb + i_t * v_st + o_h.to(tl.int64)[:, None] * v_sh
            b_v = tl.load(p_v + o_d[None, :], mask=m_w, other=0.0)
            tl.store(VC_ptr + o_kv + o_d[None, :], b_v, mask=m_w)


def rope_kv_write_triton(
    q, k, v, cos, sin, k_cache, v_cache, layer, write_pos, q_norm_weight=None,
    k_norm_weight=None, eps=1e-6, unit_offset=False,
) -> torch.Tensor:  # fmt: skip
    """Launcher (arguments as ``rope_kv_write``, already checked): one launch for q, k and v.
    Returns the rotated q, a new contiguous [B, T, Hq, D]; no host sync."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"rope_kv_write: the triton backend supports q dtypes "
            f"{[str(d) for d in TRITON_DTYPES]}, got {q.dtype} (use backend='torch')"
        )
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and w.dtype not in TRITON_DTYPES:
            raise ValueError(f"rope_kv_write: the triton backend does not take {name} in "
                             f"{w.dtype} (use backend='torch')")  # fmt: skip
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0 or T == 0:
        return out
    block_d = triton.next_power_of_2(D)
    block_h = min(max(1, 512 // block_d), triton.next_power_of_2(max(Hq, Hkv)))
    grid = (B * T, triton.cdiv(Hq, block_h) + triton.cdiv(Hkv, block_h))
    qw = q if q_norm_weight is None else q_norm_weight
    kw = q if k_norm_weight is None else k_norm_weight
    _rope_kv_write_kernel[grid](
        q, k, v, cos, sin, k_cache, v_cache, write_pos, qw, kw, out,
        T, Hq, Hkv, k_cache.shape[2], layer * k_cache.stride(0), float(eps),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(1), sin.stride(0),
        sin.stride(1), write_pos.stride(0), write_pos.stride(1), *k_cache.stride()[1:4],
        HEAD_DIM=D, HALF=cos.shape[-1], BLOCK_D=block_d, BLOCK_H=block_h,
        Q_NORM=q_norm_weight is not None, K_NORM=k_norm_weight is not None,
        UNIT_OFFSET=unit_offset, num_warps=4 if block_h * block_d >= 512 else 1,
    )  # fmt: skip
    return out


def triton_supports(q: torch.Tensor, q_norm_weight, k_norm_weight) -> bool:
    """Whether "auto" takes the Triton kernel: fp16/bf16/fp32 tensors and norm weights."""
    return q.dtype in TRITON_DTYPES and all(
        w is None or w.dtype in TRITON_DTYPES for w in (q_norm_weight, k_norm_weight))


_IMPLS = {"torch": rope_kv_write_ref}
if HAS_TRITON:
    _IMPLS["triton"] = rope_kv_write_triton


@torch.library.custom_op("medusa_kernels::rope_kv_write", mutates_args=("k_cache", "v_cache"))
def _rope_kv_write_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    write_pos: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    unit_offset: bool,
    backend: str,
) -> torch.Tensor:
    return _IMPLS[backend](q, k, v, cos, sin, k_cache, v_cache, layer, write_pos, q_norm_weight,
                           k_norm_weight, eps, unit_offset)  # fmt: skip


@_rope_kv_write_op.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, layer, write_pos, q_norm_weight, k_norm_weight, eps,
      unit_offset, backend):  # fmt: skip
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    write_pos: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    unit_offset: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate q and k (after optional q/k RMSNorms over D) and write k, v into the cache.

    Args:
        q: [B, T, Hq, D] float; k, v: [B, T, Hkv, D] in q's dtype. Last dim contiguous, other
            strides free (views into the fused q|k|v projection output are read in place).
        cos, sin: [B, T, R/2] float32, the rope's attention factor applied; R <= D rotary dims
            (R < D: partial rotary, dims >= R pass). Rounded to q's dtype before use, as
            transformers does.
        k_cache, v_cache: [NL, B, S, Hkv, D] contiguous, q's dtype: the whole cache, written in
            place at ``[layer, b, write_pos[b, t]]``.
        layer: int in [0, NL).
        write_pos: [B, T] int32/int64 cache slot of each token (any strides; distinct within
            a row, else which token lands there is unspecified). Checked to lie in
            [0, S) for CPU tensors (or with MEDUSA_KERNELS_CHECKS=1); on CUDA an out-of-range
            slot is skipped (nothing written out of bounds).
        q_norm_weight, k_norm_weight: optional [D] RMSNorm weights applied to each q / k head
            before the rope (Qwen3, Gemma-3), with ``eps`` and ``unit_offset`` as in
            ``rms_norm``; the normed head is rounded to q's dtype.
        backend: "auto" (Triton on CUDA tensors of fp16/bf16/fp32, the reference elsewhere),
            "torch" (the reference) or "triton".
    Returns:
        the rotated (and normed) q, a new contiguous [B, T, Hq, D] in q's dtype.

    Eager calls run the implementation directly; torch.compile traces the registered custom op
    (declared as mutating k_cache and v_cache). Inputs that require grad take the reference.

    Example: ``q = rope_kv_write(q, k, v, cos, sin, cache.k, cache.v, i, pos)`` with
    ``q, k, v = qkv.view(B, T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=2)``.
    """
    check_rope_kv_write_args(
        q, k, v, cos, sin, k_cache, v_cache, layer, write_pos, q_norm_weight, k_norm_weight, eps,
        unit_offset, slots=False,
    )  # fmt: skip
    impl = pick_impl("rope_kv_write", backend, q.device, _IMPLS,
                     triton_supports(q, q_norm_weight, k_norm_weight), q, k, v, q_norm_weight,
                     k_norm_weight)  # fmt: skip
    if check_values(q.device) and not (impl == "torch" and q.device.type == "cpu"):
        _check_slots(write_pos, k_cache.shape[2])  # (the reference checks CPU slots itself)
    if not torch.compiler.is_compiling():  # eager: no dispatcher hop (the op is for tracing)
        return _IMPLS[impl](q, k, v, cos, sin, k_cache, v_cache, layer, write_pos,
                            q_norm_weight, k_norm_weight, float(eps), unit_offset)  # fmt: skip
    return _rope_kv_write_op(
        q, k, v, cos, sin, k_cache, v_cache, layer, write_pos, q_norm_weight, k_norm_weight,
        float(eps), unit_offset, impl,
    )  # fmt: skip
