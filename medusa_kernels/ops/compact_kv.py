"""In-place KV-cache compaction of the accepted tree path, all layers at once.

For every layer, sequence b and i < accept_lengths[b]::

    cache[b, L_b + i] = cache[b, L_b + accept_indices[b, i]]      (then L_b += accept_lengths[b])

All sources are read before any destination is written. Along a tree path node indices grow
(``accept_indices[b, i] >= i``), so destinations never lie after their sources.
Paged caches hold position p of sequence b at ``cache[block_table[b, p // bs], p % bs]``.
Shapes: NL layers, B batch, S capacity, Hkv heads, D head dim, A = max accepted length,
NB physical blocks of bs positions, MB = max blocks per sequence (paged capacity S = MB * bs).

Kernels (Triton ``_compact_kv_kernel`` and CUDA C++ ``csrc/compact_kv.cu``): one launch for all
layers; program (chunk c, sequence b, layer l) owns columns [c * BLOCK, (c + 1) * BLOCK) of the
Hkv * D row at positions L_b .. L_b + A of layer l for K and V, so no other program reads or
writes them; it loads every accepted source, then (after a barrier) stores. The last program of
sequence b to finish (a per-sequence atomic counter) writes ``cache_seqlens[b] += n_b``, so the
op is one launch with no host sync. Rows whose source or destination leaves the cache (possible
only with invalid inputs, which the CPU path rejects) are skipped by the kernels.
"""

from __future__ import annotations

import torch

from ._backend import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INDEX_DTYPES,
    check_dim,
    check_tensor,
    cuda_extension,
    pick_backend,
)

if HAS_TRITON:
    import triton
    import triton.language as tl


def compact_kv_cache_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_indices: torch.Tensor,
    accept_lengths: torch.Tensor,
    block_table: torch.Tensor | None = None,
) -> None:
    """Plain PyTorch compaction (the ground truth and the ``torch`` backend), in place.

    k_cache, v_cache: [NL, B, S, Hkv, D] or [B, S, Hkv, D] (or, with ``block_table`` [B, MB]
    int32, [NL, NB, bs, Hkv, D] or [NB, bs, Hkv, D]); cache_seqlens: [B] int32 (updated);
    accept_indices: [B, A] int; accept_lengths: [B] int32. No host sync.
    """
    dev = k_cache.device
    B, A = accept_indices.shape
    if block_table is None:
        S = k_cache.shape[-3]
        batch = torch.arange(B, device=dev)[:, None]
        locate = lambda pos: (batch.expand_as(pos), pos)  # (row, col) of [NL, B, S, ...]
    else:
        bs, num_blocks = k_cache.shape[-3], k_cache.shape[-4]
        S = block_table.shape[1] * bs
        table = block_table.long()
        # (row, col) of [NL, NB, bs, ...]; the clamp only guards skipped rows
        locate = lambda pos: (table.gather(1, pos // bs).clamp(0, num_blocks - 1), pos % bs)
    base = cache_seqlens.to(torch.long)[:, None]
    steps = torch.arange(A, device=dev)[None, :]
    valid = steps < accept_lengths[:, None]  # [B, A]
    dst = (base + steps).clamp(max=S - 1)
    src = torch.where(valid, base + accept_indices.to(torch.long), dst).clamp(0, S - 1)
    src_rc, dst_rc = locate(src), locate(dst)
    # Paged: a skipped row's destination may alias another sequence's block, so write one
    # (b, i) at a time (a skipped row writes back what it just read); dense rows never alias.
    groups = [slice(None)] if block_table is None else [slice(b, b + 1) for b in range(B)]
    for cache in (k_cache, v_cache):
        layers = cache if cache.dim() == 5 else cache.unsqueeze(0)  # a view: writes go through
        moved = layers[:, src_rc[0], src_rc[1]]  # [NL, B, A, Hkv, D], read before any write
        for i in range(A):
            for g in groups:
                rows, cols = dst_rc[0][g, i], dst_rc[1][g, i]
                write = valid[g, i].view(1, -1, 1, 1)
                layers[:, rows, cols] = torch.where(write, moved[:, g, i], layers[:, rows, cols])
    cache_seqlens.add_(accept_lengths.to(cache_seqlens.dtype))


def check_compact_args(
    k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, block_table=None
) -> None:
    check_tensor("k_cache", k_cache, ndim=(4, 5), dtypes=FLOAT_DTYPES)
    dev = k_cache.device
    check_tensor("v_cache", v_cache, ndim=(4, 5), dtypes=(k_cache.dtype,), device=dev)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match"
        )
    if block_table is None:
        B, S = k_cache.shape[-4], k_cache.shape[-3]
        what = "cache batch B"
    else:
        check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=dev)
        B, S = block_table.shape[0], block_table.shape[1] * k_cache.shape[-3]
        what = "block_table rows B"
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=dev)
    check_dim("cache_seqlens", cache_seqlens, 0, B, what)
    check_tensor("accept_indices", accept_indices, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_dim("accept_indices", accept_indices, 0, B, what)
    check_tensor("accept_lengths", accept_lengths, ndim=1, dtypes=(torch.int32,), device=dev)
    check_dim("accept_lengths", accept_lengths, 0, B, what)
    A = accept_indices.shape[1]
    # value checks cost no sync on the CPU; torch.compile cannot trace them (data-dependent)
    if dev.type == "cpu" and not torch.compiler.is_compiling():
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
        if block_table is not None:
            bs, num_blocks = k_cache.shape[-3], k_cache.shape[-4]
            dst = cache_seqlens[:, None].long() + torch.arange(A)[None, :]
            used = torch.cat([src[valid], dst[valid]]) // bs
            rows = valid.nonzero()[:, 0].repeat(2)
            blocks = block_table.long()[rows, used]
            if bool(((blocks < 0) | (blocks >= num_blocks)).any()):
                raise ValueError(
                    f"block_table maps an accepted position outside the cache's {num_blocks} "
                    "blocks"
                )


def _kernel_indices(k_cache, v_cache, accept_indices) -> torch.Tensor:
    """Checks the layout the kernels need (Hkv * D rows as one contiguous run per position);
    returns accept_indices with unit stride along A."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        H, D = t.shape[-2], t.shape[-1]
        if (t.stride(-1) != 1 and D > 1) or (t.stride(-2) != D and H > 1):
            raise ValueError(
                f"{name} must have contiguous (Hkv, D) = ({H}, {D}) rows for the kernels, got "
                f"strides {t.stride()}"
            )
    return accept_indices if accept_indices.stride(1) == 1 else accept_indices.contiguous()


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OLD_COUNTERS: list[torch.Tensor] = []  # kept alive: a captured CUDA graph may point at them


def _counters(device: torch.device, batch: int) -> torch.Tensor:
    """A zeroed int32 [>= batch] buffer per device; each launch leaves it zeroed again.

    The first call on a device (or with a larger batch) allocates: make it before capturing a
    CUDA graph (the usual warm-up run does). One buffer per device: two compactions must not
    run at the same time on different streams of one device.
    """
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < batch:
        if buf is not None:
            _OLD_COUNTERS.append(buf)
        buf = torch.zeros(max(batch, 64), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _layer_view(cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(NL, layer stride, batch-or-block stride, position stride) in elements."""
    if cache.dim() == 5:
        return cache.shape[0], cache.stride(0), cache.stride(1), cache.stride(2)
    return 1, 0, cache.stride(0), cache.stride(1)


if HAS_TRITON:

    @triton.jit
    def _compact_kv_kernel(
        K_ptr, V_ptr, seqlens_ptr, idx_ptr, acc_ptr, table_ptr, counter_ptr,
        S, HD, A, page_size, num_blocks, progs_per_seq,
        k_stride_l, k_stride_b, k_stride_s,
        v_stride_l, v_stride_b, v_stride_s,
        idx_stride_b, table_stride_b,
        A_PAD: tl.constexpr, BLOCK: tl.constexpr, PAGED: tl.constexpr,
    ):  # fmt: skip
        i_c, i_b, i_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        L = tl.load(seqlens_ptr + i_b).to(tl.int64)
        n_raw = tl.load(acc_ptr + i_b)
        n = tl.minimum(n_raw, A)
        o_a = tl.arange(0, A_PAD)
        m_a = o_a < n
        idx = tl.load(idx_ptr + i_b * idx_stride_b + o_a, mask=m_a, other=0).to(tl.int64)
        src = L + idx
        dst = L + o_a
        m_a = m_a & (src >= 0) & (src < S) & (dst < S)
        if PAGED:
            p_table = table_ptr + i_b.to(tl.int64) * table_stride_b
            src_blk = tl.load(p_table + src // page_size, mask=m_a, other=0).to(tl.int64)
            dst_blk = tl.load(p_table + dst // page_size, mask=m_a, other=0).to(tl.int64)
            m_a = m_a & (src_blk >= 0) & (src_blk < num_blocks)
            m_a = m_a & (dst_blk >= 0) & (dst_blk < num_blocks)
            src_row, src_col = src_blk, src % page_size
            dst_row, dst_col = dst_blk, dst % page_size
        else:
            src_row, src_col = i_b.to(tl.int64), src
            dst_row, dst_col = i_b.to(tl.int64), dst
        o_d = i_c * BLOCK + tl.arange(0, BLOCK)
        m = m_a[:, None] & (o_d < HD)[None, :]
        p_k = K_ptr + i_l.to(tl.int64) * k_stride_l
        p_v = V_ptr + i_l.to(tl.int64) * v_stride_l
        k_src = src_row * k_stride_b + src_col * k_stride_s
        k_dst = dst_row * k_stride_b + dst_col * k_stride_s
        v_src = src_row * v_stride_b + src_col * v_stride_s
        v_dst = dst_row * v_stride_b + dst_col * v_stride_s
        b_k = tl.load(p_k + k_src[:, None] + o_d[None, :], mask=m)
        b_v = tl.load(p_v + v_src[:, None] + o_d[None, :], mask=m)
        # every thread's loads are done before any store: the destinations overlap sources
        tl.debug_barrier()
        tl.store(p_k + k_dst[:, None] + o_d[None, :], b_k, mask=m)
        tl.store(p_v + v_dst[:, None] + o_d[None, :], b_v, mask=m)
        # the last program of sequence b to get here advances its length: all the others have
        # read it (before their barrier, before their atomic)
        done = tl.atomic_add(counter_ptr + i_b, 1, sem="acq_rel")
        last = done == progs_per_seq - 1
        tl.store(seqlens_ptr + i_b, (L + n_raw).to(tl.int32), mask=last)
        tl.store(counter_ptr + i_b, 0, mask=last)


def _triton_config(programs_per_row: int, hd: int, elsize: int, a_pad: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 16-byte vectors, >= ~512 programs, <= 16 KiB of tile per tensor."""
    vec = max(1, 16 // elsize)
    block = triton.next_power_of_2(hd)
    while block > vec * 32 and (
        programs_per_row * triton.cdiv(hd, block) < 512 or a_pad * block * elsize > 16384
    ):
        block //= 2
    return block, max(1, min(8, block // (vec * 32)))


def compact_kv_cache_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_indices: torch.Tensor,
    accept_lengths: torch.Tensor,
    block_table: torch.Tensor | None = None,
) -> None:
    """One Triton launch for all layers (same arguments as ``compact_kv_cache_ref``)."""
    accept_indices = _kernel_indices(k_cache, v_cache, accept_indices)
    B, A = accept_indices.shape
    if B == 0:
        return
    if A == 0 or k_cache.numel() == 0:
        cache_seqlens.add_(accept_lengths)
        return
    NL, k_sl, k_sb, k_ss = _layer_view(k_cache)
    _, v_sl, v_sb, v_ss = _layer_view(v_cache)
    HD = k_cache.shape[-2] * k_cache.shape[-1]
    paged = block_table is not None
    if paged:
        page, num_blocks = k_cache.shape[-3], k_cache.shape[-4]
        S = block_table.shape[1] * page
        table, table_stride = block_table, block_table.stride(0)
    else:
        page, num_blocks, S = 1, 1, k_cache.shape[-3]
        table, table_stride = cache_seqlens, 0  # unused
    a_pad = triton.next_power_of_2(A)
    block, num_warps = _triton_config(NL * B, HD, k_cache.element_size(), a_pad)
    chunks = triton.cdiv(HD, block)
    if B > 65535 or NL > 65535:
        raise ValueError(f"compact_kv_cache: B = {B} and NL = {NL} must be <= 65535")
    counters = _counters(k_cache.device, B)
    _compact_kv_kernel[(chunks, B, NL)](
        k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, table, counters,
        S, HD, A, page, num_blocks, NL * chunks,
        k_sl, k_sb, k_ss, v_sl, v_sb, v_ss,
        accept_indices.stride(0), table_stride,
        A_PAD=a_pad, BLOCK=block, PAGED=paged, num_warps=num_warps,
    )  # fmt: skip


def compact_kv_cache_cuda(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_indices: torch.Tensor,
    accept_lengths: torch.Tensor,
    block_table: torch.Tensor | None = None,
) -> None:
    """One CUDA C++ launch (``medusa_kernels._C``, csrc/compact_kv.cu); same arguments."""
    accept_indices = _kernel_indices(k_cache, v_cache, accept_indices)
    B = accept_indices.shape[0]
    if B == 0:
        return
    ext = cuda_extension()
    ext.compact_kv_cache(
        k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, block_table,
        _counters(k_cache.device, B),
    )  # fmt: skip


_IMPLS = {"torch": compact_kv_cache_ref, "cuda": compact_kv_cache_cuda}
if HAS_TRITON:
    _IMPLS["triton"] = compact_kv_cache_triton
AUTO_ORDER = ("cuda", "triton", "torch")


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
    block_table: torch.Tensor | None = None,
) -> None:
    _IMPLS[backend](k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, block_table)


@_compact_kv_cache_op.register_fake
def _(k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, backend, block_table=None):
    return None


def compact_kv_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_indices: torch.Tensor,
    accept_lengths: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """Move each sequence's accepted tree path right after its prefix, in every layer, in place.

    Args:
        k_cache, v_cache: [NL, B, S, Hkv, D] (all layers) or [B, S, Hkv, D] (one layer); with
            ``block_table``: [NL, NB, bs, Hkv, D] or [NB, bs, Hkv, D] paged caches.
        cache_seqlens: [B] int32 prefix lengths; increased by accept_lengths in place.
        accept_indices: [B, A] int32/int64 tree-node index of each accepted token, in order
            (entries at i >= accept_lengths[b] are ignored).
        accept_lengths: [B] int32 in [0, A].
        block_table: optional [B, MB] int32 physical block of each sequence's logical block
            (position p lives at block ``block_table[b, p // bs]``, slot ``p % bs``).
        backend: "auto" (cuda if ``medusa_kernels._C`` is built, else triton, on CUDA tensors;
            torch elsewhere), "torch" (the reference), "triton", "cuda".

    The kernels need contiguous (Hkv, D) rows and update ``cache_seqlens`` in the same launch;
    the first call on a device allocates a small counter buffer (warm up before graph capture).

    Example::

        compact_kv_cache(cache.k, cache.v, cache.seqlens, path, counts)  # path [B, A]
    """
    check_compact_args(
        k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, block_table
    )
    name = pick_backend("compact_kv_cache", backend, k_cache.device, _IMPLS, AUTO_ORDER)
    _compact_kv_cache_op(
        k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, name, block_table
    )
