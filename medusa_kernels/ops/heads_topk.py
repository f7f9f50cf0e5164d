"""Medusa heads (one ResBlock + vocabulary projection each) fused with top-k.

For token n and head k::

    h'[n, k]     = h[n] + SiLU(W1[k] h[n] + b1[k])
    logits[n, k] = W2[k] h'[n, k]
    values, indices = top-k of logits[n, k] over the vocabulary, sorted descending

Shapes: N tokens, d hidden size, K heads, V vocabulary, k top-k width. Ties are broken by the
lower vocabulary index first.
"""

from __future__ import annotations

import torch

from ._backend import FLOAT_DTYPES, check_dim, check_tensor, pick_backend


def topk_lower_index_first(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, sorted descending, ties broken by the lower index first."""
    values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
    return values[..., :k].contiguous(), indices[..., :k].contiguous()


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
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(dtype)
    z = torch.einsum("nd,ked->nke", h, w1.to(dtype)) + b1.to(dtype)
    h_res = h[:, None, :] + torch.nn.functional.silu(z)  # [N, K, d]
    logits = torch.einsum("nkd,kvd->nkv", h_res, w2.to(dtype))
    values, indices = topk_lower_index_first(logits, k)
    return values.float(), indices


def check_heads_topk_args(hidden, w1, b1, w2, k) -> None:
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    N, d = hidden.shape
    check_tensor("w1", w1, ndim=3, dtypes=(hidden.dtype,), device=hidden.device)
    K = w1.shape[0]
    if tuple(w1.shape) != (K, d, d):
        raise ValueError(f"w1 must be [K, d, d] with d = {d} (hidden's), got {tuple(w1.shape)}")
    check_tensor("b1", b1, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    if tuple(b1.shape) != (K, d):
        raise ValueError(f"b1 must be [K, d] = [{K}, {d}], got {tuple(b1.shape)}")
    check_tensor("w2", w2, ndim=3, dtypes=(hidden.dtype,), device=hidden.device)
    check_dim("w2", w2, 0, K, "number of heads K of w1")
    check_dim("w2", w2, 2, d, "hidden size d")
    if not isinstance(k, int) or not 1 <= k <= w2.shape[1]:
        raise ValueError(f"k must be an int in [1, V = {w2.shape[1]}], got {k!r}")


_IMPLS = {"torch": medusa_heads_topk_ref}


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
        w2: [K, V, d] each head's vocabulary projection. All in hidden's dtype and device.
        k: top-k width, 1 <= k <= V.
        backend: "auto", "torch" (the reference) or "triton".
    Returns:
        values [N, K, k] float32 logits sorted descending, indices [N, K, k] int64
        (ties: lower vocabulary index first).
    """
    check_heads_topk_args(hidden, w1, b1, w2, k)
    name = pick_backend("medusa_heads_topk", backend, hidden.device, _IMPLS)
    return _medusa_heads_topk_op(hidden, w1, b1, w2, k, name)
