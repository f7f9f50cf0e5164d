"""Token embedding, optionally scaled (Gemma's ``x sqrt(d)``), in one launch.

For each token id r of ``tokens`` [...] int::

    out[r] = weight[tokens[r]] * scale          (the product rounded to weight's dtype)

as transformers' Gemma computes ``embed_tokens(ids) * normalizer`` with the normalizer already
rounded to the weights' dtype (the caller passes that rounded value as a float). Shapes:
tokens [...] int32/int64, weight [V, d] (rows contiguous) -> out [..., d] in weight's dtype.

Triton kernel: grid (tokens, cdiv(d, BLOCK_D)); a program copies one block of one row, the
product in fp32 rounded once. An id outside [0, V) writes zeros on the device (never a read out
of bounds); the launcher rejects it for CPU tensors (or with MEDUSA_KERNELS_CHECKS=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INDEX_DTYPES,
    check_real,
    check_tensor,
    check_values,
    pick_backend,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def embedding_ref(tokens: torch.Tensor, weight: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch (the ground truth and the ``torch`` backend): ``F.embedding`` times the
    scale, in weight's dtype."""
    x = F.embedding(tokens, weight)
    return x if scale is None else x * scale


def check_embedding_args(tokens, weight, scale) -> None:
    """Validate shapes, dtypes, devices and the scale; where ``check_values`` the ids."""
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("tokens", tokens, dtypes=INDEX_DTYPES, device=weight.device)
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        raise ValueError(f"weight must have contiguous rows, got strides {weight.stride()}")
    if scale is not None:
        check_real("scale", scale)
    if check_values(weight.device) and tokens.numel():
        lo, hi = torch.aminmax(tokens)
        if int(lo) < 0 or int(hi) >= weight.shape[0]:
            raise ValueError(f"tokens must lie in [0, V = {weight.shape[0]}), got ids in "
                             f"[{int(lo)}, {int(hi)}]")


if HAS_TRITON:

    @triton.jit
    def _embedding_kernel(
        tokens_ptr, W_ptr, Y_ptr,
        V, D, scale, w_stride_v,
        SCALED: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Program (token r, column block j): Y[r, j-block] (Y contiguous [N, D])."""
        i_r = tl.program_id(0).to(tl.int64)
        o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        tok = tl.load(tokens_ptr + i_r).to(tl.int64) + tl.zeros([BLOCK_D], dtype=tl.int64)
        ok = (tok >= 0) & (tok < V)
        row = tl.where(ok, tok, 0)
        b_w = tl.load(W_ptr + row * w_stride_v + o_d, mask=m_d & ok, other=0.0)
        if SCALED:
            b_w = (b_w.to(tl.float32) * scale).to(Y_ptr.dtype.element_ty)
        tl.store(Y_ptr + i_r * D + o_d, b_w, mask=m_d)


def embedding_triton(tokens: torch.Tensor, weight: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Launcher (arguments as ``embedding``, already checked): a new contiguous [..., d]."""
    if weight.dtype not in TRITON_DTYPES:
        raise ValueError(f"embedding: the triton backend supports weight dtypes "
                         f"{[str(d) for d in TRITON_DTYPES]}, got {weight.dtype} (use "
                         "backend='torch')")
    V, D = weight.shape
    out = torch.empty(*tokens.shape, D, dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    flat = tokens.reshape(-1)
    block = min(1024, triton.next_power_of_2(D))
    grid = (flat.shape[0], triton.cdiv(D, block))
    _embedding_kernel[grid](
        flat, weight, out, V, D, 1.0 if scale is None else float(scale), weight.stride(0),
        SCALED=scale is not None, BLOCK_D=block, num_warps=4 if block >= 512 else 1,
    )  # fmt: skip
    return out


_IMPLS = {"torch": embedding_ref}
if HAS_TRITON:
    _IMPLS["triton"] = embedding_triton


@torch.library.custom_op("medusa_kernels::embedding", mutates_args=())
def _embedding_op(tokens: torch.Tensor, weight: torch.Tensor, scale: float | None,
                  backend: str) -> torch.Tensor:
    return _IMPLS[backend](tokens, weight, scale).contiguous()


@_embedding_op.register_fake
def _(tokens, weight, scale, backend):
    return torch.empty(*tokens.shape, weight.shape[1], dtype=weight.dtype, device=weight.device)


def embedding(tokens: torch.Tensor, weight: torch.Tensor, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Rows of ``weight`` for ``tokens``, times ``scale`` (Gemma), in one launch.

    Args:
        tokens: [...] int32/int64 ids in [0, V). On CPU tensors (or with
            MEDUSA_KERNELS_CHECKS=1) an id outside raises a ValueError; on CUDA without it its
            row is zeros.
        weight: [V, d] float, rows contiguous.
        scale: None, or a finite float >= 0 multiplied in (already rounded to weight's dtype
            when transformers rounds it: Gemma's normalizer).
        backend: "auto" (Triton on CUDA tensors of fp16/bf16/fp32, the reference elsewhere),
            "torch" (the reference) or "triton".
    Returns:
        [..., d] contiguous, weight's dtype.

    Example: ``x = embedding(ids, embed.weight, float(torch.tensor(d ** 0.5).to(dtype)))``.
    """
    check_embedding_args(tokens, weight, scale)
    impl = pick_backend("embedding", backend, weight.device, _IMPLS,
                        triton_ok=weight.dtype in TRITON_DTYPES)  # fmt: skip
    return _embedding_op(tokens, weight, None if scale is None else float(scale), impl)
