"""``F.linear`` through the CPU's fastest call at few rows: one helper for every weight product
of a decode step on a CPU (the layers, the lm_head, the Medusa heads).

A decode step multiplies a few rows (1 token; a tree's T nodes) by each weight matrix. When the
weights stream from memory (a model larger than the last-level cache), a step should cost one
read of them. MKL's ``x @ w.T`` (``F.linear``) does not do that at 1-8 rows of a row-major fp32
weight [N, K]: it reads it at 4-10 GB/s on the project's 2-core EPYC (1 thread; 2 rows cost
twice one). ``w @ x.T``, the same products as a GEMM whose small side is the rows, reads it at
14-19 GB/s at 2 rows (1 thread) and 19-35 (2 threads), the machine's streaming rate, and at
11-14 / 12-25 GB/s at 3-4 rows where N >= K; one row is sent as two equal rows (one row alone
takes MKL's GEMV, 10 GB/s from memory). From the cache it is the other way round: there
``F.linear`` runs at about 40 GB/s and ``w @ x.T`` stays near 18, 2-3x slower (the demo's
matrices). Measured at SmolLM2-135M's and a 1024-wide Llama's shapes (``bench/cpu_linear.py``;
``bench/results/2026-12-07-cpu-linear.md``). The sums are the same products added in another
order (fp32 rounding), as any GEMM's.

``stream``: whether the weights come from memory; the model says so for its layers (their
bytes against the last-level cache), otherwise a matrix over ``STREAM_FRACTION`` of the cache.
Elsewhere (a GPU, fp16/bf16, autograd, under torch.compile, more rows): ``F.linear``.
"""

from __future__ import annotations

import functools
import glob

import torch
import torch.nn.functional as F

# the rows up to which ``w @ x.T`` beats ``F.linear``: always at 2, at 3-4 where N >= K
SKINNY_ROWS, WIDE_ROWS = 2, 4
STREAM_FRACTION = 1 / 8  # a matrix this share of the last-level cache: taken as streaming


@functools.lru_cache(maxsize=1)
def llc_bytes() -> int:
    """The CPU's last-level cache in bytes (Linux sysfs; 32 MiB where it cannot be read)."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 << 20


def skinny(rows: int, w: torch.Tensor, stream: bool | None = None) -> bool:
    """Whether ``linear`` takes ``w @ x.T`` for ``rows`` rows of ``w`` (module doc)."""
    if not (w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
            and w.stride(1) == 1 and 1 <= rows
            and (rows <= SKINNY_ROWS or (rows <= WIDE_ROWS and w.shape[0] >= w.shape[1]))
            and not (torch.is_grad_enabled() and w.requires_grad)
            and not torch.compiler.is_compiling()):
        return False
    if stream is None:
        stream = w.numel() * w.element_size() > STREAM_FRACTION * llc_bytes()
    return stream


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           stream: bool | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)``: x [..., K], w [N, K], b [N] or None -> [..., N] (contiguous);
    ``stream``: whether ``w`` comes from memory (None: judged by its size; module doc)."""
    if stream is False or x.device.type != "cpu":  # the common exits first: no checks
        return F.linear(x, w, b)
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if x.dtype != w.dtype or (torch.is_grad_enabled() and x.requires_grad) or \
            not skinny(rows, w, stream):
        return F.linear(x, w, b)
    x2 = x.reshape(rows, K)
    if rows == 1:
        x2 = torch.cat([x2, x2])
    out = (w @ x2.t())[:, :rows].t().contiguous()
    if b is not None:
        out += b
    return out.view(*x.shape[:-1], w.shape[0])
