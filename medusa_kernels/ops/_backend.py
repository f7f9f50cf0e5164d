"""Backend selection and argument checks shared by every op.

Each op keeps a table ``{backend name: implementation}``. ``pick_backend`` turns the user's
``backend=`` ("auto", "torch", "triton", "cuda") into one entry of that table:

- "auto" takes the first usable backend of the op's preference order on CUDA tensors and the
  plain PyTorch reference ("torch") everywhere else;
- a named backend that the op does not have, or that cannot run on the tensors' device, raises
  a ``RuntimeError`` that says why (for example Triton on CPU tensors without
  ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_values(device: torch.device) -> bool:
    """Whether an op validates tensor *values* (lengths, indices) on the host: always for CPU
    tensors (no device to sync with), for CUDA tensors only with ``MEDUSA_KERNELS_CHECKS=1``
    (one host sync per call: for debugging; without it the kernels clamp or skip invalid
    rows instead), never while torch.compile traces (the values are data-dependent)."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" or os.environ.get("MEDUSA_KERNELS_CHECKS", "0") == "1"


@functools.cache
def cuda_extension():
    """The compiled ``medusa_kernels._C`` module, or None where it was not built (looked up
    once: a failed import is not cached by Python and would search the disk on every call)."""
    try:
        from medusa_kernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def backend_unusable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``; None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return (
            f"Triton kernels need CUDA tensors (got {device.type}); on the CPU set "
            "TRITON_INTERPRET=1 before importing medusa_kernels to run them in the interpreter"
        )
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got {device.type})"
        if cuda_extension() is None:
            return "medusa_kernels._C was not built (install on a machine with nvcc and CUDA torch)"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: a stand-in for the interpreter),
    for launch sizes that fill the GPU from static shapes only."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pick_backend(
    op: str,
    backend: str,
    device: torch.device,
    impls: dict[str, Callable],
    auto_order: Sequence[str] = ("triton", "torch"),
    *,
    triton_ok: bool = True,
) -> str:
    """Resolve ``backend`` for ``op`` on ``device`` to a key of ``impls``. ``triton_ok=False``
    (the op's Triton kernel does not cover these arguments) keeps "auto" off Triton."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for name in auto_order:
            if name == "triton" and not triton_ok:
                continue
            if name in impls and backend_unusable_reason(name, device) is None:
                return name
        return "torch"
    if backend not in impls:
        raise RuntimeError(
            f"{op}: backend {backend!r} is not implemented; available: {sorted(impls)}"
        )
    reason = backend_unusable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {reason}")
    return backend


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank, dtype and device; errors name ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ndims:
            want = " or ".join(str(n) for n in ndims)
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")
    return t


def check_real(name: str, value: object, *, low: float = 0.0) -> float:
    """``value`` as a float: a finite real number (not a bool) >= ``low``; errors name it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")
    return float(value)


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """Raise if ``t.shape[dim] != expected``; ``what`` names the expected size."""
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}: dim {dim} must be {what} = {expected}"
        )


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


# Per-SM limits of the GPU generations the kernels are tuned for (cuda_occupancy.h, CUDA 13):
# registers, shared memory per SM and per CTA (opt-in maximum, bytes), resident CTAs and warps.
SM_LIMITS = {
    80: {"regs": 65536, "smem": 167936, "smem_cta": 166912, "ctas": 32, "warps": 64},  # A100
    89: {"regs": 65536, "smem": 102400, "smem_cta": 101376, "ctas": 24, "warps": 48},  # L4/L40
    90: {"regs": 65536, "smem": 233472, "smem_cta": 232448, "ctas": 32, "warps": 64},  # H100/H200
}
SMEM_RESERVED_PER_CTA = 1024  # the driver reserves 1 KB of shared memory per CTA (sm_80+)
SMEM_GRANULE = 128  # shared memory is allocated per CTA in units of 128 bytes (sm_80+)
REG_GRANULE = 256  # registers are allocated per warp in units of 256
SUB_PARTITIONS = 4  # an SM's register file is split between 4 schedulers, a warp lives in one


def occupancy(n_regs: int, shared_bytes: int, num_warps: int, arch: int = 90) -> int:
    """CTAs of a compiled kernel resident per SM, as CUDA's occupancy calculator computes them
    (cuda_occupancy.h, default carve-out; tested against it): the minimum over registers (per
    warp in units of 256, per sub-partition: 4 x floor(16384 / registers per warp) warps),
    shared memory (+1 KB reserved per CTA, in 128-byte units; 0 when one CTA exceeds the opt-in
    maximum), warps and the CTA cap. ``n_regs``/``shared_bytes``: the compiled kernel's metadata
    (``CompiledKernel.n_regs``, ``.metadata.shared``: Triton's shared memory is all dynamic);
    ``arch``: compute capability as 80, 89, 90 (the nearest generation at or below it)."""
    lim = SM_LIMITS[min(SM_LIMITS, key=lambda a: (a > arch, abs(a - arch)))]
    regs_per_warp = -(-max(n_regs, 1) * 32 // REG_GRANULE) * REG_GRANULE
    warps_by_regs = SUB_PARTITIONS * (lim["regs"] // SUB_PARTITIONS // regs_per_warp)
    cta_regs = regs_per_warp * -(-num_warps // SUB_PARTITIONS) * SUB_PARTITIONS
    if n_regs > 255 or cta_regs > lim["regs"] or shared_bytes > lim["smem_cta"]:
        return 0
    smem = -(-(shared_bytes + SMEM_RESERVED_PER_CTA) // SMEM_GRANULE) * SMEM_GRANULE
    by_smem = lim["smem"] // smem
    return max(0, min(warps_by_regs // num_warps, by_smem, lim["warps"] // num_warps, lim["ctas"]))


def cuda_arch(device: torch.device) -> int:
    """Compute capability of a CUDA device as 80, 86, 90, ..."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_arch_of(index)


@functools.cache
def _cuda_arch_of(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _specialisation(arg) -> tuple:
    """What Triton compiles into a kernel about one argument: a tensor's dtype and 16-byte
    alignment, an int's being 1 or a multiple of 16 (``do_not_specialize`` aside)."""
    if isinstance(arg, torch.Tensor):
        return (str(arg.dtype), arg.data_ptr() % 16 == 0)
    if isinstance(arg, int) and not isinstance(arg, bool):
        return (arg == 1, arg % 16 == 0)
    return (str(arg),)


CAPTURE_OCCUPANCY: dict[str, int] | None = None  # the AOT capture's: kernel name -> CTAs/SM used
_DERIVED_OCCUPANCY: dict[tuple, int] = {}


def ctas_per_sm(kernel, args: Sequence, kwargs: dict, static: int, device: torch.device) -> int:
    """CTAs per SM of ``kernel[grid](*args, **kwargs)`` for launch sizes that fill the GPU in one
    wave: on CUDA derived from the compiled kernel's registers and shared memory (``occupancy``)
    the first time a configuration (kernel, constexprs, warps, stages, dtypes, device) is seen,
    then cached; elsewhere ``static``, which must equal what the sm_90 compile gives
    (test_triton_compile.py checks it). No device sync; like any Triton kernel's first launch,
    the first call of a configuration compiles and loads the kernel, so it belongs outside a
    CUDA graph capture."""
    name = getattr(kernel, "fn", kernel).__name__
    value = static
    if device.type == "cuda" and not triton_interpreted():
        key = (name, device.index, tuple(sorted((k, str(v)) for k, v in kwargs.items())),
               tuple(_specialisation(a) for a in args))
        value = _DERIVED_OCCUPANCY.get(key)
        if value is None:
            with torch.cuda.device(device):  # compiled and measured on the tensors' own GPU
                compiled = kernel.warmup(*args, grid=(1,), **kwargs)
                compiled._init_handles()  # loads the module: fills n_regs
            value = max(1, occupancy(compiled.n_regs, compiled.metadata.shared,
                                     compiled.metadata.num_warps, cuda_arch(device)))
            _DERIVED_OCCUPANCY[key] = value
    if CAPTURE_OCCUPANCY is not None:
        CAPTURE_OCCUPANCY[name] = value
    return value
