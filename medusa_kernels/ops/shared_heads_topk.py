"""Shared Medusa heads fused with top-k: every head's ResBlock, then ONE projection (the base
model's lm_head, or its rows of a trimmed vocabulary) for all K heads.

For token n and head k::

    h'[n, k]      = h[n] + SiLU(W1[k] h[n] + b1[k])
    logits[n, k]  = W h'[n, k]                    W: [R, d], the same for every head
    values, rows  = top-k of logits[n, k] over the R rows, sorted descending
    indices       = token_map[rows]               (rows themselves without a map)

Shapes: N tokens, d hidden size, K heads, R projection rows (V, or the trimmed vocabulary's
size), k top-k width.

Token map: ``weight`` holds the rows of the trimmed vocabulary, gathered from the lm_head once
when the heads are built (``MedusaHeads.attach_lm_head``), and ``token_map`` [R] int64 the token
id of each row, strictly ascending. Ties go to the lower row, which is the lower token id because
the map ascends: the same rule as every top-k op here (``heads_topk.topk_lower_index_first``).

Pre-gathered rows rather than a gather inside the kernel, by bytes read per step: a gather reads
the same R x d weight bytes plus R int64 indices (R * 8 bytes: 0.7% more at d 576 in bf16) and
puts a dependent index load in front of every tile's cp.async ring; the pre-gathered copy reads
exactly R x d contiguous rows with the tuned tile loop unchanged. It costs R x d extra weight
memory (16384 x 4096 bf16: 134 MB beside an 8B model's 16 GB), none when there is no map.

Triton path (``backend="triton"``): stage 1 of ``heads_topk`` (``_resblock_kernel``: h' [K, N,
d]), then its stages 2 and 3 (``_vocab_topk_kernel``, ``_merge_topk_kernel``) with ONE head over
the N * K rows of h': each weight tile is read once and multiplied with all K heads' hidden
rows (one [N*K, d] x [d, R] pass, tensor-core dots from N * K = 2 on), not K GEMVs over K
copies. Bytes per step: K * (d * d + d) ResBlock weights + R * d projection rows, against
K * (d * d + d + V * d) for separate heads.
"""

from __future__ import annotations

import torch

from ._backend import HAS_TRITON, check_dim, check_tensor, check_values, pick_backend
from ._linear import linear
from .heads_topk import (
    _check_k,
    _check_triton_inputs,
    _compute_dtype,
    check_resblock_args,
    resblocks_ref,
    topk_lower_index_first,
    triton_supports,
)

if HAS_TRITON:
    from .heads_topk import _launch_config, _resblocks, _vocab_topk


def shared_heads_topk_ref(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    token_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch shared heads + top-k (the ground truth and the ``torch`` backend): one
    [N*K, d] x [d, R] product for all heads (fp32; float64 for float64 inputs).

    hidden: [N, d]; w1: [K, d, d]; b1: [K, d]; weight: [R, d]; token_map: [R] int64 or None.
    Returns (values [N, K, k] float32, indices [N, K, k] int64 token ids).
    """
    dtype = _compute_dtype(hidden)
    h_res = resblocks_ref(hidden.to(dtype), w1.to(dtype), b1.to(dtype))  # [N, K, d]
    logits = linear(h_res, weight.to(dtype))  # [N, K, R]
    values, indices = topk_lower_index_first(logits, k)
    if token_map is not None:
        indices = token_map[indices]
    return values.float(), indices


def check_shared_heads_topk_args(hidden, w1, b1, weight, k, token_map) -> None:
    _, d = check_resblock_args(hidden, w1, b1)
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    check_dim("weight", weight, 1, d, "hidden size d")
    R = weight.shape[0]
    _check_k(k, R)
    if token_map is not None:
        check_token_map("token_map", token_map, R, device=hidden.device)


def check_token_map(name: str, token_map, rows: int, vocab_size: int | None = None,
                    device=None) -> None:
    """A token map: [rows] int64, strictly ascending ids in [0, vocab_size) (values checked on
    the host where ``check_values`` allows)."""
    if not isinstance(token_map, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(token_map).__name__}")
    if token_map.dtype != torch.int64 or token_map.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int64 tensor of token ids, got "
                         f"{token_map.dtype} of shape {tuple(token_map.shape)}")
    if token_map.shape[0] != rows:
        raise ValueError(f"{name} must hold one token id per projection row ({rows}), got "
                         f"{token_map.shape[0]}")
    if device is not None and token_map.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {token_map.device}")
    if check_values(token_map.device) and token_map.numel():
        if token_map.numel() > 1 and not bool((token_map[1:] > token_map[:-1]).all()):
            raise ValueError(f"{name} must be strictly ascending token ids (sorted, no repeats)")
        high = vocab_size if vocab_size is not None else 2**31 - 1
        if int(token_map[0]) < 0 or int(token_map[-1]) >= high:
            raise ValueError(f"{name} ids must lie in [0, {high}), got [{int(token_map[0])}, "
                             f"{int(token_map[-1])}]")


def shared_heads_topk_triton(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    token_map: torch.Tensor | None = None,
    *,
    chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher (arguments as ``shared_heads_topk``, already checked; ``chunks`` overrides the
    vocabulary split, for tests). Stage 1 over N tokens, stages 2-3 over the N * K rows of h'
    against the one weight. No host sync.

    hidden: [N, d]; w1: [K, d, d]; b1: [K, d]; weight: [R, d]. Returns (values [N, K, k]
    float32, indices [N, K, k] int64).
    """
    _check_triton_inputs("shared_heads_topk", hidden, k)
    N, d = hidden.shape
    K, R = w1.shape[0], weight.shape[0]
    if N == 0:
        return (hidden.new_empty(0, K, k, dtype=torch.float32),
                hidden.new_empty(0, K, k, dtype=torch.int64))  # fmt: skip
    M = N * K  # the rows of h' that meet each weight tile
    gemv_res, cfg_res = _launch_config(N, hidden.dtype, k, None, None, None, None, None)
    gemv, cfg = _launch_config(M, hidden.dtype, k, None, None, None, None, None)
    # h' in fp32 only for the one-row GEMV; the dots round it to the weights' dtype anyway
    h_res = _resblocks(hidden, w1, b1, gemv_res, cfg_res,
                       torch.float32 if gemv else hidden.dtype)  # [K, N, d]
    values, indices = _vocab_topk(weight, (0, *weight.stride()), h_res, (0, d, 1), 1, M, R, d,
                                  k, gemv, cfg, chunks)  # [M, 1, k], row m = head * N + token
    values = values.view(K, N, k).transpose(0, 1)
    indices = indices.view(K, N, k).transpose(0, 1)
    if token_map is not None:
        indices = token_map[indices]
    return values.contiguous(), indices.contiguous()


_IMPLS = {"torch": shared_heads_topk_ref}
if HAS_TRITON:
    _IMPLS["triton"] = shared_heads_topk_triton


@torch.library.custom_op("medusa_kernels::shared_heads_topk", mutates_args=())
def _shared_heads_topk_op(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    token_map: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _IMPLS[backend](hidden, w1, b1, weight, k, token_map)


@_shared_heads_topk_op.register_fake
def _(hidden, w1, b1, weight, k, token_map, backend):
    shape = (hidden.shape[0], w1.shape[0], k)
    return (
        hidden.new_empty(shape, dtype=torch.float32),
        hidden.new_empty(shape, dtype=torch.int64),
    )


def shared_heads_topk(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    token_map: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens of K Medusa heads that share one projection, without materialising logits.

    Args:
        hidden: [N, d] final (normed) hidden states of the base model.
        w1: [K, d, d] ResBlock weights (nn.Linear layout, out x in); b1: [K, d] their biases.
        weight: [R, d] the shared projection: the base model's lm_head (R = V), or its rows
            ``lm_head[token_map]`` of a trimmed vocabulary. hidden's dtype and device.
        k: top-k width, 1 <= k <= R.
        token_map: None, or [R] int64 strictly ascending: the token id of each weight row.
        backend: "auto" (Triton on CUDA tensors for fp16/bf16/fp32 and k <= 32, the reference
            elsewhere), "torch" or "triton".
    Returns:
        values [N, K, k] float32 logits sorted descending, indices [N, K, k] int64 token ids
        (ties: lower id first).

    Example: ``_, tokens = shared_heads_topk(h, w1, b1, model.lm_head.weight, 10)``.
    """
    check_shared_heads_topk_args(hidden, w1, b1, weight, k, token_map)
    name = pick_backend("shared_heads_topk", backend, hidden.device, _IMPLS,
                        triton_ok=triton_supports(hidden, k))
    return _shared_heads_topk_op(hidden, w1, b1, weight, k, token_map, name)
