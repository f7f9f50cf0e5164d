"""In-place KV-cache compaction of the accepted tree path, all layers at once.

For every layer, sequence b and i < accept_lengths[b]::

    cache[b, L_b + i] = cache[b, L_b + accept_indices[b, i]]      (then L_b += accept_lengths[b])

All sources are read before any destination is written. Paged caches hold position p of
sequence b at ``cache[block_table[b, p // bs], p % bs]``. Shapes: NL layers, B batch, S capacity,
Hkv heads, D head dim, A = max accepted length, NB physical blocks of bs positions, MB = max
blocks per sequence (paged capacity S = MB * bs).

Valid arguments, per sequence b with n = accept_lengths[b], L = cache_seqlens[b]: 0 <= n <= A,
L >= 0, L + n <= S, and for every i < n: ``i <= accept_indices[b, i] < S - L`` (node indices
grow along a tree path, so a destination never lies after its source) and, paged, blocks in
[0, NB). ``check_values`` (CPU tensors, or ``MEDUSA_KERNELS_CHECKS=1``) rejects anything else
with a ValueError naming the entry. Unchecked (CUDA), every backend skips a sequence that breaks
any of them: nothing of it is read or written and its length stays, so a bad entry never
reaches another sequence's slots (its own slots are those its block_table row names).

Kernels (Triton ``_compact_kv_kernel`` and CUDA C++ ``csrc/compact_kv.cu``): one launch for all
layers; program (chunk c, sequence b, layer l) owns columns [c * BLOCK, (c + 1) * BLOCK) of the
Hkv * D row at positions L_b .. L_b + A of layer l for K and V, so no other program reads or
writes them; it checks sequence b, loads every accepted source, then (after a barrier) stores
(the CUDA kernel moves 8 rows at a time, in order, which ``accept_indices[b, i] >= i`` makes
exact). The last program of sequence b to finish (a per-sequence atomic counter) writes
``cache_seqlens[b] += n_b``, so the op is one launch with no host sync.
"""

from __future__ import annotations

import torch

from ._backend import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INDEX_DTYPES,
    check_dim,
    check_tensor,
    check_values,
    cuda_extension,
    pick_backend,
)

if HAS_TRITON:
    import triton
    import triton.language as tl


def _capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """S: positions per sequence (dense: the cache's; paged: max blocks x block size)."""
    return k_cache.shape[-3] if block_table is None else block_table.shape[1] * k_cache.shape[-3]


def valid_sequences(
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accept_indices: torch.Tensor,
    accept_lengths: torch.Tensor,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device, no sync: ([B] bool whether sequence b's values are valid (module doc),
    [B, A] bool the rows that move: i < accept_lengths[b] of valid sequences)."""
    B, A = accept_indices.shape
    S = _capacity(k_cache, block_table)
    L, n = cache_seqlens.long(), accept_lengths.long()
    steps = torch.arange(A, device=k_cache.device)
    active = steps[None, :] < n[:, None]
    idx = accept_indices.long()
    ok = (n >= 0) & (n <= A) & (L >= 0) & (L + n <= S)
    bad = active & ((idx < steps[None, :]) | (idx >= (S - L)[:, None]))
    if block_table is not None and A > 0 and S > 0:
        bs, num_blocks = k_cache.shape[-3], k_cache.shape[-4]
        pos = torch.cat([L[:, None] + idx, L[:, None] + steps[None, :]], 1).clamp(0, S - 1)
        blocks = block_table.long().gather(1, pos // bs)  # [B, 2A]: sources, destinations
        off = (blocks < 0) | (blocks >= num_blocks)
        bad = bad | (active & (off[:, :A] | off[:, A:]))
    ok = ok & ~bad.any(dim=1)
    return ok, active & ok[:, None]


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
    accept_indices: [B, A] int; accept_lengths: [B] int32. No host sync. Sequences with
    invalid values are skipped, as by the kernels (module doc).
    """
    dev = k_cache.device
    B, A = accept_indices.shape
    S = _capacity(k_cache, block_table)
    ok, valid = valid_sequences(k_cache, cache_seqlens, accept_indices, accept_lengths,
                                block_table)
    advance = torch.where(ok, accept_lengths, 0).to(cache_seqlens.dtype)
    if A == 0 or S == 0 or k_cache.numel() == 0:  # nothing to move
        cache_seqlens.add_(advance)
        return
    if block_table is None:
        batch = torch.arange(B, device=dev)[:, None]
        locate = lambda pos: (batch.expand_as(pos), pos)  # (row, col) of [NL, B, S, ...]
    else:
        bs, num_blocks = k_cache.shape[-3], k_cache.shape[-4]
        table = block_table.long()
        # (row, col) of [NL, NB, bs, ...]; the clamp only guards rows that do not move
        locate = lambda pos: (table.gather(1, pos // bs).clamp(0, num_blocks - 1), pos % bs)
    base = cache_seqlens.to(torch.long)[:, None]
    steps = torch.arange(A, device=dev)[None, :]
    dst = (base + steps).clamp(0, S - 1)
    src = torch.where(valid, base + accept_indices.to(torch.long), dst).clamp(0, S - 1)
    src_rc, dst_rc = locate(src), locate(dst)
    # Paged: a row that does not move may alias another sequence's block, so write one
    # (b, i) at a time (such a row writes back what it just read); dense rows never alias.
    groups = [slice(None)] if block_table is None else [slice(b, b + 1) for b in range(B)]
    for cache in (k_cache, v_cache):
        layers = cache if cache.dim() == 5 else cache.unsqueeze(0)  # a view: writes go through
        moved = layers[:, src_rc[0], src_rc[1]]  # [NL, B, A, Hkv, D], read before any write
        for i in range(A):
            for g in groups:
                rows, cols = dst_rc[0][g, i], dst_rc[1][g, i]
                write = valid[g, i].view(1, -1, 1, 1)
                layers[:, rows, cols] = torch.where(write, moved[:, g, i], layers[:, rows, cols])
    cache_seqlens.add_(advance)


def _first_bad(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def check_compact_args(
    k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, block_table=None
) -> None:
    """Shapes, dtypes and devices; with ``check_values`` also every value (module doc)."""
    check_tensor("k_cache", k_cache, ndim=(4, 5), dtypes=FLOAT_DTYPES)
    dev = k_cache.device
    check_tensor("v_cache", v_cache, ndim=(4, 5), dtypes=(k_cache.dtype,), device=dev)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match"
        )
    if block_table is None:
        B = k_cache.shape[-4]
        what = "cache batch B"
    else:
        check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=dev)
        B = block_table.shape[0]
        what = "block_table rows B"
    S = _capacity(k_cache, block_table)
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=dev)
    check_dim("cache_seqlens", cache_seqlens, 0, B, what)
    check_tensor("accept_indices", accept_indices, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    check_dim("accept_indices", accept_indices, 0, B, what)
    check_tensor("accept_lengths", accept_lengths, ndim=1, dtypes=(torch.int32,), device=dev)
    check_dim("accept_lengths", accept_lengths, 0, B, what)
    if not check_values(dev) or B == 0:
        return
    A = accept_indices.shape[1]
    L, n = cache_seqlens.long(), accept_lengths.long()
    bad = (n < 0) | (n > A)
    if bool(bad.any()):
        (b,) = _first_bad(bad)
        raise ValueError(f"accept_lengths[{b}] = {int(n[b])} must lie in [0, A = {A}]")
    bad = L < 0
    if bool(bad.any()):
        (b,) = _first_bad(bad)
        raise ValueError(f"cache_seqlens[{b}] = {int(L[b])} must be >= 0")
    bad = L + n > S
    if bool(bad.any()):
        (b,) = _first_bad(bad)
        raise ValueError(
            f"cache_seqlens[{b}] + accept_lengths[{b}] = {int(L[b])} + {int(n[b])} reaches "
            f"outside the cache: it must be <= S = {S}"
        )
    steps = torch.arange(A, device=dev)
    idx = accept_indices.long()
    bad = (steps[None, :] < n[:, None]) & ((idx < steps) | (idx >= (S - L)[:, None]))
    if bool(bad.any()):
        b, i = _first_bad(bad)
        raise ValueError(
            f"accept_indices[{b}, {i}] = {int(idx[b, i])} must lie in [{i}, S - cache_seqlens"
            f"[{b}] = {S - int(L[b])}): a tree path's node index is >= its row, and its source "
            "cache_seqlens + index must not reach outside the cache"
        )
    if block_table is None:
        return
    ok, _ = valid_sequences(k_cache, cache_seqlens, accept_indices, accept_lengths, block_table)
    if not bool(ok.all()):  # all else is valid: a block outside the cache
        (b,) = _first_bad(~ok)
        raise ValueError(
            f"block_table maps an accepted position of sequence {b} outside the cache's "
            f"{k_cache.shape[-4]} blocks: block_table[{b}] = {block_table[b].tolist()}"
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
        n = tl.load(acc_ptr + i_b)
        # sequence b is valid (module doc) or skipped whole: nothing read or written
        ok = (n >= 0) & (n <= A) & (L >= 0) & (L + n <= S)
        o_a = tl.arange(0, A_PAD)
        m_a = o_a < tl.where(ok, n, 0)
        idx = tl.load(idx_ptr + i_b * idx_stride_b + o_a, mask=m_a, other=0).to(tl.int64)
        bad = m_a & ((idx < o_a) | (idx >= S - L))  # no overflow: S - L >= 0
        m_a = m_a & ~bad
        src = L + idx
        dst = L + o_a
        if PAGED:
            p_table = table_ptr + i_b.to(tl.int64) * table_stride_b
            src_blk = tl.load(p_table + src // page_size, mask=m_a, other=0).to(tl.int64)
            dst_blk = tl.load(p_table + dst // page_size, mask=m_a, other=0).to(tl.int64)
            bad = bad | (m_a & ((src_blk < 0) | (src_blk >= num_blocks)))
            bad = bad | (m_a & ((dst_blk < 0) | (dst_blk >= num_blocks)))
            src_row, src_col = src_blk, src % page_size
            dst_row, dst_col = dst_blk, dst % page_size
        else:
            src_row, src_col = i_b.to(tl.int64), src
            dst_row, dst_col = i_b.to(tl.int64), dst
        ok = ok & (tl.max(bad.to(tl.int32), axis=0) == 0)
        m_a = o_a < tl.where(ok, n, 0)
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
        tl.store(seqlens_ptr + i_b, (L + n).to(tl.int32), mask=last & ok)
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
    if A == 0 or k_cache.numel() == 0:  # nothing to move (the ref advances valid lengths)
        compact_kv_cache_ref(k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths,
                             block_table)
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
    """One CUDA C++ launch (``medusa_kernels._C``, csrc/compact_kv.cu); same arguments.
    A <= 64 (``CUDA_MAX_ACCEPT``) and a paged capacity below 2^31."""
    accept_indices = _kernel_indices(k_cache, v_cache, accept_indices)
    B, A = accept_indices.shape
    if A > CUDA_MAX_ACCEPT:
        raise ValueError(
            f"accept_indices has A = {A} columns: the cuda backend moves at most "
            f"{CUDA_MAX_ACCEPT} accepted tokens per sequence (use backend='triton')"
        )
    if block_table is not None and _capacity(k_cache, block_table) >= 2**31:
        raise ValueError(
            f"block_table: max_pages * page_size = {_capacity(k_cache, block_table)} must be "
            "< 2**31 for the cuda backend (use backend='triton')"
        )
    if B == 0:
        return
    if A == 0 or k_cache.numel() == 0:  # nothing to move (the ref advances valid lengths)
        compact_kv_cache_ref(k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths,
                             block_table)
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
CUDA_MAX_ACCEPT = 64  # csrc/compact_kv.cu: kMaxAccept


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
        cache_seqlens: [B] int32 prefix lengths L_b in [0, S - accept_lengths[b]]; increased
            by accept_lengths in place.
        accept_indices: [B, A] int32/int64 tree-node index of each accepted token, in order
            (a tree path: ``i <= accept_indices[b, i] < S - L_b``; entries at
            i >= accept_lengths[b] are ignored, -1 padding included).
        accept_lengths: [B] int32 in [0, A] (A = 0: nothing accepted, nothing moves).
        block_table: optional [B, MB] int32 physical block of each sequence's logical block
            (position p lives at block ``block_table[b, p // bs]``, slot ``p % bs``).
        backend: "auto" (cuda if ``medusa_kernels._C`` is built and A <= 64, else triton, on
            CUDA tensors; torch elsewhere), "torch" (the reference), "triton", "cuda".

    Values are checked on the host for CPU tensors (or with ``MEDUSA_KERNELS_CHECKS=1``): a
    ValueError names the first bad entry. Unchecked, a sequence with an invalid value is
    skipped by every backend (its cache and length unchanged; see the module doc). The
    kernels need contiguous (Hkv, D) rows and update ``cache_seqlens`` in the same launch; the
    first call on a device allocates a small counter buffer (warm up before graph capture).

    Example::

        compact_kv_cache(cache.k, cache.v, cache.seqlens, path, counts)  # path [B, A]
    """
    check_compact_args(
        k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, block_table
    )
    cuda_ok = accept_indices.shape[1] <= CUDA_MAX_ACCEPT and (
        block_table is None or _capacity(k_cache, block_table) < 2**31)
    order = AUTO_ORDER if cuda_ok else tuple(n for n in AUTO_ORDER if n != "cuda")
    name = pick_backend("compact_kv_cache", backend, k_cache.device, _IMPLS, order)
    _compact_kv_cache_op(
        k_cache, v_cache, cache_seqlens, accept_indices, accept_lengths, name, block_table
    )
