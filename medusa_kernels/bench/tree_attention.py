"""Benchmark section: tree attention of T tree tokens over a long KV cache (``tree_attention``).

CUDA (fp16 unless the context says bf16): T = 64 (the Medusa mc_sim_7b_63 tree), Hq 32, D 128,
B 1 and 8, Hkv 32 and 8, L 1k/4k/16k/64k (quick: B 1, L 4k/16k), every sequence at L:
- ``triton``: our kernel (split-KV over the prefix, tree mask on the tree only);
- ``sdpa_mask``: torch SDPA with the full bool mask [B, 1, T, L + T] (built once, outside the
  timing), as engines feed FlashInfer-style custom masks; with GQA the K/V heads are repeated
  to Hq outside the timing (SDPA's masked kernels take no GQA, as HF's repeat_kv does);
- ``eager``: what the Medusa reference does: repeat_kv, matmul, add the float mask, fp32
  softmax, matmul;
- ``sdpa_nomask``: SDPA without a mask (wrong answer, a speed reference for FlashAttention).
- ``triton_bm64`` (sm_90, rows T * Hq / Hkv > 64): the kernel with 64-row tiles at 2 CTAs per
  SM instead of 128-row tiles at 1, to be measured against ``triton`` (issue 19 item 8).
A decode set (T = 1, the same B / Hkv, L 4k/16k/64k; quick: B 1, L 16k) times ``triton`` and
``sdpa_nomask`` (exact at T = 1). Every function is captured in a CUDA graph and the replay is
timed (``mode`` "graph": device time, no Python launch overhead); ``triton`` is also timed as
plain calls (``mode`` "eager"). The ``triton`` rows carry ``check``/``max_err`` against
``sdpa_mask`` (``sdpa_nomask`` at T = 1).
bytes_moved = K and V prefix read once (2 * B * L * Hkv * D) + q and out (2 * B * T * Hq * D),
times the element size; flops = 4 * B * Hq * D * (T * L + the tree mask's visible pairs) (q k^T
and p v, 2 FLOPs a multiply-add): T * Hq / Hkv rows share each K/V head, so at Hkv 8, T 64 a KV
byte feeds 256 FLOPs, above an H100/H200's ridge (about 233 FLOP/B): compute-bound there.

CPU: tiny shapes; times the torch reference (and eager) and checks the Triton kernel in the
interpreter against a float64 reference (``check``: "ok" or the error, ``max_err``).
``ctx.shapes`` filters cases by ``key=value`` words, e.g. "L=4096 B=1".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medusa_kernels.ops._backend import triton_interpreted
from medusa_kernels.ops.tree_attention import (
    tree_attention,
    tree_attention_ref,
    tree_attention_triton,
)
from medusa_kernels.tree import TREES, build_tree

from ._common import BenchContext, case_wanted, cuda_usable, failure_row, timed_mode_row, timed_row

SECTION = "tree_attention"


def _inputs(B, L, T, Hq, Hkv, D, dtype, device, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=gen, device=device, dtype=dtype)
    k = torch.randn(B, L + T, Hkv, D, generator=gen, device=device, dtype=dtype)
    v = torch.randn(B, L + T, Hkv, D, generator=gen, device=device, dtype=dtype)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    if T == 64:
        mask = build_tree(TREES["mc_sim_7b_63"]).tree_mask.to(device)
    else:
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))
    return q, k, v, lens, mask


def _full_mask(mask: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """The T x (L + T) bool mask peers build: prefix visible, tree mask on the tree."""
    T = mask.shape[0]
    full = torch.ones(T, L + T, dtype=torch.bool, device=mask.device)
    full[:, L:] = mask
    return full[None, None].expand(B, 1, T, L + T)


def _sdpa(q, k, v, mask=None):
    """SDPA on [B, T, Hq, D] / [B, S, Hkv, D] layouts; GQA by enable_gqa (FlashAttention, no
    mask) where Hkv < Hq."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **gqa).transpose(1, 2)


def _eager(q, k, v, add_mask):
    """The Medusa reference's attention: repeat_kv, q k^T * scale + mask, fp32 softmax, @ v."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, S, D]
    if Hq != Hkv:
        S = k.shape[1]
        kt = kt[:, :, None].expand(B, Hkv, Hq // Hkv, S, D).reshape(B, Hq, S, D)
        vt = vt[:, :, None].expand(B, Hkv, Hq // Hkv, S, D).reshape(B, Hq, S, D)
    scores = q.transpose(1, 2) @ kt.transpose(2, 3) / math.sqrt(D) + add_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ vt).transpose(1, 2)


def _bytes(B, L, T, Hq, Hkv, D, elsize) -> int:
    return (2 * B * L * Hkv * D + 2 * B * T * Hq * D) * elsize


def _flops(B, L, Hq, D, mask: torch.Tensor) -> int:
    """q k^T and p v over the prefix (every row sees all L keys) and the tree's visible pairs."""
    return 4 * B * Hq * D * (mask.shape[0] * L + int(mask.sum()))


def _cuda_case(ctx: BenchContext, B, L, T, Hkv) -> list[dict]:
    Hq, D = 32, 128
    dtype = ctx.dtype if ctx.dtype in (torch.float16, torch.bfloat16) else torch.float16
    case = dict(L=L, B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype).removeprefix("torch."))
    if not case_wanted(ctx, case):
        return []
    q, k, v, lens, mask = _inputs(B, L, T, Hq, Hkv, D, dtype, ctx.device)
    nbytes = _bytes(B, L, T, Hq, Hkv, D, q.element_size())
    flops = _flops(B, L, Hq, D, mask)
    ours = lambda: tree_attention(q, k, v, lens, mask, backend="triton")
    got = ours()
    if T > 1:
        bool_mask = _full_mask(mask, B, L)
        group = Hq // Hkv  # the masked SDPA kernels take no GQA: repeat K/V once, untimed
        kr = k.repeat_interleave(group, 2) if group > 1 else k
        vr = v.repeat_interleave(group, 2) if group > 1 else v
        want = _sdpa(q, kr, vr, bool_mask)
    else:  # decode: nothing to mask
        bool_mask = None
        want = _sdpa(q, k, v)
    err = (got.float() - want.float()).abs().max().item()
    check = "ok" if err <= 2e-2 else f"max_err {err:.3g} > 2e-2"
    rows = []
    for mode in ("graph", "eager"):
        row = timed_mode_row(ctx, SECTION, "triton", ours, nbytes, True, mode, flops=flops,
                             **case)
        if row is not None:
            rows.append(row if "check" in row else row | {"check": check, "max_err": err})
    if T * Hq // Hkv > 64 and torch.cuda.get_device_capability(ctx.device) >= (9, 0):
        # the A/B of issue 19 item 8: 64-row tiles, 2 CTAs per SM (one's softmax can overlap
        # the other's wgmma) against the default 128-row tile, 1 CTA per SM
        bm64 = lambda: tree_attention_triton(q, k, v, lens, mask, block_m=64)
        try:
            err64 = (bm64().float() - want.float()).abs().max().item()
        except Exception as e:  # recorded under its own name; the case's other rows stay
            rows.append(failure_row(ctx, SECTION, "triton_bm64", e, True, **case))
        else:
            row = timed_mode_row(ctx, SECTION, "triton_bm64", bm64, nbytes, True, "graph",
                                 flops=flops, **case)  # fmt: skip
            if row is not None:
                check64 = "ok" if err64 <= 2e-2 else f"max_err {err64:.3g} > 2e-2"
                rows.append(row if "check" in row else row | {"check": check64, "max_err": err64})
    del got, want
    peers = {"sdpa_nomask": lambda: _sdpa(q, k, v)}
    if T > 1:
        add_mask = torch.zeros(bool_mask.shape, dtype=dtype, device=ctx.device)
        add_mask.masked_fill_(~bool_mask, float("-inf"))
        peers = {
            "sdpa_mask": lambda: _sdpa(q, kr, vr, bool_mask),
            "eager": lambda: _eager(q, k, v, add_mask),
            **peers,
        }
    for impl, fn in peers.items():
        row = timed_mode_row(ctx, SECTION, impl, fn, nbytes, False, flops=flops, **case)
        if row is not None:
            rows.append(row)
    return rows


def _cuda_rows(ctx: BenchContext) -> list[dict]:
    Ls = (4096, 16384) if ctx.quick else (1024, 4096, 16384, 65536)
    Bs = (1,) if ctx.quick else (1, 8)
    decode_Ls = (16384,) if ctx.quick else (4096, 16384, 65536)
    rows = []
    for T, lengths in ((64, Ls), (1, decode_Ls)):
        for B in Bs:
            for Hkv in (32, 8):
                for L in lengths:
                    try:
                        rows += _cuda_case(ctx, B, L, T, Hkv)
                    except torch.cuda.OutOfMemoryError:
                        ctx.notes.append(f"{SECTION}: B={B} L={L} T={T} Hkv={Hkv} ran out of "
                                         "memory; no rows")  # fmt: skip
                    except Exception as e:  # inputs or the check raised: the next case runs
                        rows.append(failure_row(ctx, SECTION, "triton", e, True, L=L, B=B, T=T,
                                                Hkv=Hkv))  # fmt: skip
                    if not cuda_usable(ctx):
                        return rows
    return rows


def _cpu_case(ctx: BenchContext, B, L, Hkv) -> list[dict]:
    tree = build_tree(TREES["small_15"])
    T, Hq, D = tree.num_nodes, 4, 64
    case = dict(L=L, B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype="float32")
    if not case_wanted(ctx, case):
        return []
    q, k, v, lens, _ = _inputs(B, L, T, Hq, Hkv, D, torch.float32, ctx.device)
    mask = tree.tree_mask
    nbytes = _bytes(B, L, T, Hq, Hkv, D, 4)
    flops = _flops(B, L, Hq, D, mask)
    add_mask = torch.zeros(B, 1, T, L + T).masked_fill_(~_full_mask(mask, B, L), -math.inf)
    eager = timed_row(ctx, SECTION, "eager", lambda: _eager(q, k, v, add_mask), nbytes,
                      flops=flops, mode="eager", **case)  # fmt: skip
    row = timed_row(ctx, SECTION, "torch", lambda: tree_attention_ref(q, k, v, lens, mask),
                    nbytes, flops=flops, mode="eager", **case)  # fmt: skip
    if triton_interpreted():
        try:
            want = tree_attention_ref(q.double(), k.double(), v.double(), lens, mask)
            got = tree_attention(q, k, v, lens, mask, backend="triton")
            row["max_err"] = (got.double() - want).abs().max().item()
            row["check"] = "ok" if row["max_err"] <= 1e-4 else "mismatch"
        except Exception as e:  # reported in the row
            row["check"], row["max_err"] = f"{type(e).__name__}: {e}", float("nan")
    else:
        row["check"], row["max_err"] = "not run: TRITON_INTERPRET=1 not set", float("nan")
    return [eager, row]


def _cpu_rows(ctx: BenchContext) -> list[dict]:
    return [row for B, L, Hkv in ((1, 64, 4), (2, 200, 1)) for row in _cpu_case(ctx, B, L, Hkv)]


def run(ctx: BenchContext) -> list[dict]:
    return _cuda_rows(ctx) if ctx.cuda else _cpu_rows(ctx)
