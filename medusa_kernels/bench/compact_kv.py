"""Benchmark section: in-place KV compaction after verification (``compact_kv_cache``).

CUDA: 32 layers, Hkv 32 and 8, D 128, B 1, S 4096, 4 of a 64-node tree accepted, fp16:
- ``triton`` / ``cuda``: our op, one launch for all layers (``cuda`` only where
  ``medusa_kernels._C`` is built);
- ``medusa_ref``: the Medusa reference's gather + copy over its one stacked buffer
  ``[2 * NL, B, Hkv, S, D]`` (``tgt = data[..., select, :]; data[..., L:L + n, :].copy_(tgt)``),
  with the selected indices already on the device (Medusa derives them on the host);
- ``per_layer``: the same gather + copy, one layer and one of K/V at a time (64 pairs).
Each in ``mode`` "eager" (Python calls) and "graph" (the calls captured in one CUDA graph, the
device time). Our op advances ``cache_seqlens``; every call uses its own row of a [R, B] length
buffer, reset once per R calls, so each row times one call with 1/R of a reset.
bytes_moved = 2 (K, V) * NL * accepted * Hkv * D * 2 bytes * 2 (read + write).

CPU: tiny shapes; times the torch reference and checks the Triton kernel in the interpreter
(``check``: "ok" or the error; ``max_err``: 0 when bit-exact).
"""

from __future__ import annotations

import torch

from medusa_kernels.ops._backend import cuda_extension, triton_interpreted
from medusa_kernels.ops.compact_kv import compact_kv_cache, compact_kv_cache_ref

from ._common import BenchContext, cuda_usable, failure_row, timed_mode_row, timed_row

SECTION = "compact_kv"
REPS = 20  # calls per timed function (amortises the length reset)


def _per_call(row: dict, calls: int) -> dict:
    """Rescale a row that timed ``calls`` calls (with ``calls`` times the bytes) to one call:
    times, the floor and the roofline divide by ``calls``; GB/s and the fractions are ratios of
    the two and stay as they are."""
    for key in ("median_us", "p20_us", "p80_us", "floor_us", "roofline_us"):
        if row.get(key) is not None:
            row[key] /= calls
    return row


def _check(backend, k, v, lens, idx, acc, block_table=None) -> tuple[str, float]:
    """Run ``backend`` on copies against the reference: ("ok" | error, max abs difference)."""
    try:
        ks, vs, ls = k.clone(), v.clone(), lens.clone()
        kr, vr, lr = k.clone(), v.clone(), lens.clone()
        compact_kv_cache(ks, vs, ls, idx, acc, block_table=block_table, backend=backend)
        compact_kv_cache_ref(kr, vr, lr, idx, acc, block_table)
        err = max(
            (ks.float() - kr.float()).abs().max().item(),
            (vs.float() - vr.float()).abs().max().item(),
        )
        ok = torch.equal(ks, kr) and torch.equal(vs, vr) and torch.equal(ls, lr)
        return ("ok" if ok else "mismatch"), err
    except Exception as e:  # reported in the row
        return f"{type(e).__name__}: {e}", float("nan")


def _cuda_case(ctx: BenchContext, H: int, impls: list[str]) -> list[dict]:
    dev, dtype = ctx.device, torch.float16
    NL, B, S, D, T, A = 32, 1, 4096, 128, 64, 4
    L = S - 2 * T  # prefix length: the tree's T slots and room after them
    case = dict(NL=NL, B=B, S=S, Hkv=H, D=D, tree_nodes=T, accepted=A, dtype="float16")
    nbytes = 2 * NL * A * H * D * 2 * 2
    gen = torch.Generator(dev).manual_seed(H)
    k = torch.randn(NL, B, S, H, D, generator=gen, device=dev, dtype=dtype)
    v = torch.randn(NL, B, S, H, D, generator=gen, device=dev, dtype=dtype)
    node_ids = torch.tensor([[0, 3, 17, 52]], device=dev)  # an increasing root-to-leaf path
    acc = torch.full((B,), A, dtype=torch.int32, device=dev)
    lens0 = torch.full((REPS, B), L, dtype=torch.int32, device=dev)
    lens = lens0.clone()
    rows = []

    def time_modes(impl, fn, calls, extra=None) -> None:
        """Rows of ``fn`` (``calls`` calls of the op) in both modes; a failure is a row."""
        for mode in ("eager", "graph"):
            ours = impl in ("triton", "cuda")
            row = timed_mode_row(ctx, SECTION, impl, fn, calls * nbytes, ours, mode, flops=0,
                                 **case)  # a copy: no arithmetic, the roofline is the floor
            if row is not None:
                rows.append(row if "check" in row else _per_call(row, calls) | (extra or {}))

    for impl in impls:
        check, err = _check(impl, k, v, lens0[0].clone(), node_ids, acc)

        def ours(impl=impl):
            for r in range(REPS):
                compact_kv_cache(k, v, lens[r], node_ids, acc, backend=impl)
            lens.copy_(lens0)

        time_modes(impl, ours, REPS, {"check": check, "max_err": err})

    # Medusa's layout: one [2 * NL, B, Hkv, S, D] buffer, K layers then V layers
    data = torch.randn(2 * NL, B, H, S, D, generator=gen, device=dev, dtype=dtype)
    select = node_ids[0] + L

    def medusa_ref():
        for _ in range(REPS):
            tgt = data[..., select, :]
            data[..., L : L + A, :].copy_(tgt, non_blocking=True)

    def per_layer():
        for cache in (k, v):
            for layer in range(NL):
                cache[layer, :, L : L + A].copy_(cache[layer, :, select])

    time_modes("medusa_ref", medusa_ref, REPS)
    time_modes("per_layer", per_layer, 1)
    return rows


def _cuda_rows(ctx: BenchContext) -> list[dict]:
    impls = ["triton"] + (["cuda"] if cuda_extension() is not None else [])
    rows = []
    for H in (32, 8):
        try:
            rows += _cuda_case(ctx, H, impls)
        except Exception as e:  # inputs raised (out of memory included): the next case runs
            rows.append(failure_row(ctx, SECTION, impls[0], e, True, Hkv=H))
        if not cuda_usable(ctx):
            return rows
    return rows


def _cpu_rows(ctx: BenchContext) -> list[dict]:
    NL, B, S, H, D, A = 2, 2, 64, 2, 16, 4
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(NL, B, S, H, D, generator=gen)
    v = torch.randn(NL, B, S, H, D, generator=gen)
    idx = torch.tensor([[0, 2, 5, 9], [0, 1, 3, 4]])
    acc = torch.tensor([4, 2], dtype=torch.int32)
    lens0 = torch.tensor([10, 30], dtype=torch.int32)
    lens = lens0.clone()
    nbytes = 2 * NL * A * H * D * 4 * 2
    case = dict(NL=NL, B=B, S=S, Hkv=H, D=D, accepted=A, dtype="float32", mode="eager")

    def ref():
        lens.copy_(lens0)
        compact_kv_cache_ref(k, v, lens, idx, acc)

    row = timed_row(ctx, SECTION, "torch", ref, nbytes, flops=0, **case)
    if triton_interpreted():
        row["check"], row["max_err"] = _check("triton", k, v, lens0, idx, acc)
        table = torch.arange(B * 4, dtype=torch.int32).view(B, 4)  # paged: bs 16, 4 blocks each
        paged = k.view(NL, B * 4, 16, H, D), v.view(NL, B * 4, 16, H, D)
        check, err = _check("triton", *paged, lens0, idx, acc, block_table=table)
        row["check_paged"], row["max_err_paged"] = check, err
    else:
        row["check"], row["max_err"] = "not run: TRITON_INTERPRET=1 not set", float("nan")
    return [row]


def run(ctx: BenchContext) -> list[dict]:
    return _cuda_rows(ctx) if ctx.cuda else _cpu_rows(ctx)
