"""Benchmark section: Medusa heads + top-k (``medusa_heads_topk``) and lm_head + top-k
(``lm_head_topk``).

CUDA (bf16 unless the context says fp16): K = 5 heads, d = 4096, V = 32000 (Vicuna-7B) and
128256 (Llama-3), N = 1 and 8 tokens, top-10 (quick: V = 32000 with N = 1 and 8, V = 128256
with N = 1):
- ``triton``: our three-stage kernel (ResBlock, vocabulary tiles with a running top-k, merge);
  no logits in memory;
- ``torch_loop``: per head ``x = h + SiLU(linear(h, W1, b1))``, ``linear(x, W2)``, ``topk``
  (what the Medusa reference does);
- ``bmm_topk``: all heads batched: ``baddbmm`` ResBlock, ``bmm`` to [K, N, V] logits, one topk.
lm_head rows (k = 1, the greedy token; N = 1, 8, 64, 512 at V = 32000 and 128256, and Gemma-2-9B's
V = 256000, d = 3584 with final logit soft-capping 30; quick: V = 128256, N = 1): ``triton``
(``lm_head_topk``) against ``linear_topk`` = ``torch.topk(F.linear(h, W), k)`` (capped alike).
Every function is captured in a CUDA graph and the replay is timed (``mode`` "graph"); ``triton``
is also timed as plain calls (``mode`` "eager"). ``triton`` rows carry ``check`` ("ok" or
"FAIL: ...") against fp32 logits computed from the same weights, tie-tolerant: every index's
logit within tolerance of its value and not below the k-th logit by more than the tolerance.
bytes_moved = W1 + b1 + W2 (heads) or W (lm_head) + the hidden states, in the weights' dtype.

Shared heads (``op`` "shared_heads", ``shared_heads_topk``): the same K = 5 ResBlocks, then ONE
projection for all heads, the lm_head (R = V) or its pre-gathered rows of a trimmed vocabulary
(R = 8192 at V = 32000, 16384 at V = 128256), N = 1 and 8, top-10 (quick: N = 1): ``triton``
against ``bmm_topk`` (baddbmm ResBlock, one [K*N, d] x [d, R] matmul, one topk) and
``lm_head_read`` (``lm_head_topk`` of one token over the same R rows: one read of the
projection, the issue's yardstick: shared heads at most 1.15x it at V 128256).
bytes_moved per step, each kind (``head_bytes``: the heads' weights): separate K (d^2 + d + V d),
shared K (d^2 + d) + R d, times the element size, plus the hidden states.

CPU: tiny shapes (d = 64, V = 1000, K = 3, N = 1 and 4, top-10, fp32); times the torch paths and,
with TRITON_INTERPRET=1, checks the Triton kernels in the interpreter against a float64 reference
(``check``; otherwise "skipped (no TRITON_INTERPRET)").
``ctx.shapes`` filters cases by ``key=value`` words, e.g. "V=32000 N=1 op=heads".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medusa_kernels.ops._backend import triton_interpreted
from medusa_kernels.ops.heads_topk import (
    lm_head_topk,
    lm_head_topk_ref,
    medusa_heads_topk,
    medusa_heads_topk_ref,
)
from medusa_kernels.ops.shared_heads_topk import shared_heads_topk, shared_heads_topk_ref

from ._common import BenchContext, case_wanted, cuda_usable, failure_row, timed_mode_row, timed_row

SECTION = "heads_topk"


def _inputs(N, K, d, V, dtype, device, seed=0):
    """Random heads at the scale of trained ones: logits of order 1."""
    gen = torch.Generator(device).manual_seed(seed)
    # scaled in place: at K = 5, V = 128256, d = 4096 the fp32 draw alone is 10.5 GB
    hidden = torch.randn(N, d, generator=gen, device=device).to(dtype)
    w1 = torch.randn(K, d, d, generator=gen, device=device).mul_(0.5 / d**0.5).to(dtype)
    b1 = torch.randn(K, d, generator=gen, device=device).mul_(0.1).to(dtype)
    w2 = torch.randn(K, V, d, generator=gen, device=device).mul_(d**-0.5).to(dtype)
    return hidden, w1, b1, w2


def torch_loop(hidden, w1, b1, w2, k):
    """The Medusa reference's heads: one ResBlock + linear + topk per head."""
    out = []
    for i in range(w1.shape[0]):
        x = hidden + F.silu(F.linear(hidden, w1[i], b1[i]))
        out.append(torch.topk(F.linear(x, w2[i]), k, dim=-1))
    return torch.stack([o.values for o in out], 1), torch.stack([o.indices for o in out], 1)


def bmm_topk(hidden, w1, b1, w2, k):
    """All heads batched: [K, N, d] ResBlock, [K, N, V] logits, one topk."""
    K, (N, d) = w1.shape[0], hidden.shape
    hk = hidden[None].expand(K, N, d)
    x = hk + F.silu(torch.baddbmm(b1[:, None], hk, w1.transpose(1, 2)))
    top = torch.topk(torch.bmm(x, w2.transpose(1, 2)), k, dim=-1)
    return top.values.transpose(0, 1), top.indices.transpose(0, 1)


def _head_logits(hidden, w1, b1, w2, dtype) -> torch.Tensor:
    """[N, K, V] logits in ``dtype`` from the inputs as given, one head at a time."""
    h = hidden.to(dtype)
    out = []
    for i in range(w1.shape[0]):
        x = h + F.silu(h @ w1[i].to(dtype).T + b1[i].to(dtype))
        out.append(x @ w2[i].to(dtype).T)
    return torch.stack(out, 1)


def check_topk(values, indices, logits, k, atol, rtol) -> str:
    """Tie-tolerant check of a top-k against full logits: "ok" or "FAIL: why"."""
    logits = logits.to(values.device, torch.float64)
    tol = atol + rtol * logits.abs().max().item()
    if values.shape != indices.shape or values.shape[-1] != k:
        return f"FAIL: shapes {tuple(values.shape)} / {tuple(indices.shape)}"
    if not torch.isfinite(values).all():
        return "FAIL: non-finite values"
    if (indices < 0).any() or (indices >= logits.shape[-1]).any():
        return "FAIL: index out of range"
    if (values[..., 1:] > values[..., :-1]).any():
        return "FAIL: values not sorted"
    if k > 1 and (indices.sort(-1).values.diff(dim=-1) == 0).any():
        return "FAIL: repeated indices"
    at = logits.gather(-1, indices)
    err = (values.double() - at).abs().max().item()
    if err > tol:
        return f"FAIL: values differ from the logits by {err:.3g} > {tol:.3g}"
    short = (logits.topk(k, dim=-1).values[..., -1:] - at).max().item()
    if short > 2 * tol:
        return f"FAIL: an index's logit is {short:.3g} below the k-th"
    return "ok"


def _cuda_heads(ctx: BenchContext, N, V, dtype) -> list[dict]:
    K, d, k = 5, 4096, 10
    case = dict(op="heads", N=N, K=K, d=d, V=V, k=k, dtype=str(dtype).removeprefix("torch."))
    if not case_wanted(ctx, case):
        return []
    hidden, w1, b1, w2 = _inputs(N, K, d, V, dtype, ctx.device, seed=N)
    nbytes = sum(t.numel() * t.element_size() for t in (hidden, w1, b1, w2))
    ours = lambda: medusa_heads_topk(hidden, w1, b1, w2, k, backend="triton")
    values, indices = ours()
    check = check_topk(values, indices, _head_logits(hidden, w1, b1, w2, torch.float32), k,
                       3e-2, 3e-3)  # fmt: skip
    rows = []
    for mode in ("graph", "eager"):
        row = timed_mode_row(ctx, SECTION, "triton", ours, nbytes, True, mode, **case)
        if row is not None:
            rows.append(row if "check" in row else row | {"check": check})  # FAIL stays
    peers = {
        "torch_loop": lambda: torch_loop(hidden, w1, b1, w2, k),
        "bmm_topk": lambda: bmm_topk(hidden, w1, b1, w2, k),
    }
    for impl, fn in peers.items():
        row = timed_mode_row(ctx, SECTION, impl, fn, nbytes, False, **case)
        if row is not None:
            rows.append(row)
    return rows


def shared_bmm_topk(hidden, w1, b1, weight, k):
    """Shared heads batched in torch: [K, N, d] ResBlock, one [K*N, d] x [d, R] matmul, one
    topk."""
    K, (N, d) = w1.shape[0], hidden.shape
    hk = hidden[None].expand(K, N, d)
    x = hk + F.silu(torch.baddbmm(b1[:, None], hk, w1.transpose(1, 2)))
    top = torch.topk(x.reshape(K * N, d) @ weight.T, k, dim=-1)
    return top.values.view(K, N, k).transpose(0, 1), top.indices.view(K, N, k).transpose(0, 1)


def head_bytes(kind: str, K: int, d: int, V: int, R: int | None, elsize: int) -> int:
    """Weight bytes the heads read per step: separate K (d^2 + d + R d), shared K (d^2 + d)
    + R d (R: the draft rows, V without a token map)."""
    R = R or V
    res = K * (d * d + d)
    return (res + (K if kind == "separate" else 1) * R * d) * elsize


def _cuda_shared(ctx: BenchContext, N, V, dtype, R=None) -> list[dict]:
    K, d, k = 5, 4096, 10
    rows_ = R or V
    case = dict(op="shared_heads", N=N, K=K, d=d, V=V, R=rows_, k=k,
                dtype=str(dtype).removeprefix("torch."))
    if not case_wanted(ctx, case):
        return []
    hidden, w1, b1, w = _inputs(N, K, d, rows_, dtype, ctx.device, seed=N + 7)
    weight = w[0]  # [R, d]: the lm_head, or its gathered rows (the map's ids: any ascending)
    del w
    tmap = None if R is None else torch.arange(0, V, V // R, device=ctx.device)[:R]
    elsize = weight.element_size()
    case["head_bytes"] = head_bytes("shared", K, d, V, R, elsize)
    case["separate_head_bytes"] = head_bytes("separate", K, d, V, R, elsize)
    nbytes = case["head_bytes"] + hidden.numel() * elsize
    ours = lambda: shared_heads_topk(hidden, w1, b1, weight, k, token_map=tmap, backend="triton")
    values, rows_idx = shared_heads_topk(hidden, w1, b1, weight, k, backend="triton")
    logits = _head_logits(hidden, w1, b1, weight[None].expand(K, -1, -1), torch.float32)
    check = check_topk(values, rows_idx, logits, k, 3e-2, 3e-3)
    rows = []
    for mode in ("graph", "eager"):
        row = timed_mode_row(ctx, SECTION, "triton", ours, nbytes, True, mode, **case)
        if row is not None:
            rows.append(row if "check" in row else row | {"check": check})  # FAIL stays
    peers = {
        "bmm_topk": (lambda: shared_bmm_topk(hidden, w1, b1, weight, k), nbytes),
        "lm_head_read": (lambda: lm_head_topk(hidden[:1], weight, k, backend="triton"),
                         (weight.numel() + d) * elsize),
    }
    for impl, (fn, nb) in peers.items():
        row = timed_mode_row(ctx, SECTION, impl, fn, nb, False, **case)
        if row is not None:
            rows.append(row)
    return rows


def _cuda_lm_head(ctx: BenchContext, N, V, dtype, d=4096, softcap=None) -> list[dict]:
    k = 1
    case = dict(op="lm_head", N=N, K=1, d=d, V=V, k=k, dtype=str(dtype).removeprefix("torch."))
    if softcap is not None:
        case["softcap"] = softcap
    if not case_wanted(ctx, case):
        return []
    hidden, _, _, w = _inputs(N, 1, d, V, dtype, ctx.device, seed=V + N)
    weight = w[0]
    nbytes = (hidden.numel() + weight.numel()) * weight.element_size()
    ours = lambda: lm_head_topk(hidden, weight, k, softcap=softcap, backend="triton")
    values, indices = ours()
    logits = hidden.float() @ weight.float().T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    check = check_topk(values, indices, logits, k, 3e-2, 3e-3)
    rows = []
    for mode in ("graph", "eager"):
        row = timed_mode_row(ctx, SECTION, "triton", ours, nbytes, True, mode, **case)
        if row is not None:
            rows.append(row if "check" in row else row | {"check": check})  # FAIL stays

    def linear_topk():
        out = F.linear(hidden, weight)
        if softcap is not None:
            out = torch.tanh(out / softcap) * softcap
        return torch.topk(out, k)

    row = timed_mode_row(ctx, SECTION, "linear_topk", linear_topk, nbytes, False, **case)
    if row is not None:
        rows.append(row)
    return rows


def _cuda_rows(ctx: BenchContext) -> list[dict]:
    dtype = ctx.dtype if ctx.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if ctx.quick:
        heads = ((32000, 1), (32000, 8), (128256, 1))
        lm = (dict(V=128256, N=1),)
        shared = tuple(dict(V=V, N=1, R=R) for V in (32000, 128256)
                       for R in (None, 8192 if V == 32000 else 16384))
    else:
        shared = tuple(dict(V=V, N=N, R=R) for V in (32000, 128256) for N in (1, 8)
                       for R in (None, 8192 if V == 32000 else 16384))
        heads = tuple((V, N) for V in (32000, 128256) for N in (1, 8))
        # N 64 / 512: greedy verification of a 64-node tree at B = 1 / 8 (several token blocks)
        lm = tuple(dict(V=V, N=N) for V in (32000, 128256) for N in (1, 8, 64, 512)) + (
            dict(V=256000, N=1, d=3584, softcap=30.0),)  # Gemma-2-9B: final logit soft-capping
    rows = []
    cases = [("heads", _cuda_heads, dict(V=V, N=N)) for V, N in heads]
    cases += [("lm_head", _cuda_lm_head, c) for c in lm]
    cases += [("shared_heads", _cuda_shared, c) for c in shared]
    for op, run_case, kw in cases:
        try:
            rows += run_case(ctx, dtype=dtype, **kw)
        except torch.cuda.OutOfMemoryError:
            ctx.notes.append(f"{SECTION}: {op} {kw} ran out of memory; no rows")
        except Exception as e:  # inputs or the check raised: the next case runs
            rows.append(failure_row(ctx, SECTION, "triton", e, True, op=op, N=kw["N"],
                                    V=kw["V"]))
        if not cuda_usable(ctx):
            return rows
    return rows


def _interpreted_check(fn, values_ref_logits, k) -> str:
    if not triton_interpreted():
        return "skipped (no TRITON_INTERPRET)"
    try:
        values, indices = fn()
        return check_topk(values, indices, values_ref_logits, k, 1e-4, 1e-5)
    except Exception as e:  # reported in the row
        return f"FAIL: {type(e).__name__}: {e}"


def _cpu_case(ctx: BenchContext, N: int) -> list[dict]:
    K, d, V, k = 3, 64, 1000, 10
    rows = []
    case = dict(op="heads", N=N, K=K, d=d, V=V, k=k, dtype="float32")
    if case_wanted(ctx, case):
        hidden, w1, b1, w2 = _inputs(N, K, d, V, torch.float32, ctx.device, seed=N)
        nbytes = sum(t.numel() * t.element_size() for t in (hidden, w1, b1, w2))
        ref = lambda: medusa_heads_topk_ref(hidden, w1, b1, w2, k)
        row = timed_row(ctx, SECTION, "torch", ref, nbytes, mode="eager", **case)
        ours = lambda: medusa_heads_topk(hidden, w1, b1, w2, k, backend="triton")
        row["check"] = _interpreted_check(ours, _head_logits(hidden, w1, b1, w2, torch.float64), k)
        loop = lambda: torch_loop(hidden, w1, b1, w2, k)
        rows += [row, timed_row(ctx, SECTION, "torch_loop", loop, nbytes, mode="eager", **case)]
    case = dict(op="lm_head", N=N, K=1, d=d, V=V, k=k, dtype="float32")
    if case_wanted(ctx, case):
        hidden, _, _, w = _inputs(N, 1, d, V, torch.float32, ctx.device, seed=V + N)
        weight = w[0]
        nbytes = (hidden.numel() + weight.numel()) * 4
        ref = lambda: lm_head_topk_ref(hidden, weight, k)
        row = timed_row(ctx, SECTION, "torch", ref, nbytes, mode="eager", **case)
        ours = lambda: lm_head_topk(hidden, weight, k, backend="triton")
        row["check"] = _interpreted_check(ours, hidden.double() @ weight.double().T, k)
        rows.append(row)
    return rows


def _cpu_shared(ctx: BenchContext, N: int, R: int | None) -> list[dict]:
    K, d, V, k = 3, 64, 1000, 10
    case = dict(op="shared_heads", N=N, K=K, d=d, V=V, R=R or V, k=k, dtype="float32",
                head_bytes=head_bytes("shared", K, d, V, R, 4),
                separate_head_bytes=head_bytes("separate", K, d, V, R, 4))
    if not case_wanted(ctx, case):
        return []
    hidden, w1, b1, w = _inputs(N, K, d, R or V, torch.float32, ctx.device, seed=N + 3)
    weight = w[0]
    tmap = None if R is None else torch.arange(0, V, V // R)[:R]
    nbytes = case["head_bytes"] + hidden.numel() * 4
    ref = lambda: shared_heads_topk_ref(hidden, w1, b1, weight, k, tmap)
    row = timed_row(ctx, SECTION, "torch", ref, nbytes, mode="eager", **case)
    ours = lambda: shared_heads_topk(hidden, w1, b1, weight, k, backend="triton")
    logits = _head_logits(hidden, w1, b1, weight[None].expand(K, -1, -1), torch.float64)
    row["check"] = _interpreted_check(ours, logits, k)
    return [row]


def _cpu_rows(ctx: BenchContext) -> list[dict]:
    rows = [row for N in (1, 4) for row in _cpu_case(ctx, N)]
    return rows + [row for N in (1, 4) for R in (None, 250) for row in _cpu_shared(ctx, N, R)]


def run(ctx: BenchContext) -> list[dict]:
    return _cuda_rows(ctx) if ctx.cuda else _cpu_rows(ctx)
