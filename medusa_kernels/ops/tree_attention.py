"""Tree-masked attention of T tree tokens over a KV cache (one layer).

For batch b, query token t and head h (KV head ``h // (Hq // Hkv)``)::

    out[b, t, h] = softmax_j(scale * q[b, t, h] . k[b, j]) @ v[b, j]
    over j < L_b (the whole prefix) and j = L_b + u for every tree node u with tree_mask[t, u]

Shapes: B batch, T tree nodes (T = 1 with ``[[True]]`` is plain decode), S cache capacity,
L_b = cache_seqlens[b] prefix length, Hq/Hkv query/KV heads, D head dim. The T tree tokens'
keys and values are already stored at positions ``[L_b, L_b + T)`` of the cache.
"""

from __future__ import annotations

import math

import torch

from ._backend import FLOAT_DTYPES, check_dim, check_tensor, pick_backend


def tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch tree attention (the ground truth and the ``torch`` backend).

    q: [B, T, Hq, D]; k_cache, v_cache: [B, S, Hkv, D]; cache_seqlens: [B] int;
    tree_mask: [T, T] bool. Computes in fp32 (or float64 for float64 inputs) when ``upcast``,
    else in q's dtype. Returns [B, T, Hq, D] in q's dtype. No host sync.
    """
    B, T, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dtype = (torch.float64 if q.dtype == torch.float64 else torch.float32) if upcast else q.dtype
    group = Hq // Hkv
    k = k_cache.to(dtype).repeat_interleave(group, dim=2)
    v = v_cache.to(dtype).repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.to(dtype), k) * scale  # [B, Hq, T, S]
    rel = torch.arange(S, device=q.device)[None, :] - cache_seqlens.to(torch.long)[:, None]
    in_prefix = rel < 0  # [B, S]
    in_tree = (rel >= 0) & (rel < T)
    tree_visible = tree_mask.to(torch.bool)[:, rel.clamp(0, T - 1)].permute(1, 0, 2)  # [B, T, S]
    visible = in_prefix[:, None, :] | (in_tree[:, None, :] & tree_visible)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v).to(q.dtype).contiguous()


def check_tree_attention_args(q, k_cache, v_cache, cache_seqlens, tree_mask) -> None:
    """Validate shapes, dtypes and devices; on CPU also that the tree fits in the cache."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, T, Hq, D = q.shape
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match"
        )
    check_dim("k_cache", k_cache, 0, B, "batch B of q")
    check_dim("k_cache", k_cache, 3, D, "head dim D of q")
    Hkv = k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, not a multiple of the cache's {Hkv} KV heads")
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    check_dim("cache_seqlens", cache_seqlens, 0, B, "batch B of q")
    check_tensor("tree_mask", tree_mask, ndim=2, dtypes=(torch.bool,), device=q.device)
    if tuple(tree_mask.shape) != (T, T):
        raise ValueError(f"tree_mask must be [T, T] = [{T}, {T}], got {tuple(tree_mask.shape)}")
    if T > k_cache.shape[1]:
        raise ValueError(f"T = {T} tree tokens do not fit a cache of {k_cache.shape[1]} slots")
    if q.device.type == "cpu":  # value checks cost no sync here
        if bool((cache_seqlens < 0).any()) or bool((cache_seqlens + T > k_cache.shape[1]).any()):
            raise ValueError(
                f"cache_seqlens + T must lie in [T, S = {k_cache.shape[1]}] for every sequence; "
                f"got cache_seqlens = {cache_seqlens.tolist()} with T = {T}"
            )


_IMPLS = {"torch": tree_attention_ref}


@torch.library.custom_op("medusa_kernels::tree_attention", mutates_args=())
def _tree_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float,
    backend: str,
) -> torch.Tensor:
    return _IMPLS[backend](q, k_cache, v_cache, cache_seqlens, tree_mask, softmax_scale)


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, tree_mask, softmax_scale, backend):
    return torch.empty_like(q)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of T tree tokens over the cached prefix plus the tree nodes each may see.

    Args:
        q: [B, T, Hq, D] fp16/bf16/fp32 queries of the tree tokens.
        k_cache, v_cache: [B, S, Hkv, D], same dtype; the tree's own keys/values already stored
            at positions [cache_seqlens[b], cache_seqlens[b] + T). Hq must be a multiple of Hkv.
        cache_seqlens: [B] int32 prefix lengths, on the device (never read on the host).
        tree_mask: [T, T] bool; row t says which tree nodes query t sees (itself and its
            ancestors). The prefix is always visible.
        softmax_scale: defaults to 1 / sqrt(D).
        backend: "auto", "torch" (the reference) or "triton".
    Returns:
        [B, T, Hq, D] in q's dtype.

    Example: plain decode is ``tree_attention(q[:, :1], k, v, lens, torch.ones(1, 1, dtype=bool))``.
    """
    check_tree_attention_args(q, k_cache, v_cache, cache_seqlens, tree_mask)
    name = pick_backend("tree_attention", backend, q.device, _IMPLS)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _tree_attention_op(q, k_cache, v_cache, cache_seqlens, tree_mask, float(scale), name)
