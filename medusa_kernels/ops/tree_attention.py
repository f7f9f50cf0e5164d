"""Tree-masked attention of T tree tokens over a KV cache (one layer).

For batch b, query token t and head h (KV head ``h // (Hq // Hkv)``)::

    out[b, t, h] = softmax_j(cap(scale * q[b, t, h] . k[b, j])) @ v[b, j]
    over j < L_b (the whole prefix) and j = L_b + u for every tree node u with tree_mask[t, u],
    with a window W only keys at positions > L_b + depth[t] - W; cap(x) = softcap tanh(x / softcap)

Shapes: B batch, T tree nodes (T = 1 with ``[[True]]`` is plain decode), S cache capacity,
L_b = cache_seqlens[b] prefix length, Hq/Hkv query/KV heads, G = Hq / Hkv, D head dim. The T tree
tokens' keys and values are already stored at positions ``[L_b, L_b + T)`` of the cache; tree node
u sits at position ``L_b + depth[u]``. The cache is a full one: slot p holds position p.

Caches are contiguous ``[B, S, Hkv, D]`` or paged ``[num_pages, page_size, Hkv, D]`` with a
``block_table [B, max_pages] int32`` (position p of sequence b lives in page
``block_table[b, p // page_size]``, slot ``p % page_size``), as ``flash_attn_with_kvcache`` takes
them. The tree mask is bool ``[T, T]`` or packed int32 ``[T, ceil(T / 32)]``: bit ``u % 32``
(least significant bit first) of word ``u // 32`` of row t is set when node t sees node u
(``pack_tree_mask`` makes it).

Triton kernel (flash-decoding over the prefix, the tree mask only on the tree):

- Grid ``(row blocks, B * Hkv, splits)``; a tile's rows are the ``T * G`` (tree token, query
  head) pairs of one KV group, ``r = t * G + g``, so each K/V tile feeds every head that uses it.
- Split s walks its share of the prefix blocks, computed on the device from cache_seqlens (and
  the window: blocks wholly before it are never read, so a step costs O(W + T) keys), with no
  load masks but in the first and last block. The tree keys come in chunks of 16-64 spread over
  the last splits, under the tree mask (never a T x (L + T) mask).
- Splits write fp32 partials and base-2 log-sum-exps; a second kernel merges them (all
  log-sum-exps in one load, partials 16 splits per load). One split writes the output itself.
- No host read: the split count comes from static shapes and the occupancy, so a call is
  captured in a CUDA graph whole. Lengths are clamped to [0, S - T] and page indices to
  [0, num_pages) on the device.

Launch configuration (``_config``): fp16/bf16, chosen from the sm_90 / sm_80 compile with Triton
3.9 (no spills anywhere; registers and shared memory per configuration in the AOT compile's
static report); GPU timings to be measured. On sm_90, by rows = T * G:

- <= 16 (decode): BLOCK_M 16, BLOCK_N 64, 3 CTAs/SM, kept by maxnreg 168;
- <= 32: BLOCK_M 32, 2 CTAs/SM; <= 64: BLOCK_M 64, 2 stages (80 KB), 2 CTAs/SM;
- > 64: BLOCK_M 128, 8 warps, 1 CTA/SM (128 KB) (a 64-row A/B is in the bench);
- D <= 64 takes BLOCK_N 128 up to 64 rows; below sm_90 (mma.sync) the tiles are smaller
  (BLOCK_M 32 up to 64 rows, BLOCK_N 32 above), which do not spill there.
- splits: one wave of the CTAs/SM measured from the compiled kernel at its first launch (the
  static value above on the CPU), at least 2 (decode) or 4 key blocks of the capacity each.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _backend
from ._backend import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_dim,
    check_real,
    check_tensor,
    check_values,
    ctas_per_sm,
    cuda_arch,
    pick_backend,
    sm_count,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

TRITON_HEAD_DIMS = (64, 80, 96, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TREE = 128


def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tree mask [T, T] into int32 [T, ceil(T / 32)].

    Bit ``u % 32`` (LSB first) of word ``u // 32`` of row t is ``mask[t, u]``; bit 31 is the
    sign bit. Runs on the mask's device without a host sync.
    """
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    T, U = mask.shape
    W = (U + 31) // 32
    bits = torch.zeros(T, W * 32, dtype=torch.int32, device=mask.device)
    bits[:, :U] = mask.to(torch.int32)
    shifts = torch.arange(32, dtype=torch.int32, device=mask.device)
    # distinct bits: their int32 sum is their OR (bit 31 contributes -2**31, as it should)
    return (bits.view(T, W, 32) << shifts).sum(-1, dtype=torch.int32)


def unpack_tree_mask(packed: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of ``pack_tree_mask``: int32 [T, ceil(T / 32)] -> bool [T, T]."""
    u = torch.arange(T, device=packed.device)
    return ((packed[:, u // 32] >> (u % 32).to(packed.dtype)) & 1).to(torch.bool)


def tree_node_depths(tree_mask: torch.Tensor) -> torch.Tensor:
    """Depth of each tree node [T] int64 from its mask (bool [T, T] or packed): a node sees
    itself and its ancestors, so its depth is its row's count of set bits minus one."""
    if tree_mask.dtype != torch.bool:
        tree_mask = unpack_tree_mask(tree_mask, tree_mask.shape[0])
    return tree_mask.sum(dim=1) - 1


def _gather_pages(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Paged [num_pages, page_size, Hkv, D] -> contiguous [B, max_pages * page_size, Hkv, D]."""
    B, P = block_table.shape
    pages = cache[block_table.clamp(0, cache.shape[0] - 1).long()]  # [B, P, page_size, Hkv, D]
    return pages.reshape(B, P * cache.shape[1], *cache.shape[2:])


def tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float | None = None,
    upcast: bool = True,
    *,
    block_table: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    tree_depths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch tree attention (the ground truth and the ``torch`` backend).

    q: [B, T, Hq, D]; k_cache, v_cache: [B, S, Hkv, D] (or paged [num_pages, page_size, Hkv, D]
    with block_table [B, max_pages] int32); cache_seqlens: [B] int; tree_mask: [T, T] bool or
    packed int32 [T, ceil(T / 32)]. Computes in fp32 (or float64 for float64 inputs) when
    ``upcast``, else in q's dtype. Returns [B, T, Hq, D] in q's dtype. No host sync on a GPU
    (on the CPU it reads the lengths, to skip the cache's unused capacity and the slots before
    the window). ``sliding_window``, ``softcap``, ``tree_depths``: as ``tree_attention``.
    Lengths are clamped to [0, S - T] and page indices to [0, num_pages), as in the kernel; the
    values of slots no query sees are selected away, never multiplied by 0 (NaN cannot leak).
    A query that sees no key at all (a mask row without itself over an empty prefix, which the
    op refuses where it checks values) gives 0 where values go unchecked (off the CPU, or under
    torch.compile), as the kernel does; NaN in an eager CPU call (which the op has refused).
    """
    B, T, Hq, D = q.shape
    if B == 0 or T == 0:
        return q.new_empty(q.shape)
    if block_table is not None:
        k_cache, v_cache = _gather_pages(k_cache, block_table), _gather_pages(v_cache, block_table)
    if tree_mask.dtype != torch.bool:
        tree_mask = unpack_tree_mask(tree_mask, T)
    depth = None
    if sliding_window is not None:
        depth = tree_node_depths(tree_mask) if tree_depths is None else tree_depths.to(torch.long)
    lengths = cache_seqlens.to(torch.long).clamp(0, k_cache.shape[1] - T)  # [B]
    start = 0
    if q.device.type == "cpu":  # no device to sync with: skip what no query can see
        used = int(lengths.max()) + T
        if depth is not None:
            start = max(0, int(lengths.min()) + int(depth.min()) - sliding_window + 1)
        k_cache, v_cache = k_cache[:, start:used], v_cache[:, start:used]
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dtype = (torch.float64 if q.dtype == torch.float64 else torch.float32) if upcast else q.dtype
    slot = start + torch.arange(S, device=q.device)[None, :]  # [1, S] cache slot = position
    rel = slot - lengths[:, None]  # [B, S]
    in_prefix = rel < 0
    in_tree = (rel >= 0) & (rel < T)
    tree_visible = tree_mask[:, rel.clamp(0, T - 1)].permute(1, 0, 2)  # [B, T, S]
    visible = in_prefix[:, None, :] | (in_tree[:, None, :] & tree_visible)
    if depth is not None:  # query t at L + depth[t] sees keys at positions > it - W
        key_pos = torch.where(in_tree, lengths[:, None] + depth[rel.clamp(0, T - 1)], slot)
        query_pos = lengths[:, None] + depth[None, :]  # [B, T]
        visible = visible & (key_pos[:, None, :] > query_pos[:, :, None] - sliding_window)
    seen = visible.any(dim=1)[:, :, None, None]  # [B, S, 1, 1]: slots some query sees
    group = Hq // Hkv
    k = k_cache.to(dtype).repeat_interleave(group, dim=2)
    v = torch.where(seen, v_cache.to(dtype), 0.0).repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.to(dtype), k) * scale  # [B, Hq, T, S]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if q.device.type != "cpu" or torch.compiler.is_compiling():  # values unchecked there
        probs = torch.where(visible.any(dim=-1)[:, None, :, None], probs, 0.0)  # saw no key: 0
    return torch.einsum("bhts,bshd->bthd", probs, v).to(q.dtype).contiguous()


def check_tree_attention_args(
    q, k_cache, v_cache, cache_seqlens, tree_mask, block_table=None, tree_depths=None,
    sliding_window=None,
) -> None:
    """Validate shapes, dtypes and devices; where ``check_values`` (CPU tensors, or CUDA with
    MEDUSA_KERNELS_CHECKS=1) also the lengths, page indices, depths, and that every query sees
    at least one key (``check_every_query_sees_a_key``)."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, T, Hq, D = q.shape
    if D == 0 or Hq == 0:
        raise ValueError(f"q {tuple(q.shape)} = [B, T, Hq, D] needs Hq >= 1 heads of D >= 1")
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=q.device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match"
        )
    check_dim("k_cache", k_cache, 3, D, "head dim D of q")
    Hkv = k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, not a multiple of the cache's {Hkv} KV heads")
    if block_table is None:
        check_dim("k_cache", k_cache, 0, B, "batch B of q")
        capacity = k_cache.shape[1]
    else:
        check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=q.device)
        check_dim("block_table", block_table, 0, B, "batch B of q")
        if k_cache.shape[1] == 0 or k_cache.shape[0] == 0:
            raise ValueError(
                f"paged k_cache must be [num_pages, page_size, Hkv, D] with pages, got "
                f"{tuple(k_cache.shape)}"
            )
        capacity = block_table.shape[1] * k_cache.shape[1]
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    check_dim("cache_seqlens", cache_seqlens, 0, B, "batch B of q")
    check_tensor("tree_mask", tree_mask, ndim=2, dtypes=(torch.bool, torch.int32),
                 device=q.device)  # fmt: skip
    W = (T + 31) // 32
    want = (T, T) if tree_mask.dtype == torch.bool else (T, W)
    if tuple(tree_mask.shape) != want:
        raise ValueError(
            f"tree_mask must be [T, T] = [{T}, {T}] (bool) or [T, ceil(T/32)] = [{T}, {W}] "
            f"(packed int32), got {tuple(tree_mask.shape)} {tree_mask.dtype}"
        )
    where = "the cache" if block_table is None else "max_pages * page_size of the paged cache"
    if T > capacity:
        raise ValueError(f"T = {T} tree tokens do not fit {where} ({capacity} slots)")
    if tree_depths is not None:
        check_tensor("tree_depths", tree_depths, ndim=1, dtypes=(torch.int32, torch.int64),
                     device=q.device)  # fmt: skip
        check_dim("tree_depths", tree_depths, 0, T, "T of q")
    if not check_values(q.device):
        return
    lengths = cache_seqlens.long()  # int64: 2**31 - 1 + T must not wrap
    if bool((lengths < 0).any()) or bool((lengths + T > capacity).any()):
        raise ValueError(
            f"cache_seqlens + T must lie in [T, S = {capacity}] for every sequence; "
            f"got cache_seqlens = {cache_seqlens.tolist()} with T = {T}"
        )
    if tree_depths is not None and T > 0:
        if bool((tree_depths < 0).any()) or bool((tree_depths >= T).any()):
            raise ValueError(f"tree_depths must lie in [0, T = {T}), got {tree_depths.tolist()}")
    if B > 0 and T > 0 and (sliding_window is not None or bool((lengths == 0).any())):
        check_every_query_sees_a_key(lengths, tree_mask, sliding_window, tree_depths)
    if block_table is not None:
        page = k_cache.shape[1]
        used = (lengths + T + page - 1) // page  # pages each sequence touches
        needed = torch.arange(block_table.shape[1], device=q.device)[None, :] < used[:, None]
        bad = needed & ((block_table < 0) | (block_table >= k_cache.shape[0]))
        if bool(bad.any()):
            b, p = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"block_table[{b}, {p}] = {int(block_table[b, p])} is not a page index in "
                f"[0, {k_cache.shape[0]}) though sequence {b} uses that page"
            )


def check_every_query_sees_a_key(lengths, tree_mask, sliding_window=None, tree_depths=None):
    """A ValueError naming the first (tree row, sequence) whose query would see no key: a mask
    row that sees no tree node (not even itself) over an empty prefix (or, with a window, no
    node and no prefix key inside it). Its softmax would be over nothing (NaN)."""
    T = tree_mask.shape[0]
    mask = tree_mask if tree_mask.dtype == torch.bool else unpack_tree_mask(tree_mask, T)
    depth = tree_node_depths(mask) if tree_depths is None else tree_depths.to(torch.long)
    sees_node = mask
    sees_prefix = (lengths >= 1)[:, None].expand(-1, T)  # [B, T]
    if sliding_window is not None:  # keys at positions > L + depth[t] - W
        sees_node = mask & (depth[None, :] > depth[:, None] - sliding_window)
        sees_prefix = sees_prefix & (depth <= sliding_window - 2)[None, :]
    blind = ~(sees_node.any(dim=1)[None, :] | sees_prefix)  # [B, T]
    if bool(blind.any()):
        b, t = (int(i) for i in blind.nonzero()[0])
        why = f"cache_seqlens[{b}] = {int(lengths[b])}"
        if sliding_window is not None:
            why += f" and sliding_window = {sliding_window} (depth {int(depth[t])})"
        raise ValueError(
            f"tree_mask row {t} sees no tree node (not even itself) and no prefix key ({why}): "
            f"query {t} of sequence {b} would attend to nothing (a softmax over no key is "
            "NaN); every tree node must see itself")


if HAS_TRITON:

    @triton.jit
    def _kv_rows(
        b, pos, bt_ptr, bt_stride_b, max_pages, num_pages, k_stride_b, k_stride_s, v_stride_b,
        v_stride_s, PAGED: tl.constexpr, PAGE: tl.constexpr,
    ):  # fmt: skip
        """int64 offsets of cache positions ``pos`` of sequence b in K and in V (page or batch,
        then slot; one block-table read serves both)."""
        if PAGED:
            i_pg = tl.minimum(pos // PAGE, max_pages - 1)  # clamped: always a valid table read
            page = tl.load(bt_ptr + b.to(tl.int64) * bt_stride_b + i_pg)
            page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)  # never outside
            slot = (pos % PAGE).to(tl.int64)
            return page * k_stride_b + slot * k_stride_s, page * v_stride_b + slot * v_stride_s
        else:
            slot = pos.to(tl.int64)
            return (b.to(tl.int64) * k_stride_b + slot * k_stride_s,
                    b.to(tl.int64) * v_stride_b + slot * v_stride_s)  # fmt: skip

    @triton.jit
    def _online_softmax(b_acc, b_m, b_l, b_s, b_v, DOT_PREC: tl.constexpr):
        """Fold scores b_s [M, N] (log2 domain) and values b_v [N, D] into (acc, max, sum). The
        running max starts finite (-1e30), so a row that has seen only -inf scores stays at
        p = 0, alpha = 1 without (-inf) - (-inf)."""
        m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.math.exp2(b_s - m_new[:, None])
        alpha = tl.math.exp2(b_m - m_new)
        b_l = b_l * alpha + tl.sum(b_p, 1)
        b_acc = b_acc * alpha[:, None]
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=DOT_PREC)
        return b_acc, m_new, b_l

    @triton.jit
    def _mask_word(mask_ptr, o_t, m_r, j, T, mask_stride_t, MASK_PACKED: tl.constexpr):
        """Word j of the packed tree-mask row of each tile row (bits of nodes 32j..32j+31)."""
        if MASK_PACKED:
            return tl.load(mask_ptr + o_t * mask_stride_t + j, mask=m_r, other=0)
        else:  # pack 32 bools of the row
            o_c = 32 * j + tl.arange(0, 32)
            b_c = tl.load(mask_ptr + o_t[:, None] * mask_stride_t + o_c[None, :],
                          mask=m_r[:, None] & (o_c < T)[None, :], other=0)  # fmt: skip
            return tl.sum((b_c != 0).to(tl.int32) << tl.arange(0, 32)[None, :], 1)

    @triton.jit
    def _scores(b_q, b_k, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
        """Scores [M, N] in the log2 domain: ``scale * q . k``, or with SOFTCAP Gemma-2's
        ``softcap * tanh(scale * q . k / softcap)`` (tanh x = 1 - 2 / (1 + e^2x); cap_in =
        2 log2(e) scale / softcap, cap_out = log2(e) softcap)."""
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        if SOFTCAP:
            return cap_out * (1.0 - 2.0 / (1.0 + tl.math.exp2(b_s * cap_in)))
        else:
            return b_s * qk_scale

    @triton.jit
    def _prefix_block(
        b_acc, b_m, b_l, b_q, k_head, v_head, i_b, start, seen_lo, seen_hi, first_r, m_d,
        bt_ptr, bt_stride_b, max_pages, num_pages, k_stride_b, k_stride_s, v_stride_b,
        v_stride_s, qk_scale, cap_in, cap_out,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGED: tl.constexpr, PAGE: tl.constexpr, MASKED: tl.constexpr, WINDOW: tl.constexpr,
        SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        """Fold prefix slots ``start + [0, BLOCK_N)`` in. MASKED: only slots in [seen_lo,
        seen_hi) are loaded (the others' values never reach the output, even NaN); WINDOW:
        row r sees slots >= first_r[r]."""
        pos = start + tl.arange(0, BLOCK_N)
        r_k, r_v = _kv_rows(i_b, pos, bt_ptr, bt_stride_b, max_pages, num_pages, k_stride_b,
                            k_stride_s, v_stride_b, v_stride_s, PAGED, PAGE)  # fmt: skip
        if MASKED:
            m_n = (pos >= seen_lo) & (pos < seen_hi)
            m_kv = m_n[:, None] & m_d[None, :]
            b_k = tl.load(k_head + r_k[:, None], mask=m_kv, other=0.0)
            b_v = tl.load(v_head + r_v[:, None], mask=m_kv, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            b_k = tl.load(k_head + r_k[:, None])
            b_v = tl.load(v_head + r_v[:, None])
        else:
            b_k = tl.load(k_head + r_k[:, None], mask=m_d[None, :], other=0.0)
            b_v = tl.load(v_head + r_v[:, None], mask=m_d[None, :], other=0.0)
        b_s = _scores(b_q, b_k, qk_scale, cap_in, cap_out, SOFTCAP, DOT_PREC)
        if MASKED:
            b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        if WINDOW:
            b_s = tl.where(pos[None, :] >= first_r[:, None], b_s, float("-inf"))
        return _online_softmax(b_acc, b_m, b_l, b_s, b_v, DOT_PREC)

    @triton.jit
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, seqlens_ptr, mask_ptr, depth_ptr, bt_ptr, o_ptr, op_ptr, lse_ptr,
        qk_scale, cap_in, cap_out, window, T, Hkv, capacity, max_pages, num_pages, num_splits,
        q_stride_b, q_stride_t, q_stride_h, q_stride_d,
        k_stride_b, k_stride_s, k_stride_h, k_stride_d,
        v_stride_b, v_stride_s, v_stride_h, v_stride_d,
        o_stride_b, o_stride_t, o_stride_h,
        mask_stride_t, bt_stride_b,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TREE_N: tl.constexpr, SPLIT: tl.constexpr,
        PAGED: tl.constexpr, PAGE: tl.constexpr, MASK_PACKED: tl.constexpr,
        MASK_WORDS: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):  # fmt: skip
        i_m, i_bh, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b, i_kv = i_bh // Hkv, i_bh % Hkv
        R = T * G
        o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows r = t * G + g
        o_t, o_h = o_r // G, i_kv * G + o_r % G
        m_r = o_r < R
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < HEAD_DIM

        L = tl.load(seqlens_ptr + i_b)
        L = tl.minimum(tl.maximum(L, 0), capacity - T)  # unchecked lengths stay in the cache
        # the window: row r (tree node t at position L + depth[t]) sees slots >= first_r; the
        # tile reads slots >= w_lo (some row sees them)
        w_lo = 0
        first_r = w_lo
        if WINDOW:
            d_r = tl.load(depth_ptr + o_t, mask=m_r, other=0)
            first_r = L + d_r - window + 1
            w_lo = tl.maximum(tl.min(tl.where(m_r, first_r, L + T), 0), 0)
        # this split's share of the prefix blocks [w_lo // BLOCK_N, cdiv(L, BLOCK_N)), from the
        # length on the device: blocks wholly outside the window are never read
        blk_lo = w_lo // BLOCK_N
        per_split = tl.cdiv(tl.maximum(tl.cdiv(L, BLOCK_N) - blk_lo, 0), num_splits) * BLOCK_N
        lo = blk_lo * BLOCK_N + i_s * per_split
        hi = tl.maximum(tl.minimum(lo + per_split, L), lo)
        # and its chunks of TREE_N tree nodes: chunk j goes to split splits - 1 - j % splits,
        # so the tree is spread over the last splits (the last has the smallest prefix share)
        u_lo = (num_splits - 1 - i_s) * TREE_N

        p_q = (q_ptr + i_b.to(tl.int64) * q_stride_b + o_t[:, None] * q_stride_t
               + o_h[:, None] * q_stride_h + o_d[None, :] * q_stride_d)  # fmt: skip
        b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)
        k_head = k_ptr + i_kv.to(tl.int64) * k_stride_h + o_d[None, :] * k_stride_d
        v_head = v_ptr + i_kv.to(tl.int64) * v_stride_h + o_d[None, :] * v_stride_d

        b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        b_m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: see _online_softmax
        b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
        if WINDOW:  # the block holding w_lo: its slots before w_lo are not loaded
            if lo < w_lo:
                b_acc, b_m, b_l = _prefix_block(
                    b_acc, b_m, b_l, b_q, k_head, v_head, i_b, lo, w_lo, hi, first_r, m_d,
                    bt_ptr, bt_stride_b, max_pages, num_pages, k_stride_b, k_stride_s, v_stride_b,
                    v_stride_s, qk_scale, cap_in, cap_out, BLOCK_N, BLOCK_D, HEAD_DIM, PAGED,
                    PAGE, True, WINDOW, SOFTCAP, DOT_PREC)  # fmt: skip
                lo = tl.minimum(lo + BLOCK_N, hi)
        hi_full = lo + (hi - lo) // BLOCK_N * BLOCK_N
        for start in range(lo, hi_full, BLOCK_N):  # full prefix blocks: no load masks
            b_acc, b_m, b_l = _prefix_block(
                b_acc, b_m, b_l, b_q, k_head, v_head, i_b, start, lo, hi, first_r, m_d,
                bt_ptr, bt_stride_b, max_pages, num_pages, k_stride_b, k_stride_s, v_stride_b,
                v_stride_s, qk_scale, cap_in, cap_out, BLOCK_N, BLOCK_D, HEAD_DIM, PAGED, PAGE,
                False, WINDOW, SOFTCAP, DOT_PREC)  # fmt: skip
        if hi_full < hi:  # the last, partial prefix block
            b_acc, b_m, b_l = _prefix_block(
                b_acc, b_m, b_l, b_q, k_head, v_head, i_b, hi_full, lo, hi, first_r, m_d,
                bt_ptr, bt_stride_b, max_pages, num_pages, k_stride_b, k_stride_s, v_stride_b,
                v_stride_s, qk_scale, cap_in, cap_out, BLOCK_N, BLOCK_D, HEAD_DIM, PAGED, PAGE,
                True, WINDOW, SOFTCAP, DOT_PREC)  # fmt: skip
        # the tile rows' packed tree-mask words (at most 4 a row), loaded only now so they are
        # not live across the prefix loop; only splits with tree chunks read them
        m_w = o_r < tl.where(u_lo < T, R, 0)
        b_w0 = _mask_word(mask_ptr, o_t, m_w, 0, T, mask_stride_t, MASK_PACKED)
        b_w1 = b_w0
        b_w2 = b_w0
        b_w3 = b_w0
        if MASK_WORDS > 1:
            b_w1 = _mask_word(mask_ptr, o_t, m_w, 1, T, mask_stride_t, MASK_PACKED)
        if MASK_WORDS > 2:
            b_w2 = _mask_word(mask_ptr, o_t, m_w, 2, T, mask_stride_t, MASK_PACKED)
        if MASK_WORDS > 3:
            b_w3 = _mask_word(mask_ptr, o_t, m_w, 3, T, mask_stride_t, MASK_PACKED)
        # this split's tree chunks: positions L + u under the tree mask
        o_n = tl.arange(0, TREE_N)
        for u0 in tl.range(u_lo, T, num_splits * TREE_N, num_stages=1):
            o_u = u0 + o_n
            m_u = o_u < T
            pos = L + o_u
            r_k, r_v = _kv_rows(i_b, pos, bt_ptr, bt_stride_b, max_pages, num_pages,
                                k_stride_b, k_stride_s, v_stride_b, v_stride_s, PAGED,
                                PAGE)  # fmt: skip
            m_kv = m_u[:, None] & m_d[None, :]
            b_k = tl.load(k_head + r_k[:, None], mask=m_kv, other=0.0)
            b_v = tl.load(v_head + r_v[:, None], mask=m_kv, other=0.0)
            b_s = _scores(b_q, b_k, qk_scale, cap_in, cap_out, SOFTCAP, DOT_PREC)
            i_w = o_u // 32
            sh = o_u % 32
            seen = (b_w0[:, None] >> sh[None, :]) & 1
            if MASK_WORDS > 1:
                seen = tl.where((i_w == 1)[None, :], (b_w1[:, None] >> sh[None, :]) & 1, seen)
            if MASK_WORDS > 2:
                seen = tl.where((i_w == 2)[None, :], (b_w2[:, None] >> sh[None, :]) & 1, seen)
            if MASK_WORDS > 3:
                seen = tl.where((i_w == 3)[None, :], (b_w3[:, None] >> sh[None, :]) & 1, seen)
            seen = (seen != 0) & m_u[None, :]
            if WINDOW:  # node u at position L + depth[u]
                d_u = tl.load(depth_ptr + o_u, mask=m_u, other=0)
                seen = seen & (d_u[None, :] > (d_r - window)[:, None])
            b_s = tl.where(seen, b_s, float("-inf"))
            b_acc, b_m, b_l = _online_softmax(b_acc, b_m, b_l, b_s, b_v, DOT_PREC)

        m_out = m_r[:, None] & m_d[None, :]
        if not SPLIT:
            # padding rows, and a query that saw no key (refused where values are checked): 0
            b_o = b_acc / tl.where(m_r & (b_l > 0.0), b_l, 1.0)[:, None]
            p_o = (o_ptr + i_b.to(tl.int64) * o_stride_b + o_t[:, None] * o_stride_t
                   + o_h[:, None] * o_stride_h + o_d[None, :])  # fmt: skip
            tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_out)
        else:  # partial [B * Hkv, splits, R, D] and its log2-sum-exp2 [B * Hkv, splits, R]
            l_safe = tl.where(b_l == 0.0, 1.0, b_l)  # an empty split: lse -inf, weight 0
            b_o = b_acc / l_safe[:, None]
            lse = tl.where(b_l == 0.0, float("-inf"), b_m + tl.math.log2(l_safe))
            row = (i_bh * num_splits + i_s).to(tl.int64) * R + o_r
            tl.store(op_ptr + row[:, None] * HEAD_DIM + o_d[None, :], b_o, mask=m_out)
            tl.store(lse_ptr + row, lse, mask=m_r)

    @triton.jit
    def _tree_attention_merge_kernel(
        op_ptr, lse_ptr, o_ptr,
        T, Hkv, num_splits,
        o_stride_b, o_stride_t, o_stride_h,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,
    ):  # fmt: skip
        """out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max) over the splits' partials of
        BLOCK_R rows: every log-sum-exp in one load (BLOCK_S >= splits), then the partials
        CHUNK_S splits per load, so 8 splits cost 2 dependent round trips instead of 16."""
        i_r, i_bh = tl.program_id(0), tl.program_id(1)
        i_b, i_kv = i_bh // Hkv, i_bh % Hkv
        R = T * G
        o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < HEAD_DIM
        o_s = tl.arange(0, BLOCK_S)
        base = i_bh.to(tl.int64) * num_splits * R
        p_lse = lse_ptr + base + o_s[:, None] * R + o_r[None, :]  # [BLOCK_S, BLOCK_R]
        m_lse = (o_s < num_splits)[:, None] & m_r[None, :]
        b_max = tl.max(tl.load(p_lse, mask=m_lse, other=float("-inf")), 0)
        b_max = tl.where(b_max == float("-inf"), 0.0, b_max)  # a row no split saw
        b_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        b_den = tl.zeros([BLOCK_R], dtype=tl.float32)
        for s0 in range(0, num_splits, CHUNK_S):
            o_c = s0 + tl.arange(0, CHUNK_S)
            m_c = (o_c < num_splits)[:, None] & m_r[None, :]  # [CHUNK_S, BLOCK_R]
            row = base + o_c[:, None] * R + o_r[None, :]
            b_w = tl.math.exp2(tl.load(lse_ptr + row, mask=m_c, other=float("-inf"))
                               - b_max[None, :])  # fmt: skip
            b_o = tl.load(op_ptr + row[:, :, None] * HEAD_DIM + o_d[None, None, :],
                          mask=m_c[:, :, None] & m_d[None, None, :], other=0.0)  # fmt: skip
            b_acc += tl.sum(b_w[:, :, None] * b_o, 0)
            b_den += tl.sum(b_w, 0)
        b_out = b_acc / tl.where(m_r & (b_den > 0.0), b_den, 1.0)[:, None]  # saw no key: 0
        o_t, o_h = o_r // G, i_kv * G + o_r % G
        p_o = (o_ptr + i_b.to(tl.int64) * o_stride_b + o_t[:, None] * o_stride_t
               + o_h[:, None] * o_stride_h + o_d[None, :])  # fmt: skip
        tl.store(p_o, b_out.to(o_ptr.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


class _Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int  # CTAs resident per SM as compiled for sm_90: the split count's base

    @property
    def max_regs(self) -> int | None:
        """The register budget that keeps ``ctas_per_sm`` CTAs on an SM (``maxnreg``), where it
        is below the 255 a thread can have anyway: a compiler that needs more must spill (the
        AOT test fails) rather than silently lose a CTA."""
        budget = 65536 // (self.ctas_per_sm * self.num_warps * 32) // 8 * 8
        return budget if budget < 255 else None


PLAN_ARCH = 90  # the GPU the CPU / interpreter path plans launches for (compute capability)


def _config(rows: int, D: int, dtype: torch.dtype, arch: int = 90) -> _Config:
    """Launch configuration for R = T * G rows on compute capability ``arch`` (see the module
    doc; to be tuned on the GPU)."""
    if dtype == torch.float32:  # correctness path: fp32 dots spill at larger tiles
        return _Config(16, 32, 4, 2, 2)
    if arch < 90:  # mma.sync holds the operands in registers: smaller tiles than wgmma's
        if rows <= 16:
            return _Config(16, 128 if D <= 64 else 64, 4, 3, 2)
        if rows <= 64:
            return _Config(32, 64, 4, 3, 2)
        return _Config(128, 32, 8, 3, 1)
    if D <= 64:
        if rows <= 16:
            return _Config(16, 128, 4, 3, 3)
        if rows <= 64:
            return _Config(32 if rows <= 32 else 64, 128, 4, 3, 2)
        return _Config(128, 64, 8, 3, 2)
    if rows <= 16:
        return _Config(16, 64, 4, 3, 3)
    if rows <= 32:
        return _Config(32, 64, 4, 3, 2)
    if rows <= 64:
        return _Config(64, 64, 4, 2, 2)
    return _Config(128, 64, 8, 3, 1)


def _num_splits(programs: int, capacity: int, cfg: _Config, rows: int, device) -> int:
    """Splits of the prefix from static shapes only: one wave of ``ctas_per_sm`` programs per SM,
    at least 2 (decode) or 4 key blocks of the cache capacity per split, at most 128."""
    want = cfg.ctas_per_sm * sm_count(device) // programs
    most = max(1, capacity // ((2 if rows <= 16 else 4) * cfg.block_n))
    return max(1, min(want, most, 128))


def _tree_chunk(T: int, num_splits: int, block_n: int) -> int:
    """Tree nodes per chunk: the T tree keys spread over up to ``num_splits`` splits in chunks
    of 16 to BLOCK_N keys, so no split walks a whole tree block on top of its prefix share."""
    return max(16, min(block_n, triton.next_power_of_2(triton.cdiv(T, num_splits))))


def _merge_blocks(num_splits: int, rows: int, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_R, CHUNK_S) of the merge: all splits' log-sum-exps at once (a power-of-two
    bound), partials in chunks of up to 16 splits x BLOCK_R rows = 8192 fp32 (64 registers a
    thread at 4 warps; more rows per program where fewer splits fill the chunk)."""
    block_s = triton.next_power_of_2(num_splits)
    chunk_s = min(block_s, 16)
    block_r = max(1, min(triton.next_power_of_2(rows), 8192 // (chunk_s * block_d)))
    chunk_s = max(chunk_s, min(block_s, 8192 // (block_r * block_d)))  # few rows: more splits
    return block_s, block_r, chunk_s


def tree_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    block_table: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    tree_depths: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launcher of the split-KV tree attention kernel (arguments as ``tree_attention``, already
    checked). ``num_splits``, ``block_m`` and ``block_n`` override the static choices (tests,
    tuning; ``block_m`` takes the warps and stages of the rows-per-tile config it names).
    Returns a new contiguous [B, T, Hq, D] tensor in q's dtype; no host sync.
    """
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    if D not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"tree_attention: the triton backend supports head dims {TRITON_HEAD_DIMS}, "
            f"got D = {D} (use backend='torch')"
        )
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"tree_attention: the triton backend supports q dtypes "
            f"{[str(d) for d in TRITON_DTYPES]}, got {q.dtype} (use backend='torch')"
        )
    if T > MAX_TREE:
        raise ValueError(f"tree_attention: the triton backend supports T <= {MAX_TREE}, got {T}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0 or T == 0:
        return out
    R = T * G
    arch = cuda_arch(q.device) if q.device.type == "cuda" else PLAN_ARCH
    cfg = _config(R if block_m is None else min(R, block_m), D, q.dtype, arch)
    cfg = cfg._replace(block_m=block_m or cfg.block_m, block_n=block_n or cfg.block_n)
    bm, bn = cfg.block_m, cfg.block_n
    row_blocks = triton.cdiv(R, bm)
    paged = block_table is not None
    if paged:
        page, max_pages, num_pages = k_cache.shape[1], block_table.shape[1], k_cache.shape[0]
        capacity, bt, bt_stride_b = page * max_pages, block_table, block_table.stride(0)
    else:
        page, max_pages, num_pages, capacity = 1, 1, 1, k_cache.shape[1]
        bt, bt_stride_b = cache_seqlens, 0  # unused
    # a window of at least S keys sees the whole cache (node positions are < S): none at all
    window = sliding_window if sliding_window is not None and sliding_window < capacity else None
    if window is not None:
        depths = tree_node_depths(tree_mask) if tree_depths is None else tree_depths
        depths = depths.to(torch.int32).contiguous()
    else:
        window, depths = 0, cache_seqlens  # unused
    packed = tree_mask.dtype == torch.int32
    mask = tree_mask.contiguous() if packed else tree_mask.contiguous().view(torch.uint8)
    block_d = triton.next_power_of_2(D)
    log2e = math.log2(math.e)
    cap_in = 0.0 if softcap is None else 2.0 * log2e * scale / softcap
    cap_out = 0.0 if softcap is None else log2e * softcap

    def launch_args(o_part, lse, splits):
        args = (
            q, k_cache, v_cache, cache_seqlens, mask, depths, bt, out, o_part, lse,
            scale * log2e, cap_in, cap_out, window, T, Hkv, capacity, max_pages, num_pages,
            splits,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            out.stride(0), out.stride(1), out.stride(2),
            mask.stride(0), bt_stride_b,
        )  # fmt: skip
        kwargs = dict(
            G=G, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
            TREE_N=_tree_chunk(T, splits, bn), SPLIT=splits > 1,
            PAGED=paged, PAGE=page, MASK_PACKED=packed, MASK_WORDS=triton.cdiv(T, 32),
            WINDOW=bool(window), SOFTCAP=softcap is not None,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if cfg.max_regs is not None:
            kwargs["maxnreg"] = cfg.max_regs
        return args, kwargs

    planned = num_splits is None
    if planned:  # a window reads at most W + T - 1 keys a row
        keys = capacity if not window else min(capacity, window + T)
        num_splits = _num_splits(B * Hkv * row_blocks, keys, cfg, R, q.device)
    if num_splits > 1 and (planned or _backend.CAPTURE_OCCUPANCY is not None):
        # the CTAs/SM as compiled on this GPU (elsewhere the static value; the AOT capture
        # records it to check it against the sm_90 compile)
        scratch = torch.empty(16, dtype=torch.float32, device=q.device)
        ctas = ctas_per_sm(_tree_attention_kernel, *launch_args(scratch, scratch, num_splits),
                           cfg.ctas_per_sm, q.device)
        if planned and ctas != cfg.ctas_per_sm:
            num_splits = _num_splits(B * Hkv * row_blocks, keys, cfg._replace(ctas_per_sm=ctas),
                                     R, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_splits > 1:
        o_part = torch.empty(B * Hkv, num_splits, R, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B * Hkv, num_splits, R, dtype=torch.float32, device=q.device)
    else:
        o_part = lse = out  # unused
    args, kwargs = launch_args(o_part, lse, num_splits)
    _tree_attention_kernel[(row_blocks, B * Hkv, num_splits)](*args, **kwargs)
    if num_splits > 1:
        block_s, block_r, chunk_s = _merge_blocks(num_splits, R, block_d)
        _tree_attention_merge_kernel[(triton.cdiv(R, block_r), B * Hkv)](
            o_part, lse, out, T, Hkv, num_splits, out.stride(0), out.stride(1), out.stride(2),
            G=G, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_S=block_s, CHUNK_S=chunk_s,
            num_warps=8,
        )  # fmt: skip
    return out


def triton_supports(q: torch.Tensor) -> bool:
    """Whether "auto" takes the Triton kernel for q: D in TRITON_HEAD_DIMS, fp16/bf16 (fp32 runs
    only when asked for: its dots spill registers) and T <= MAX_TREE."""
    return (
        q.shape[-1] in TRITON_HEAD_DIMS
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[1] <= MAX_TREE
    )


_IMPLS = {"torch": tree_attention_ref}
if HAS_TRITON:
    _IMPLS["triton"] = tree_attention_triton


@torch.library.custom_op("medusa_kernels::tree_attention", mutates_args=())
def _tree_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float,
    backend: str,
    block_table: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    tree_depths: torch.Tensor | None = None,
) -> torch.Tensor:
    return _IMPLS[backend](
        q, k_cache, v_cache, cache_seqlens, tree_mask, softmax_scale, block_table=block_table,
        sliding_window=sliding_window, softcap=softcap, tree_depths=tree_depths,
    )


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, tree_mask, softmax_scale, backend, block_table=None,
      sliding_window=None, softcap=None, tree_depths=None):
    return q.new_empty(q.shape)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    block_table: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    tree_depths: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of T tree tokens over the cached prefix plus the tree nodes each may see.

    Args:
        q: [B, T, Hq, D] fp16/bf16/fp32 queries of the tree tokens.
        k_cache, v_cache: [B, S, Hkv, D], same dtype; the tree's own keys/values already stored
            at positions [cache_seqlens[b], cache_seqlens[b] + T). Hq must be a multiple of Hkv.
            With ``block_table``: paged caches [num_pages, page_size, Hkv, D].
        cache_seqlens: [B] int32 prefix lengths in [0, S - T]. On CPU tensors (and on CUDA
            with MEDUSA_KERNELS_CHECKS=1, one host sync) a length outside raises a ValueError,
            as does a page index out of range or a depth outside [0, T). On CUDA without it
            nothing is read on the host: the kernel clamps each length to [0, S - T] and each
            page index to [0, num_pages), so a bad value gives a wrong answer for its own
            sequence but never a read outside the cache.
        tree_mask: [T, T] bool, or packed int32 [T, ceil(T / 32)] (``pack_tree_mask``: bit
            u % 32, LSB first, of word u // 32 of row t); row t says which tree nodes query t
            sees (itself and its ancestors). The prefix is always visible. A query that would
            see no key (a row without itself over an empty prefix, or outside the window) is
            a ValueError where values are checked (CPU; CUDA with MEDUSA_KERNELS_CHECKS=1); on
            CUDA without the checks its output is 0 (never NaN).
        softmax_scale: defaults to 1 / sqrt(D) (Gemma's query_pre_attn_scalar s: s ** -0.5).
        block_table: optional [B, max_pages] int32 page indices of each sequence (paged KV, as
            ``flash_attn_with_kvcache``); position p is slot p % page_size of page
            block_table[b, p // page_size].
        sliding_window: W >= 1, or None for full attention. Tree node t sits at position
            ``L_b + tree_depths[t]`` and sees only keys at positions ``> its position - W``
            (W keys including itself: transformers' ``kv_idx > q_idx - sliding_window``, the
            rule of Mistral, Qwen2, Gemma-2 and Gemma-3). The cache is a full one (slot p holds
            position p; a rolling cache of W slots is a later step); only the window is read.
        softcap: Gemma-2's attention logit soft-capping, ``softcap * tanh(scores / softcap)``
            on the scaled scores before the mask, or None.
        tree_depths: [T] int depth of each tree node (its position offset after the prefix),
            only read with ``sliding_window``; default: each mask row's set bits minus one.
        backend: "auto" (Triton on CUDA tensors with D in 64/80/96/128, fp16/bf16 and T <= 128;
            the reference elsewhere), "torch" (the reference) or "triton" (also fp32; other
            head dims, float64 or T > 128 raise a ValueError).
    Returns:
        [B, T, Hq, D] in q's dtype (empty for B = 0 or T = 0, on every backend). Values in
        slots no query sees (past L + T, before the window) never reach it, even NaN.

    Example: plain decode is ``tree_attention(q[:, :1], k, v, lens, torch.ones(1, 1, dtype=bool))``.
    """
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(
            sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be an int >= 1 or None, got {sliding_window!r}")
    check_tree_attention_args(q, k_cache, v_cache, cache_seqlens, tree_mask, block_table,
                              tree_depths, sliding_window)  # fmt: skip
    for name, value in (("softcap", softcap), ("softmax_scale", softmax_scale)):
        if value is not None and check_real(name, value) <= 0:
            raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
    impl = pick_backend("tree_attention", backend, q.device, _IMPLS,
                        triton_ok=triton_supports(q))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _tree_attention_op(
        q, k_cache, v_cache, cache_seqlens, tree_mask, float(scale), impl, block_table,
        sliding_window, None if softcap is None else float(softcap), tree_depths,
    )
