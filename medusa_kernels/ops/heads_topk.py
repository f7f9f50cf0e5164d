"""Medusa heads (one ResBlock + vocabulary projection each) fused with top-k, and the base
model's lm_head fused with top-k.

For token n and head k::

    h'[n, k]     = h[n] + SiLU(W1[k] h[n] + b1[k])
    logits[n, k] = W2[k] h'[n, k]
    values, indices = top-k of logits[n, k] over the vocabulary, sorted descending

``lm_head_topk`` is the same without the ResBlock and with one head: top-k of ``W h[n]``, or
with final logit soft-capping (Gemma-2) of ``softcap * tanh(W h[n] / softcap)``.

Shapes: N tokens, d hidden size, K heads, V vocabulary, k top-k width.

Ties: equal logits are ordered by the lower vocabulary index first, in every backend
(``topk_lower_index_first``: a stable descending sort; -0.0 equals +0.0, NaN sorts first). The
Triton kernels rank candidates by one int64 key per (value, index): the fp32 value's bits mapped
to an order-preserving int32 (-0.0 read as +0.0, every NaN as the positive quiet NaN, above
+inf) in the high half and ``2**31 - 1 - index`` in the low half. Keys are distinct, their order
is (value descending, index ascending), so the result is deterministic and equals a stable
descending sort of the logits the kernel computed.

Triton path (``backend="triton"``), three launches, no host sync, no ``[N, K, V]`` logits:

1. ``_resblock_kernel``: grid ``(token blocks, programs)``; the ``K * cdiv(d, BLOCK_O)`` row
   tiles of W1 are split evenly over one wave of programs (each a run of whole tiles); a tile
   is BLOCK_O output rows of ``W1[k] h`` for all tokens of the block (W1 read once), plus b1,
   SiLU and the residual, written to ``h'`` ``[K, N, d]`` (tiny; fp32 for N = 1, else in the
   weights' dtype).
2. ``_vocab_topk_kernel``: grid ``(token blocks, chunks, K)``; chunk c of head k covers rows
   ``[c * R, (c + 1) * R)`` of ``W2[k]`` (R a whole number of BLOCK_V tiles, as few as let all
   programs fit one wave of the GPU, so that every program moves the same bytes). It walks
   its rows in tiles of BLOCK_V, computes the tile's logits for all tokens of its block and
   merges their keys into a running top-k list per token kept in registers; a tile none of whose
   keys beats any token's k-th key skips the merge (most tiles once the lists have filled).
   It writes its k best keys per token: the partial lists ``[K, N, chunks, k]`` int64.
3. ``_merge_topk_kernel``: grid ``(N, K)``; merges the ``chunks * k`` keys of one (token, head)
   in blocks of BLOCK_C (the same skip) and decodes the sorted top-k into values / indices.

A merge of the running list with a block of candidate keys repeats k times: take the largest
key of both, append it to the new list, remove it (two max-reductions per step).

Precision: logits accumulate in fp32. With one token (N = 1) the projections are GEMVs on CUDA
cores with h and h' in fp32, as the reference computes. With N >= 2 they are tensor-core dots
of [BLOCK_V, BLOCK_D] weight tiles with [BLOCK_D, BLOCK_N] token tiles (BLOCK_N = 16..64, the
tokens padded): h' is rounded to the weights' dtype for the dot (as a bf16 ``nn.Linear`` head
does), so near-ties may order differently from the fp32 reference. Soft-capping uses a tanh
built from exp (``_tanh``: within a few ulp of torch.tanh, exactly +-1 where torch's is).

Weight reads: W1 and W2 each read once per call for N <= 64 (one token block). Larger N runs
``cdiv(N, 64)`` token blocks; the grid puts them fastest, so the programs of one chunk start
together, stream the same rows at the same pace and all but the first find them in L2 (the
weights are read from HBM about once, not once per token block).

Every d loop is a ``cp.async`` ring of ``num_stages`` buffers (``num_stages - 1`` trips in
flight; 16-byte copies along d when d's stride is 1 and d a multiple of 8, which Triton
specialises), feeding FMAs in the GEMV and wgmma in the dots.

Launch configuration (``_config``, ``_chunks``, ``_resblock_grid``): chosen from the sm_90
compile (registers, shared memory, CTAs per SM, instructions: ``python bench/static_report.py``
records them under bench/results/, with the derivations); TO BE TUNED ON THE GPU. Programs per
SM: on CUDA read from the compiled kernel at its first launch (``ops._backend.ctas_per_sm``),
elsewhere ``SM90_CTAS_PER_SM`` (what the sm_90 compile gives; test_triton_compile.py checks):

- N = 1 (GEMV, 4 warps, 5 stages, 8 KB per trip): stage 2 BLOCK_V 32 x BLOCK_D 128, stage 1
  BLOCK_O 8 x BLOCK_I 512 (106-120 registers: 4 programs and 128 KB of weights in flight per
  SM; small row tiles keep the one-wave split even: 10 tiles per chunk at V 32000, 5 per
  ResBlock program);
- 2 <= N <= 32 (dot, BLOCK_N max(16, next_pow2(N)), 4 warps, 5 stages): BLOCK_V 64 x BLOCK_D
  64, stage 1 BLOCK_O 64 (wgmma); at BLOCK_N 16, 51 KB of shared memory and up to 128
  registers: 4 programs per SM at any k;
- 32 < N (dot, BLOCK_N 64, 8 warps, 5 stages): BLOCK_V 64, stage 1 BLOCK_O 32 (83 KB; top-1:
  about 100 registers, 2 programs per SM; top-10: about 210 registers, 1: the running top-k
  list sits in the wgmma accumulator layout, replicated over its 4 row warps);
- fp32 (interpreter tests; on the GPU when asked for): small tiles, BLOCK_N <= 16, 8 warps (4
  left ptxas spilling a few bytes in some), IEEE dots;
- chunks per head: ``floor(programs per SM * SMs / (K * token blocks))`` (one full wave), each
  a whole number of BLOCK_V tiles (Vicuna-7B heads: 100 chunks of 320 rows at N = 1);
- stage 3: BLOCK_C 1024 (fp32: 256), 4 warps, one compiled kernel per k whatever the chunk
  count (N and the candidate count are not specialised).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._backend import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_dim,
    check_tensor,
    ctas_per_sm,
    pick_backend,
    sm_count,
)
from ._linear import linear, skinny

if HAS_TRITON:
    import triton
    import triton.language as tl

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TOPK = 32  # the Triton kernels keep k candidates per token in registers
MAX_BLOCK_N = 64  # tokens per program (16 in fp32); more tokens run several token blocks
NO_INDEX = 2**31 - 1  # index of an empty slot in a candidate list (sorts after every index)


def topk_lower_index_first(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, sorted descending, ties broken by the lower index first.

    A stable descending sort of the whole row, or on the CPU (no device to sync with) a
    shortcut with the same result: ``torch.topk``'s k + 1 largest, then those k sorted by
    (value descending, index ascending). When the (k+1)-th value is below the k-th, those k are
    exactly the elements >= the k-th value; otherwise (a tie across the cut, or NaN) the sort.
    """
    V = logits.shape[-1]
    if logits.device.type == "cpu" and k < V and logits.numel() and \
            not torch.compiler.is_compiling():
        values, indices = torch.topk(logits, k + 1, dim=-1)  # sorted descending
        if not bool((values[..., k] >= values[..., k - 1]).any() | values.isnan().any()):
            by_index, order = indices[..., :k].sort(dim=-1)
            values, order = values.gather(-1, order).sort(dim=-1, descending=True, stable=True)
            return values, by_index.gather(-1, order)
    values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
    return values[..., :k].contiguous(), indices[..., :k].contiguous()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def medusa_heads_topk_ref(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch heads + top-k (the ground truth and the ``torch`` backend).

    hidden: [N, d]; w1: [K, d, d] (out x in); b1: [K, d]; w2: [K, V, d].
    Computes in fp32 (float64 for float64 inputs). Returns (values [N, K, k] float32,
    indices [N, K, k] int64).
    """
    dtype = _compute_dtype(hidden)
    h = hidden.to(dtype)
    h_res = resblocks_ref(h, w1.to(dtype), b1.to(dtype))  # [N, K, d]
    w2 = w2.to(dtype)
    if skinny(h.shape[0], w2[0]):  # heads streaming from memory: ``linear``'s call, per head
        logits = torch.stack([linear(h_res[:, i], w2[i], stream=True)
                              for i in range(w2.shape[0])], 1)
    else:
        logits = torch.einsum("nkd,kvd->nkv", h_res, w2)
    values, indices = topk_lower_index_first(logits, k)
    return values.float(), indices


def resblocks_ref(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """Each head's ResBlock on the same hidden: h [N, d], w1 [K, d, d], b1 [K, d] (h's dtype)
    -> h + silu(h @ w1[k].T + b1[k]) [N, K, d]."""
    z = torch.einsum("nd,ked->nke", h, w1) + b1
    return h[:, None, :] + torch.nn.functional.silu(z)


def lm_head_topk_ref(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch lm_head + top-k: hidden [N, d], weight [V, d] -> (values [N, k] float32,
    indices [N, k] int64). Computes in fp32 (float64 for float64 inputs); ``softcap`` caps the
    logits first as Gemma-2's ``final_logit_softcapping`` does in transformers: divide, tanh,
    multiply."""
    dtype = _compute_dtype(hidden)
    logits = linear(hidden.to(dtype), weight.to(dtype))
    if softcap is not None:
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    if k == 1:  # argmax returns the first maximum: the same tie rule, without a sort over V
        values, indices = logits.max(dim=-1, keepdim=True)
        return values.float(), logits.argmax(dim=-1, keepdim=True)
    values, indices = topk_lower_index_first(logits, k)
    return values.float(), indices


def _check_k(k, V: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in [1, V = {V}], got {k!r}")


def check_resblock_args(hidden, w1, b1) -> tuple[int, int]:
    """hidden [N, d], w1 [K, d, d], b1 [K, d] (the heads' ResBlocks) -> (K, d)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    d = hidden.shape[1]
    check_tensor("w1", w1, ndim=3, dtypes=(hidden.dtype,), device=hidden.device)
    K = w1.shape[0]
    if K < 1:
        raise ValueError(f"w1 must hold K >= 1 heads, got shape {tuple(w1.shape)}")
    if tuple(w1.shape) != (K, d, d):
        raise ValueError(f"w1 must be [K, d, d] with d = {d} (hidden's), got {tuple(w1.shape)}")
    check_tensor("b1", b1, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    if tuple(b1.shape) != (K, d):
        raise ValueError(f"b1 must be [K, d] = [{K}, {d}], got {tuple(b1.shape)}")
    return K, d


def check_heads_topk_args(hidden, w1, b1, w2, k) -> None:
    K, d = check_resblock_args(hidden, w1, b1)
    check_tensor("w2", w2, ndim=3, dtypes=(hidden.dtype,), device=hidden.device)
    check_dim("w2", w2, 0, K, "number of heads K of w1")
    check_dim("w2", w2, 2, d, "hidden size d")
    _check_k(k, w2.shape[1])


def check_lm_head_topk_args(hidden, weight, k, softcap=None) -> None:
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    check_dim("weight", weight, 1, hidden.shape[1], "hidden size d of hidden")
    _check_k(k, weight.shape[0])
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be None or a number, got {type(softcap).__name__} "
                            f"{softcap!r}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a finite number > 0 (the logit cap), got "
                             f"{softcap!r}")


if HAS_TRITON:
    _NO_INDEX = tl.constexpr(NO_INDEX)
    _EMPTY = tl.constexpr(-(2**63))  # the key of an empty slot: below every (value, index)

    @triton.jit
    def _rows_dot_tokens(
        w_ptr, h_ptr, m_r, n0, N, D,
        w_stride_r, w_stride_d, h_stride_n, h_stride_d,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        GEMV: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """fp32 [BLOCK_R, BLOCK_N]: rows ``w_ptr + r * w_stride_r`` (r < BLOCK_R, masked by m_r)
        of a weight matrix times tokens n0 .. n0 + BLOCK_N - 1 of h (``GEMV``: one token, on
        CUDA cores in fp32; otherwise a tensor-core dot with h cast to the weights' dtype)."""
        o_r = tl.arange(0, BLOCK_R)
        o_d = tl.arange(0, BLOCK_D)
        p_w = w_ptr + o_r[:, None] * w_stride_r + o_d[None, :] * w_stride_d
        if GEMV:
            b_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
            p_h = h_ptr + n0.to(tl.int64) * h_stride_n + o_d * h_stride_d
            for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
                if EVEN_D:
                    b_w = tl.load(p_w, mask=m_r[:, None], other=0.0)
                    b_h = tl.load(p_h)
                else:
                    m_d = d0 + o_d < D
                    b_w = tl.load(p_w, mask=m_r[:, None] & m_d[None, :], other=0.0)
                    b_h = tl.load(p_h, mask=m_d, other=0.0)
                b_acc += b_w.to(tl.float32) * b_h.to(tl.float32)[None, :]
                p_w += BLOCK_D * w_stride_d
                p_h += BLOCK_D * h_stride_d
            return tl.sum(b_acc, 1)[:, None]
        else:
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            b_acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
            p_h = h_ptr + o_n[None, :].to(tl.int64) * h_stride_n + o_d[:, None] * h_stride_d
            for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
                if EVEN_D:
                    b_w = tl.load(p_w, mask=m_r[:, None], other=0.0)
                    b_h = tl.load(p_h, mask=m_n[None, :], other=0.0)
                else:
                    m_d = d0 + o_d < D
                    b_w = tl.load(p_w, mask=m_r[:, None] & m_d[None, :], other=0.0)
                    b_h = tl.load(p_h, mask=m_n[None, :] & m_d[:, None], other=0.0)
                b_acc = tl.dot(b_w, b_h.to(b_w.dtype), b_acc, input_precision=DOT_PREC)
                p_w += BLOCK_D * w_stride_d
                p_h += BLOCK_D * h_stride_d
            return b_acc

    @triton.jit
    def _tanh(x):
        """fp32 tanh from exp alone (runs in the interpreter too; libdevice does not), within a
        few ulp of torch.tanh: an odd Taylor polynomial below |x| = 0.3, else
        ``1 - 2e / (1 + e)`` with ``e = exp(-2|x|)``, whose last subtraction rounds the way a
        correctly rounded tanh does near saturation (exactly +-1 from |x| = 9.0109 on, as in
        torch); NaN stays NaN, +-inf gives +-1, -0.0 stays -0.0."""
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        b_t = 1.0 - 2.0 * e / (1.0 + e)
        a2 = a * a
        b_p = a + a * a2 * (-1.0 / 3 + a2 * (2.0 / 15 + a2 * (-17.0 / 315 + a2 * (
            62.0 / 2835 + a2 * (-1382.0 / 155925)))))  # fmt: skip
        b_t = tl.where(a < 0.3, b_p, b_t)
        return tl.where(x < 0, -b_t, tl.where(x == 0, x, b_t))  # -0.0 stays -0.0

    @triton.jit
    def _sort_key(b_val, b_idx):
        """int64 keys ordered as (value descending, index ascending): the value's bits mapped to
        an order-preserving int32 (-0.0 read as +0.0; NaN above +inf, as torch.sort puts it) in
        the high half, ``_NO_INDEX - index`` in the low half."""
        b_val = tl.where(b_val == 0.0, 0.0, b_val)
        b_val = tl.where(b_val != b_val, float("nan"), b_val)  # one NaN: the positive quiet one
        b_bits = b_val.to(tl.int32, bitcast=True)
        b_ord = b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)
        return (b_ord.to(tl.int64) << 32) | (-b_idx.to(tl.int64) + _NO_INDEX)

    @triton.jit
    def _key_value(b_key):
        b_ord = (b_key >> 32).to(tl.int32)
        return (b_ord ^ ((b_ord >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)

    @triton.jit
    def _key_index(b_key):
        return (-b_key.to(tl.int32) + _NO_INDEX).to(tl.int64)  # low half: _NO_INDEX - index

    @triton.jit
    def _merge_topk(r_key, c_key, TOPK: tl.constexpr, BLOCK_K: tl.constexpr):
        """The TOPK largest keys, sorted descending, of the running lists r_key [BLOCK_K,
        BLOCK_N] and the candidates c_key [BLOCK_C, BLOCK_N], per column. Keys are distinct
        except _EMPTY (empty slots), the smallest int64."""
        o_j = tl.arange(0, BLOCK_K)[:, None]
        n_key = tl.full(r_key.shape, _EMPTY, dtype=tl.int64)
        for j in range(TOPK):
            b_m = tl.maximum(tl.max(r_key, 0), tl.max(c_key, 0))[None, :]
            n_key = tl.where(o_j == j, b_m, n_key)
            r_key = tl.where(r_key == b_m, _EMPTY, r_key)
            c_key = tl.where(c_key == b_m, _EMPTY, c_key)
        return n_key

    @triton.jit
    def _merge_if_better(r_key, c_key, m_col, TOPK: tl.constexpr, BLOCK_K: tl.constexpr):
        """Merge c_key into r_key unless no column (m_col: the columns that count) has a
        candidate above its k-th key, which is the common case once the lists have filled."""
        b_kth = tl.max(tl.where((tl.arange(0, BLOCK_K) == TOPK - 1)[:, None], r_key, _EMPTY), 0)
        need = m_col & (tl.max(c_key, 0) > b_kth)
        if tl.max(need.to(tl.int32), 0) > 0:
            r_key = _merge_topk(r_key, c_key, TOPK, BLOCK_K)
        return r_key

    @triton.jit(do_not_specialize=["tiles_per_program"])
    def _resblock_kernel(
        h_ptr, w1_ptr, b1_ptr, hr_ptr,
        N, D, tiles_per_head, tiles_per_program, num_tiles,
        h_stride_n, h_stride_d,
        w1_stride_k, w1_stride_o, w1_stride_i,
        b1_stride_k, b1_stride_o,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
        GEMV: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """hr[k, n, o] = h[n, o] + SiLU(W1[k, o] . h[n] + b1[k, o]): [K, N, D], computed in fp32.
        Program (i_nb, i_p) computes the row tiles [i_p, i_p + 1) * tiles_per_program of the
        K * tiles_per_head tiles of BLOCK_O rows (tile t: head t // tiles_per_head)."""
        i_nb, i_p = tl.program_id(0), tl.program_id(1)
        n0 = i_nb * BLOCK_N
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        t0 = i_p * tiles_per_program
        for t in range(t0, tl.minimum(t0 + tiles_per_program, num_tiles)):
            i_k = t // tiles_per_head
            o0 = (t - i_k * tiles_per_head) * BLOCK_O
            o_o = o0 + tl.arange(0, BLOCK_O)
            m_o = o_o < D
            w_base = w1_ptr + i_k.to(tl.int64) * w1_stride_k + o0.to(tl.int64) * w1_stride_o
            b_z = _rows_dot_tokens(w_base, h_ptr, m_o, n0, N, D, w1_stride_o, w1_stride_i,
                                   h_stride_n, h_stride_d, BLOCK_O, BLOCK_I, BLOCK_N, GEMV,
                                   EVEN_D, DOT_PREC, STAGES)  # fmt: skip
            b_b = tl.load(b1_ptr + i_k.to(tl.int64) * b1_stride_k + o_o * b1_stride_o, mask=m_o,
                          other=0.0).to(tl.float32)  # fmt: skip
            b_z = b_z + b_b[:, None]
            m = m_o[:, None] & m_n[None, :]
            p_h = h_ptr + o_n[None, :].to(tl.int64) * h_stride_n + o_o[:, None] * h_stride_d
            b_h = tl.load(p_h, mask=m, other=0.0).to(tl.float32)
            b_out = b_h + b_z * tl.sigmoid(b_z)
            p_out = hr_ptr + (i_k * N + o_n[None, :]).to(tl.int64) * D + o_o[:, None]
            tl.store(p_out, b_out.to(hr_ptr.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["rows_per_chunk", "num_chunks"])
    def _vocab_topk_kernel(
        w_ptr, h_ptr, pk_ptr,
        N, V, D, rows_per_chunk, num_chunks, softcap,
        w_stride_k, w_stride_v, w_stride_d,
        h_stride_k, h_stride_n, h_stride_d,
        TOPK: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        GEMV: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, STAGES: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):  # fmt: skip
        """Partial top-k of one vocabulary chunk of one head: keys pk [K, N, num_chunks, TOPK]
        (``SOFTCAP``: of ``softcap * tanh(logits / softcap)``)."""
        i_nb, i_c, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n0 = i_nb * BLOCK_N
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        o_v = tl.arange(0, BLOCK_V)
        v_start = i_c * rows_per_chunk
        v_end = tl.minimum(v_start + rows_per_chunk, V)
        w_head = w_ptr + i_k.to(tl.int64) * w_stride_k
        h_head = h_ptr + i_k.to(tl.int64) * h_stride_k
        r_key = tl.full([BLOCK_K, BLOCK_N], _EMPTY, dtype=tl.int64)
        w_tile = w_head + v_start.to(tl.int64) * w_stride_v
        for v0 in range(v_start, v_end, BLOCK_V):
            m_v = v0 + o_v < v_end
            b_s = _rows_dot_tokens(w_tile, h_head, m_v, n0, N, D,
                                   w_stride_v, w_stride_d, h_stride_n, h_stride_d,
                                   BLOCK_V, BLOCK_D, BLOCK_N, GEMV, EVEN_D, DOT_PREC,
                                   STAGES)  # fmt: skip
            if SOFTCAP:
                b_s = _tanh(b_s / softcap) * softcap
            c_key = tl.where(m_v[:, None], _sort_key(b_s, (v0 + o_v)[:, None]), _EMPTY)
            r_key = _merge_if_better(r_key, c_key, m_n, TOPK, BLOCK_K)
            w_tile += BLOCK_V * w_stride_v
        o_j = tl.arange(0, BLOCK_K)
        row = (i_k * N + o_n[None, :]).to(tl.int64) * num_chunks + i_c
        tl.store(pk_ptr + row * TOPK + o_j[:, None], r_key,
                 mask=(o_j < TOPK)[:, None] & m_n[None, :])  # fmt: skip

    @triton.jit(do_not_specialize=["N", "num_cand", "o_stride_n", "o_stride_k"])
    def _merge_topk_kernel(
        pk_ptr, ov_ptr, oi_ptr,
        N, num_cand,
        o_stride_n, o_stride_k,
        TOPK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Sorted top-k of the num_cand = chunks * TOPK partial keys of (token n, head k)."""
        i_n, i_k = tl.program_id(0), tl.program_id(1)
        base = (i_k * N + i_n).to(tl.int64) * num_cand
        o_c = tl.arange(0, BLOCK_C)
        r_key = tl.full([BLOCK_K, 1], _EMPTY, dtype=tl.int64)
        for c0 in range(0, num_cand, BLOCK_C):
            c_key = tl.load(pk_ptr + base + c0 + o_c, mask=c0 + o_c < num_cand, other=_EMPTY)
            r_key = _merge_if_better(r_key, c_key[:, None], tl.full([1], 1, tl.int1), TOPK,
                                     BLOCK_K)  # fmt: skip
        o_j = tl.arange(0, BLOCK_K)[:, None]
        p = i_n.to(tl.int64) * o_stride_n + i_k * o_stride_k + o_j
        tl.store(ov_ptr + p, _key_value(r_key), mask=o_j < TOPK)
        tl.store(oi_ptr + p, _key_index(r_key), mask=o_j < TOPK)


class _Config(NamedTuple):
    block_n: int  # tokens per program (1: the GEMV)
    block_v: int  # vocabulary rows per tile (stage 2)
    block_d: int  # hidden columns per loop trip (stage 2)
    block_o: int  # ResBlock output rows per tile (stage 1)
    block_i: int  # hidden columns per loop trip (stage 1)
    block_c: int  # candidates per merge step (stage 3)
    num_warps: int
    num_stages: int  # cp.async ring of the d loops: num_stages - 1 trips in flight
    ctas_per_sm: int  # stage-2 programs resident per SM (sets the chunk count)
    res_ctas_per_sm: int  # stage-1 programs resident per SM (sets the ResBlock grid)


# Programs resident per SM in the sm_90 compile (Triton 3.9) of each configuration, by (tokens
# per program, fp32, running-list rows: 2 for top-1, 16 up to top-16, 32 above): (stage 2,
# stage 1). The launchers plan with these off the GPU; on CUDA they take the number from the
# compiled kernel at its first launch instead (``ops._backend.ctas_per_sm``).
# test_triton_compile.py checks every entry against the sm_90 compile.
SM90_CTAS_PER_SM = {
    (1, False, 2): (4, 4), (1, False, 16): (4, 4), (1, False, 32): (4, 4),  # 106-120 registers
    (16, False, 2): (4, 4), (16, False, 16): (4, 4), (16, False, 32): (4, 4),  # 51 KB / 116-128
    (32, False, 2): (3, 3), (32, False, 16): (2, 3), (32, False, 32): (2, 3),  # merge: 210
    (64, False, 2): (2, 2), (64, False, 16): (1, 2), (64, False, 32): (1, 2),  # merge: 210
    (1, True, 2): (4, 6), (1, True, 16): (4, 6), (1, True, 32): (4, 6),  # fp32, 8 warps
    (16, True, 2): (5, 4), (16, True, 16): (4, 4), (16, True, 32): (4, 4),
}  # fmt: skip


def _config(N: int, gemv: bool, dtype: torch.dtype, topk: int) -> _Config:
    """Launch configuration for N tokens (``gemv``: the CUDA-core path, N = 1) and top-k width
    ``topk``; see the module doc. The merge's registers grow with k, so the programs per SM
    depend on it."""
    fp32 = dtype == torch.float32
    block_n = 1 if gemv else min(16 if fp32 else MAX_BLOCK_N, max(16, triton.next_power_of_2(N)))
    ctas = SM90_CTAS_PER_SM[block_n, fp32, 2 if topk == 1 else 16 if topk <= 16 else 32]
    if fp32:  # correctness path (interpreter; GPU when asked for): small tiles, IEEE dots
        return _Config(block_n, 32, 32, 16, 32, 256, 8, 2, *ctas)
    if block_n == 1:
        return _Config(block_n, 32, 128, 8, 512, 1024, 4, 5, *ctas)
    if block_n <= 32:
        return _Config(block_n, 64, 64, 64, 64, 1024, 4, 5, *ctas)
    return _Config(block_n, 64, 64, 32, 64, 1024, 8, 5, *ctas)


def _chunks(V: int, programs: int, block_v: int, ctas: int, device: torch.device,
            chunks: int | None):  # fmt: skip
    """(chunks per head, rows per chunk): one wave of ``ctas`` programs per SM over the
    ``programs`` (heads x token blocks) that share it, each chunk a whole number of BLOCK_V tiles
    (the last one shorter). ``chunks`` (tests) sets the count instead, with any rows per chunk."""
    if chunks is not None:
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        rows = -(-V // chunks)
    else:
        want = max(1, ctas * sm_count(device) // programs)
        tiles = -(-V // block_v)
        rows = -(-tiles // want) * block_v
    return -(-V // rows), rows


def _resblock_grid(K: int, d: int, token_blocks: int, block_o: int, ctas: int,
                   device: torch.device):  # fmt: skip
    """(tiles per head, tiles per program, programs per token block): the K * cdiv(d, BLOCK_O)
    row tiles of W1 split evenly over one wave of ``ctas`` programs per SM."""
    per_head = -(-d // block_o)
    tiles = K * per_head
    want = max(1, ctas * sm_count(device) // token_blocks)
    per_program = -(-tiles // want)
    return per_head, per_program, -(-tiles // per_program)


def _check_triton_inputs(op: str, hidden: torch.Tensor, k: int) -> None:
    if hidden.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"{op}: the triton backend supports dtypes {[str(d) for d in TRITON_DTYPES]}, got "
            f"{hidden.dtype} (use backend='torch')"
        )
    if k > MAX_TOPK:
        raise ValueError(
            f"{op}: the triton backend supports k <= {MAX_TOPK}, got k = {k} (use backend='torch')"
        )


def _vocab_topk(
    w: torch.Tensor,
    w_strides: tuple[int, int, int],
    h: torch.Tensor,
    h_strides: tuple[int, int, int],
    K: int,
    N: int,
    V: int,
    d: int,
    k: int,
    gemv: bool,
    cfg: _Config,
    chunks: int | None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 2 and 3: (values [N, K, k] float32, indices [N, K, k] int64) of W[k] h[k, n]
    (capped to ``softcap * tanh(. / softcap)`` when ``softcap`` is given)."""
    dev = h.device
    block_n = cfg.block_n
    token_blocks = triton.cdiv(N, block_n)
    block_k = max(2, triton.next_power_of_2(k))
    consts = dict(
        TOPK=k, BLOCK_K=block_k, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, BLOCK_N=block_n,
        GEMV=gemv, EVEN_D=d % cfg.block_d == 0,
        DOT_PREC="ieee" if w.dtype == torch.float32 else "tf32", STAGES=cfg.num_stages,
        SOFTCAP=softcap is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    cap = float(softcap) if softcap is not None else 1.0
    # the chunk count is not compiled in (do_not_specialize): any value serves to ask
    ctas = ctas_per_sm(_vocab_topk_kernel, (w, h, torch.int64, N, V, d, 0, 0, cap, *w_strides,
                                            *h_strides), consts, cfg.ctas_per_sm, dev)
    num_chunks, rows = _chunks(V, K * token_blocks, cfg.block_v, ctas, dev, chunks)
    keys = torch.empty(K, N, num_chunks, k, dtype=torch.int64, device=dev)
    # token blocks fastest: the programs that read the same weight rows start together, so
    # with several token blocks the rows come from L2 after the first (N > 64)
    _vocab_topk_kernel[(token_blocks, num_chunks, K)](
        w, h, keys, N, V, d, rows, num_chunks, cap, *w_strides, *h_strides, **consts)
    values = torch.empty(N, K, k, dtype=torch.float32, device=dev)
    indices = torch.empty(N, K, k, dtype=torch.int64, device=dev)
    num_cand = num_chunks * k
    _merge_topk_kernel[(N, K)](
        keys, values, indices, N, num_cand, values.stride(0), values.stride(1),
        TOPK=k, BLOCK_K=block_k, BLOCK_C=cfg.block_c, num_warps=4,
    )  # fmt: skip
    return values, indices


def _launch_config(N, dtype, k, gemv, block_v, block_d, block_o, block_i) -> tuple[bool, _Config]:
    gemv = (N == 1) if gemv is None else gemv
    if gemv and N != 1:
        raise ValueError(f"gemv=True needs N = 1 token, got N = {N}")
    cfg = _config(N, gemv, dtype, k)
    cfg = cfg._replace(block_v=block_v or cfg.block_v, block_d=block_d or cfg.block_d,
                       block_o=block_o or cfg.block_o, block_i=block_i or cfg.block_i)  # fmt: skip
    return gemv, cfg


def _resblocks(hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, gemv: bool,
               cfg: _Config, out_dtype: torch.dtype) -> torch.Tensor:
    """Stage 1: h' [K, N, d] in ``out_dtype`` (``gemv``: the N = 1 CUDA-core form)."""
    N, d = hidden.shape
    K = w1.shape[0]
    h_res = torch.empty(K, N, d, dtype=out_dtype, device=hidden.device)
    token_blocks = triton.cdiv(N, cfg.block_n)
    per_head = triton.cdiv(d, cfg.block_o)
    consts = dict(
        BLOCK_O=cfg.block_o, BLOCK_I=cfg.block_i, BLOCK_N=cfg.block_n,
        GEMV=gemv, EVEN_D=d % cfg.block_i == 0,
        DOT_PREC="ieee" if hidden.dtype == torch.float32 else "tf32", STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    args = (N, d, per_head, 0, K * per_head, *hidden.stride(), *w1.stride(), *b1.stride())
    ctas = ctas_per_sm(_resblock_kernel, (hidden, w1, b1, h_res, *args), consts,
                       cfg.res_ctas_per_sm, hidden.device)  # fmt: skip
    per_head, per_program, programs = _resblock_grid(K, d, token_blocks, cfg.block_o, ctas,
                                                     hidden.device)  # fmt: skip
    _resblock_kernel[(token_blocks, programs)](
        hidden, w1, b1, h_res,
        N, d, per_head, per_program, K * per_head,
        *hidden.stride(), *w1.stride(), *b1.stride(), **consts)
    return h_res


def medusa_heads_topk_triton(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    k: int,
    *,
    chunks: int | None = None,
    gemv: bool | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    block_o: int | None = None,
    block_i: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher of the three-stage heads top-k (arguments as ``medusa_heads_topk``, already
    checked). ``chunks`` (vocabulary chunks per head), ``gemv`` (CUDA-core path; N = 1 only) and
    the block sizes override the static choices (tests, tuning). Any strides; no host sync.

    hidden: [N, d]; w1: [K, d, d]; b1: [K, d]; w2: [K, V, d]. Returns (values [N, K, k]
    float32, indices [N, K, k] int64).
    """
    _check_triton_inputs("medusa_heads_topk", hidden, k)
    N, d = hidden.shape
    K, V = w2.shape[0], w2.shape[1]
    if N == 0:
        return (hidden.new_empty(0, K, k, dtype=torch.float32),
                hidden.new_empty(0, K, k, dtype=torch.int64))  # fmt: skip
    gemv, cfg = _launch_config(N, hidden.dtype, k, gemv, block_v, block_d, block_o, block_i)
    # h' in fp32 for the GEMV; in the weights' dtype for the dots, which round it to that anyway
    h_res = _resblocks(hidden, w1, b1, gemv, cfg, torch.float32 if gemv else hidden.dtype)
    return _vocab_topk(w2, tuple(w2.stride()), h_res, tuple(h_res.stride()), K, N, V, d, k,
                       gemv, cfg, chunks)  # fmt: skip


def lm_head_topk_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    chunks: int | None = None,
    gemv: bool | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher of stages 2 and 3 for one head without a ResBlock (arguments as
    ``lm_head_topk``, already checked; overrides as ``medusa_heads_topk_triton``).

    hidden: [N, d]; weight: [V, d]. Returns (values [N, k] float32, indices [N, k] int64).
    """
    _check_triton_inputs("lm_head_topk", hidden, k)
    N, d = hidden.shape
    V = weight.shape[0]
    if N == 0:
        return (hidden.new_empty(0, k, dtype=torch.float32),
                hidden.new_empty(0, k, dtype=torch.int64))  # fmt: skip
    gemv, cfg = _launch_config(N, hidden.dtype, k, gemv, block_v, block_d, None, None)
    if gemv:  # h in fp32, as the heads' h': the GEMV's one compiled form (fewer registers)
        hidden = hidden.float()
    values, indices = _vocab_topk(weight, (0, *weight.stride()), hidden, (0, *hidden.stride()),
                                  1, N, V, d, k, gemv, cfg, chunks, softcap)  # fmt: skip
    return values.view(N, k), indices.view(N, k)


def triton_supports(hidden: torch.Tensor, k: int) -> bool:
    """Whether "auto" takes the Triton kernels: fp16/bf16/fp32 and k <= MAX_TOPK."""
    return hidden.dtype in TRITON_DTYPES and k <= MAX_TOPK


_IMPLS = {"torch": medusa_heads_topk_ref}
_LM_IMPLS = {"torch": lm_head_topk_ref}
if HAS_TRITON:
    _IMPLS["triton"] = medusa_heads_topk_triton
    _LM_IMPLS["triton"] = lm_head_topk_triton


@torch.library.custom_op("medusa_kernels::medusa_heads_topk", mutates_args=())
def _medusa_heads_topk_op(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    k: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _IMPLS[backend](hidden, w1, b1, w2, k)


@_medusa_heads_topk_op.register_fake
def _(hidden, w1, b1, w2, k, backend):
    shape = (hidden.shape[0], w1.shape[0], k)
    return (
        hidden.new_empty(shape, dtype=torch.float32),
        hidden.new_empty(shape, dtype=torch.int64),
    )


def medusa_heads_topk(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    k: int,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens of every Medusa head for every token, without materialising logits.

    Args:
        hidden: [N, d] final (normed) hidden states of the base model.
        w1: [K, d, d] ResBlock weights (nn.Linear layout, out x in); b1: [K, d] their biases.
        w2: [K, V, d] each head's vocabulary projection. All in hidden's dtype and device; any
            strides (stride 1 along d gives 16-byte loads).
        k: top-k width, 1 <= k <= V.
        backend: "auto" (Triton on CUDA tensors for fp16/bf16/fp32 and k <= 32, the reference
            elsewhere), "torch" (the reference) or "triton" (float64 or k > 32 raise a
            ValueError).
    Returns:
        values [N, K, k] float32 logits sorted descending, indices [N, K, k] int64
        (ties: lower vocabulary index first).

    Example: ``values, tokens = medusa_heads_topk(h[:, -1], w1, b1, w2, 10)``.
    """
    check_heads_topk_args(hidden, w1, b1, w2, k)
    name = pick_backend("medusa_heads_topk", backend, hidden.device, _IMPLS,
                        triton_ok=triton_supports(hidden, k))
    return _medusa_heads_topk_op(hidden, w1, b1, w2, k, name)


@torch.library.custom_op("medusa_kernels::lm_head_topk", mutates_args=())
def _lm_head_topk_op(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, softcap: float | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _LM_IMPLS[backend](hidden, weight, k, softcap=softcap)


@_lm_head_topk_op.register_fake
def _(hidden, weight, k, softcap, backend):
    shape = (hidden.shape[0], k)
    return (
        hidden.new_empty(shape, dtype=torch.float32),
        hidden.new_empty(shape, dtype=torch.int64),
    )


def lm_head_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    softcap: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the base model's lm_head logits ``hidden @ weight.T`` without materialising
    them (greedy root token: k = 1 is the argmax).

    Args:
        hidden: [N, d] final (normed) hidden states.
        weight: [V, d] lm_head weight (nn.Linear layout), hidden's dtype and device.
        k: top-k width, 1 <= k <= V.
        softcap: final logit soft-capping (Gemma-2's ``final_logit_softcapping``): the
            logits become ``softcap * tanh(logits / softcap)`` before the top-k, as
            transformers computes them; None (default) leaves them as they are.
        backend: as ``medusa_heads_topk``.
    Returns:
        values [N, k] float32 (capped) logits sorted descending, indices [N, k] int64 (ties,
        also those the capping creates where tanh reaches +-1: lower vocabulary index first).
        The Triton kernel's tanh is within a few ulp of torch.tanh (exactly +-1 where torch's
        is), so only capped logits that close to each other may order differently.

    Example: ``next_token = lm_head_topk(h[:, -1], model.lm_head.weight, 1)[1][:, 0]``.
    """
    check_lm_head_topk_args(hidden, weight, k, softcap)
    name = pick_backend("lm_head_topk", backend, hidden.device, _LM_IMPLS,
                        triton_ok=triton_supports(hidden, k))
    return _lm_head_topk_op(hidden, weight, k, None if softcap is None else float(softcap),
                            name)
