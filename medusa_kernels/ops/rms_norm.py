"""RMSNorm, optionally after a residual add, in one launch.

For each row x of length N (the last dim), with h = x + residual (in x's dtype) or h = x::

    Llama:  out = weight * (hf * rsqrt(mean(hf^2) + eps)).to(x.dtype)        hf = h.float()
    Gemma:  out = (hf * rsqrt(mean(hf^2) + eps) * (1 + weight.float())).to(x.dtype)

transformers' rounding: the variance in fp32, the normed row cast back to x's dtype before the
Llama weight (the product in the promoted dtype of x and weight), Gemma's ``unit_offset`` all in
fp32. Shapes: x, residual [..., N] (last dim contiguous, any other strides), weight [N].
Serves the block norms, Gemma-2/3's sandwich norms, the final norm and Qwen3/Gemma-3's q/k
norms (N = head dim).

Triton kernel: one program per row, the whole row in registers (BLOCK_N = next power of two of
N <= 65536); it reads x (and residual), writes h when there is a residual, and out. fp32
arithmetic, the casts where the reference rounds, so fp16/bf16 results equal the reference's
but for the order of the sum of squares.
"""

from __future__ import annotations

import torch

from ._backend import FLOAT_DTYPES, HAS_TRITON, check_dim, check_real, check_tensor, pick_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_N = 65536  # one row per program, in registers


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain PyTorch (the ground truth and the ``torch`` backend): the decoder's RMSNorm op for
    op. Returns (out, h) with h = x + residual, or (out, None) without a residual."""
    h = x if residual is None else x + residual
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        out = (hf * (1.0 + weight.float())).to(x.dtype)
    else:
        out = weight * hf.to(x.dtype)
    return out, (None if residual is None else h)


def out_dtype(x: torch.Tensor, weight: torch.Tensor, unit_offset: bool) -> torch.dtype:
    """x's dtype (Gemma), or x's promoted with the weight's (Llama: ``weight * normed``)."""
    return x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)


def check_rms_norm_args(x, weight, eps, residual=None, unit_offset=False) -> None:
    """Validate shapes, dtypes, devices and the eps; errors name the argument."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., N] with N >= 1, got shape {tuple(x.shape)}")
    N = x.shape[-1]
    if x.stride(-1) != 1 and N > 1:
        raise ValueError(f"x must have a contiguous last dim, got strides {x.stride()}")
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_dim("weight", weight, 0, N, "the last dim N of x")
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.stride(-1) != 1 and N > 1:
            raise ValueError(
                f"residual must have a contiguous last dim, got strides {residual.stride()}"
            )
    check_real("eps", eps)
    if not isinstance(unit_offset, bool):
        raise TypeError(f"unit_offset must be a bool, got {type(unit_offset).__name__}")


def leading3(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int, int]]:
    """(t, sizes, strides) of t's leading dims (all but the last) as exactly three, padded with
    size-1 dims in front; more than three leading dims are reshaped to one (a copy only where
    they cannot be viewed so). Lets a kernel walk any strided row layout, such as the q or k
    heads inside a fused q|k|v projection output, without a copy."""
    if t.dim() > 4:
        t = t.reshape(-1, t.shape[-1])
    pad = 4 - t.dim()
    sizes = (1,) * pad + tuple(t.shape[:-1])
    strides = (0,) * pad + tuple(t.stride()[:-1])
    return t, sizes, strides


def needs_grad(*tensors) -> bool:
    """Whether autograd records a call on these tensors (the kernels have no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def pick_impl(op: str, backend: str, device, impls: dict, triton_ok: bool, *tensors) -> str:
    """``pick_backend`` for the fused ops, which differentiate only through their reference:
    where autograd records the call, "auto" takes the reference and "triton" raises."""
    grad = needs_grad(*tensors)
    impl = pick_backend(op, backend, device, impls, triton_ok=triton_ok and not grad)
    if grad and impl != "torch":
        raise RuntimeError(
            f"{op}: backend {backend!r} has no backward; use backend='torch' (or 'auto') for "
            "inputs that require grad, or call it under torch.no_grad()"
        )
    return impl


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        X_ptr, R_ptr, W_ptr, Y_ptr, H_ptr,
        N, A1, A2, eps,
        x_s0, x_s1, x_s2, r_s0, r_s1, r_s2,
        HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Program r normalises row r = (i0, i1, i2) of x (+ residual); Y, H contiguous."""
        i_r = tl.program_id(0).to(tl.int64)
        i2 = i_r % A2
        i1 = (i_r // A2) % A1
        i0 = i_r // A2 // A1
        o_n = tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_x = tl.load(X_ptr + i0 * x_s0 + i1 * x_s1 + i2 * x_s2 + o_n, mask=m_n, other=0.0)
        if HAS_RESIDUAL:
            b_r = tl.load(R_ptr + i0 * r_s0 + i1 * r_s1 + i2 * r_s2 + o_n, mask=m_n, other=0.0)
            b_x = (b_x.to(tl.float32) + b_r.to(tl.float32)).to(X_ptr.dtype.element_ty)
            tl.store(H_ptr + i_r * N + o_n, b_x, mask=m_n)
        b_xf = b_x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(b_xf * b_xf, 0) / N + eps)
        b_w = tl.load(W_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
        if UNIT_OFFSET:
            b_y = b_xf * rstd * (1.0 + b_w)
        else:
            b_y = (b_xf * rstd).to(X_ptr.dtype.element_ty).to(tl.float32) * b_w
        tl.store(Y_ptr + i_r * N + o_n, b_y.to(Y_ptr.dtype.element_ty), mask=m_n)


def _num_warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher (arguments as ``rms_norm``, already checked): one program per row. Returns
    (out, h or None), new contiguous tensors; no host sync."""
    N = x.shape[-1]
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(
                f"rms_norm: the triton backend supports {name} dtypes "
                f"{[str(d) for d in TRITON_DTYPES]}, got {t.dtype} (use backend='torch')"
            )
    if N > MAX_N:
        raise ValueError(f"rms_norm: the triton backend supports N <= {MAX_N}, got N = {N}")
    out = torch.empty(x.shape, dtype=out_dtype(x, weight, unit_offset), device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out, h
    xr, sizes, xs = leading3(x)
    rr, rs = (xr, xs) if residual is None else leading3(residual)[::2]
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(sizes[0] * sizes[1] * sizes[2],)](
        xr, rr, weight, out, out if h is None else h,
        N, sizes[1], sizes[2], float(eps), *xs, *rs,
        HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, BLOCK_N=block,
        num_warps=_num_warps(block),
    )  # fmt: skip
    return out, h


def triton_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether "auto" takes the Triton kernel: fp16/bf16/fp32 x and weight, N <= MAX_N."""
    return x.dtype in TRITON_DTYPES and weight.dtype in TRITON_DTYPES and x.shape[-1] <= MAX_N


_IMPLS = {"torch": rms_norm_ref}
if HAS_TRITON:
    _IMPLS["triton"] = rms_norm_triton


@torch.library.custom_op("medusa_kernels::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool, backend: str
) -> torch.Tensor:
    return _IMPLS[backend](x, weight, eps, None, unit_offset)[0].contiguous()


@_rms_norm_op.register_fake
def _(x, weight, eps, unit_offset, backend):
    return torch.empty(x.shape, dtype=out_dtype(x, weight, unit_offset), device=x.device)


@torch.library.custom_op("medusa_kernels::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    eps: float,
    unit_offset: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, h = _IMPLS[backend](x, weight, eps, residual, unit_offset)
    return out.contiguous(), h.contiguous()


@_add_rms_norm_op.register_fake
def _(x, weight, residual, eps, unit_offset, backend):
    out = torch.empty(x.shape, dtype=out_dtype(x, weight, unit_offset), device=x.device)
    return out, torch.empty(x.shape, dtype=x.dtype, device=x.device)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the last dim, after an optional residual add, in one launch.

    Args:
        x: [..., N] float, last dim contiguous (other strides free: a view is read in place).
        weight: [N] float (any float dtype: Llama multiplies in the promoted dtype, Gemma in
            fp32).
        eps: >= 0, added to the mean square.
        residual: None, or [..., N] of x's shape and dtype: the norm is of h = x + residual,
            added in x's dtype (the decoder's ``x = x + h``).
        unit_offset: Gemma's ``(1 + weight)`` in fp32 (out in x's dtype) instead of Llama's
            ``weight * normed.to(x.dtype)`` (out in the promoted dtype).
        backend: "auto" (Triton on CUDA tensors of fp16/bf16/fp32, the reference elsewhere),
            "torch" (the reference) or "triton".
    Returns:
        out [..., N] contiguous without a residual; with one, the tuple (out, h), h [..., N]
        contiguous in x's dtype (the new residual stream).

    Eager calls run the implementation directly; torch.compile traces the registered custom op.
    Inputs that require grad take the reference (the kernel has no backward).

    Example: ``x = rms_norm(x, norm.weight, eps)``; in a block
    ``normed, x = rms_norm(h, ffn_norm.weight, eps, residual=x)``.
    """
    check_rms_norm_args(x, weight, eps, residual, unit_offset)
    impl = pick_impl("rms_norm", backend, x.device, _IMPLS, triton_supports(x, weight), x,
                     weight, residual)  # fmt: skip
    if not torch.compiler.is_compiling():  # eager: no dispatcher hop (the op is for tracing)
        out, h = _IMPLS[impl](x, weight, float(eps), residual, unit_offset)
        return out.contiguous() if h is None else (out.contiguous(), h.contiguous())
    if residual is None:
        return _rms_norm_op(x, weight, float(eps), unit_offset, impl)
    return _add_rms_norm_op(x, weight, residual, float(eps), unit_offset, impl)
