"""Timing helpers shared by the benchmark sections.

Every section module in this package exposes ``run(ctx: BenchContext) -> list[dict]``: one row
per (case, implementation), built with ``timed_row``. Times are medians with 20th/80th
percentiles: ``triton.testing.do_bench`` on CUDA, a wall-clock loop on the CPU.

Each timed row is set against two limits: the bytes floor (its minimum traffic over the copy
bandwidth measured in the same run) and the roofline, the larger of that floor and its minimum
FLOPs at the device's dense bf16 tensor-core peak (``PEAK_BF16_TFLOPS``, from the datasheets).
"""

from __future__ import annotations

import re
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class BenchContext:
    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    shapes: str | None = None  # free-form filter a section may read (e.g. "L=4096")
    copy_gbps: float | None = None  # measured copy bandwidth of this device, this run
    notes: list[str] = field(default_factory=list)
    model_dir: str | None = None  # e2e: a real base model (HF layout); None = the demo model
    medusa_dir: str | None = None  # e2e: its Medusa heads (None = heads inside model_dir)
    tree: str | None = None  # e2e: tree name or JSON file (None = mc_sim_7b_63)
    on_row: Callable[[dict], None] | None = None  # progress hook, called by ``timed_row``
    peak_tflops: float | None = None  # dense bf16 tensor-core peak (None: no roofline)
    out_dir: str | None = None  # where the run writes (sections may put files beside the JSON)
    stem: str | None = None  # the result files' name without extension
    meta: dict | None = None  # the run's metadata (device, versions, commit), for such files

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, as NVIDIA's datasheets state them
# (the datasheets print the sparse figure, twice these). fp16 has the same peak on these parts.
# First match wins: the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0, "NVIDIA H100 datasheet, PCIe: 1513 with sparsity"),
    (r"\bH100\b.*\bNVL\b", 835.5, "NVIDIA H100 NVL datasheet: 1671 with sparsity"),
    (r"\bH200\b.*\bNVL\b", 835.5, "NVIDIA H200 datasheet, NVL: 1671 with sparsity"),
    (r"\bGH200\b", 989.4, "NVIDIA GH200 datasheet: 1979 with sparsity"),
    (r"\bH200\b", 989.4, "NVIDIA H200 datasheet, SXM: 1979 with sparsity"),
    (r"\bH100\b", 989.4, "NVIDIA H100 datasheet, SXM: 1979 with sparsity"),
    (r"\bA100\b", 312.0, "NVIDIA A100 datasheet (SXM and PCIe): 624 with sparsity"),
    (r"\bL40S\b", 362.05, "NVIDIA L40S datasheet: 733 with sparsity"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: 242 with sparsity"),
    (r"\bA10\b", 125.0, "NVIDIA A10 datasheet: 250 with sparsity"),
)


def peak_bf16_tflops(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 peak in TFLOP/s, its source) for a GPU name as torch reports it, e.g.
    "NVIDIA H100 80GB HBM3", or None for a device not in ``PEAK_BF16_TFLOPS`` (CPUs too)."""
    for pattern, tflops, source in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, source
    return None


def roofline(bytes_moved: int, flops: int | None, copy_gbps: float | None,
             peak_tflops: float | None, median_us: float | None = None) -> dict:
    """The limits of one timed row, in microseconds.

    ``floor_us`` = bytes / copy bandwidth; ``roofline_us`` = max(floor_us, flops / peak), the
    fastest the row could run on this device (None without a peak or without its FLOPs);
    ``bound`` says which limit that is ("memory" or "compute"); ``intensity`` = FLOP per byte
    (compute-bound when above the ridge, peak / bandwidth); ``frac_*`` = limit / median.
    """
    floor_us = bytes_moved / (copy_gbps * 1e9) * 1e6 if copy_gbps else None
    out: dict = {"floor_us": floor_us}
    if flops is not None:
        out["flops"] = int(flops)
        if flops:  # a copy (0 FLOPs) has no intensity to show
            out["intensity"] = flops / bytes_moved if bytes_moved else None
    roof = bound = None
    if flops is not None and floor_us is not None and peak_tflops:
        compute_us = flops / (peak_tflops * 1e12) * 1e6
        roof, bound = max(floor_us, compute_us), "compute" if compute_us > floor_us else "memory"
    if flops is not None:
        out["roofline_us"], out["bound"] = roof, bound
    if median_us:
        if median_us > 0 and flops:
            out["tflops"] = flops / (median_us * 1e-6) / 1e12
        out["frac_floor"] = floor_us / median_us if floor_us else None
        if flops is not None:
            out["frac_roofline"] = roof / median_us if roof else None
    return out


def case_wanted(ctx: BenchContext, case: dict) -> bool:
    """Whether ``case`` passes the ``key=value`` words of ``ctx.shapes`` (keys it lacks pass)."""
    for word in (ctx.shapes or "").replace(",", " ").split():
        key, _, value = word.partition("=")
        if key in case and str(case[key]) != value:
            return False
    return True


def graphed(fn: Callable[[], object], warmup: int = 2) -> Callable[[], None]:
    """Capture ``fn`` (warmed up on a side stream) into a CUDA graph; return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(fn: Callable[[], object], ctx: BenchContext) -> tuple[float, float, float]:
    """(median, p20, p80) of ``fn()`` in microseconds."""
    if ctx.cuda:
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return tuple(1e3 * t for t in ms)  # type: ignore[return-value]
    fn()
    times = []
    budget = 0.2 if ctx.quick else 1.0
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else times * 9
    return statistics.median(times), q[1], q[7]


def copy_bandwidth_gbps(ctx: BenchContext, nbytes: int = 1 << 30) -> float:
    """Achieved bandwidth (GB/s, read + write) of a large device copy, measured now."""
    if not ctx.cuda:
        nbytes = 1 << 26
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=ctx.device).uniform_()
    dst = torch.empty_like(src)
    median, _, _ = measure(lambda: dst.copy_(src), ctx)
    return 2 * nbytes / (median * 1e-6) / 1e9


def timed_row(
    ctx: BenchContext,
    section: str,
    impl: str,
    fn: Callable[[], object],
    bytes_moved: int,
    *,
    flops: int | None = None,
    **case: object,
) -> dict:
    """Time ``fn`` and return a row: times, GB/s, the fraction of the bandwidth floor and, with
    ``flops``, of the roofline.

    ``bytes_moved`` is the minimum traffic of the op (what must be read and written once), and
    ``flops`` its minimum arithmetic (multiply-adds count 2; None: not stated, no roofline);
    the floor is ``bytes_moved / copy bandwidth`` and ``frac_floor = floor / median`` (1.0 = at
    it); ``roofline_us`` and ``frac_roofline`` as ``roofline`` computes them.
    """
    median, p20, p80 = measure(fn, ctx)
    row = {
        "section": section,
        "impl": impl,
        **case,
        "median_us": median,
        "p20_us": p20,
        "p80_us": p80,
        "gbps": bytes_moved / (median * 1e-6) / 1e9,
        **roofline(bytes_moved, flops, ctx.copy_gbps, ctx.peak_tflops, median),
    }
    if ctx.on_row is not None:
        ctx.on_row(row)
    return row


def failure_row(
    ctx: BenchContext, section: str, impl: str, exc: BaseException, ours: bool, **case: object
) -> dict:
    """A row for a run that raised, so one failure does not cost the section its other rows.

    Our own kernels/steps get ``check`` "FAIL: ..." (the section fails); a peer that cannot run
    gets "not run: ..." (noted, the section stays ok). Call it inside the ``except`` block: the
    traceback's last frames go to the notes. Out-of-memory is not a failure: handle it first.
    """
    message = f"{type(exc).__name__}: {exc}".strip()[:300]
    where = " ".join(f"{k}={v}" for k, v in case.items())
    tail = traceback.format_exc(limit=-3).strip().splitlines()[-6:]
    ctx.notes.append(f"{section}: {impl} {where} raised {message} | " + " | ".join(tail))
    row = {"section": section, "impl": impl, **case,
           "check": f"FAIL: {message}" if ours else f"not run: {message}"}  # fmt: skip
    if ctx.on_row is not None:
        ctx.on_row(row)
    return row


def cuda_usable(ctx: BenchContext) -> bool:
    """Between cases on the GPU: synchronize and return the cached memory; False (noted) when
    CUDA is broken by a sticky error (an illegal address, say), so the section stops there
    and keeps the rows it has instead of raising from here and losing them."""
    try:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
    except RuntimeError as e:
        ctx.notes.append(f"CUDA unusable after an error, the section stops: {e}"[:400])
        return False
    return True


def timed_mode_row(
    ctx: BenchContext, section: str, impl: str, fn: Callable[[], object], bytes_moved: int,
    ours: bool, mode: str = "graph", *, flops: int | None = None, **case: object,
) -> dict | None:
    """``timed_row`` of ``fn`` called eagerly or replayed from a CUDA graph (``mode``), the
    graph's memory given back afterwards (so the pools of several implementations do not add
    up); ``flops`` as in ``timed_row``. Out of memory: a note and None. Another error: on the
    GPU a ``failure_row`` (the section's other rows survive), on the CPU it propagates."""
    try:
        run = graphed(fn) if mode == "graph" else fn
        row = timed_row(ctx, section, impl, run, bytes_moved, flops=flops, mode=mode, **case)
    except torch.cuda.OutOfMemoryError:
        ctx.notes.append(f"{section}: {impl} {mode} {case} ran out of memory; no row")
        torch.cuda.empty_cache()
        return None
    except Exception as e:  # e.g. a capture that fails: recorded, the run goes on
        if not ctx.cuda:
            raise
        return failure_row(ctx, section, impl, e, ours, mode=mode, **case)
    del run
    if ctx.cuda:
        torch.cuda.empty_cache()
    return row

