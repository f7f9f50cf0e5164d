"""In-place KV-cache compaction of the accepted tree path, all layers at once.

For every layer, sequence b and i < accept_lengths[b]::

    cache[b, L_b + i] = cache[b, L_b + accept_indices[b, i]]      (then L_b += accept_lengths[b])

All sources are read before any destination is written. Along a tree path node indices grow
(``accept_indices[b, i] >= i``), so destinations never lie after their sources.
Shapes: NL layers, B batch, S capacity, Hkv heads, D head dim, A = max accepted length.
"""

from __future__ import annotations

import torch

from ._backend import FLOAT_DTYPES, INDEX_DTYPES, check_dim, check_tensor, pick_backend


def compact_kv_cache_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_indices: torch.Tensor,
    accept_lengths: torch.Tensor,
) -> None:
    """Plain PyTorch compaction (the ground truth and the ``torch`` backend), in place.

    k_cache, v_cache: [NL, B, S, Hkv, D] or [B, S, Hkv, D]; cache_seqlens: [B] int32 (updated);
    accept_indices: [B, A] int; accept_lengths: [B] int32. No host sync.
    """
    S = k_cache.shape[-3]
    B, A = accept_indices.shape
    batch = torch.arange(B, device=k_cache.device)
    base = cache_seqlens.to(torch.long)
    valid = torch.arange(A, device=k_cache.device)[None, :] < accept_lengths[:, None]  # [B, A]
    dst = (base[:, None] + torch.arange(A, device=k_cache.device)[None, :]).clamp(max=S - 1)
    src = torch.where(valid, base[:, None] + accept_indices.to(torch.long), dst).clamp(0, S - 1)
    for cache in (k_cache, v_cache):
        layers = cache if cache.dim() == 5 else cache.unsqueeze(0)  # a view: writes go through
        moved = layers[:, batch[:, None], src]  # [NL, B, A, Hkv, D], read before any write
        for i in range(A):
            keep = layers[:, batch, dst[:, i]]
            write = valid[:, i].view(1, B, 1, 1)
            layers[:, batch, dst[:, i]] = torch.where(write, moved[:, :, i], keep)
    cache_seqlens.add_(accept_lengths.to(cache_seqlens.dtype))


def check_compact_args(k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths) -> None:
    check_tensor("k_cache", k_cache, ndim=(4, 5), dtypes=FLOAT_DTYPES)
    dev = k_cache.device
    check_tensor("v_cache", v_cache, ndim=(4, 5), dtypes=(k_cache.dtype,), device=dev)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match"
        )
    B, S = k_cache.shape[-4], k_cache.shape[-3]
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=dev)
    check_dim("cache_seqlens", cache_seqlens, 0, B, "cache batch B")
    check_tensor("accept_indices", accept_indices, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_dim("accept_indices", accept_indices, 0, B, "cache batch B")
    check_tensor("accept_lengths", accept_lengths, ndim=1, dtypes=(torch.int32,), device=dev)
    check_dim("accept_lengths", accept_lengths, 0, B, "cache batch B")
    A = accept_indices.shape[1]
    if dev.type == "cpu":  # value checks cost no sync here
        if bool(((accept_lengths < 0) | (accept_lengths > A)).any()):
            raise ValueError(
                f"accept_lengths must lie in [0, A = {A}], got {accept_lengths.tolist()}"
            )
        valid = torch.arange(A)[None, :] < accept_lengths[:, None]
        src = cache_seqlens[:, None].long() + accept_indices.long()
        bad_src = valid & ((accept_indices < 0) | (src >= S))
        if bool(bad_src.any()) or bool((cache_seqlens.long() + accept_lengths.long() > S).any()):
            raise ValueError(
                "accept_indices/accept_lengths reach outside the cache: every accepted source "
                f"cache_seqlens + accept_indices and destination must be < S = {S}"
            )


_IMPLS = {"torch": compact_kv_cache_ref}


@torch.library.custom_op(
    "medusa_kernels::compact_kv_cache", mutates_args=("k_cache", "v_cache", "cache_seqlens")
)
def _compact_kv_cache_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_indices: torch.Tensor,
    accept_lengths: torch.Tensor,
    backend: str,
) -> None:
    _IMPLS[backend](k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths)


@_compact_kv_cache_op.register_fake
def _(k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, backend):
    return None


def compact_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_indices: torch.Tensor,
    accept_lengths: torch.Tensor,
    *,
    backend: str = "auto",
) -> None:
    """Move each sequence's accepted tree path right after its prefix, in every layer, in place.

    Args:
        k_cache, v_cache: [NL, B, S, Hkv, D] (all layers) or [B, S, Hkv, D] (one layer).
        cache_seqlens: [B] int32 prefix lengths; increased by accept_lengths in place.
        accept_indices: [B, A] int32/int64 tree-node index of each accepted token, in order
            (entries at i >= accept_lengths[b] are ignored).
        accept_lengths: [B] int32 in [0, A].
        backend: "auto", "torch" (the reference); later "triton", "cuda".
    """
    check_compact_args(k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths)
    name = pick_backend("compact_kv_cache", backend, k_cache.device, _IMPLS)
    _compact_kv_cache_op(k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, name)
