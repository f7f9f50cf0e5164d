"""Vocabulary-parallel pieces: embedding lookup, logits gather and the exact top-k merge.

Rank r of N holds rows ``[start, stop) = vocab_range(V, N, r)`` of the embedding table, the
lm_head and every Medusa head's projection (``layout.py``). Shapes: ``*S`` any leading shape
(tokens, heads), d hidden size, V vocabulary, Vr = stop - start this rank's rows, k top-k width.

- ``vocab_parallel_embedding``: each rank looks up the tokens it holds, zeros the others, and
  an all-reduce sums the N partial rows (each token's row comes from exactly one rank and the
  rest add +0.0, so the result equals the full table's lookup bit for bit, -0.0 aside).
- ``gather_vocab``: logits [*S, Vr] -> [*S, V] on every rank (sampling paths that need the
  whole distribution).
- ``merge_topk``: each rank's top-k (values, GLOBAL indices) -> the top-k of the whole
  vocabulary, equal to the single-rank ``topk_lower_index_first`` of the full logits, ties to
  the lower global index. Payload: k int64 per row and rank.

Why merging per-rank top-k lists is exact: order candidates by (value descending, global index
ascending); indices are distinct, so this is a strict total order and the global top-k T is its
first k elements. Take t in T, held by rank r: the elements of rank r that precede t also
precede it globally, and fewer than k do, so t is among rank r's own first k, which is the
rank's top-k list under the same order (``topk_lower_index_first``, or the fused kernels, on
the rank's slice, with its local indices shifted by ``start``: shifting keeps the index order;
a rank holding fewer than k rows lists them all, padded with keys that sort last). So T lies
in the union of the lists, and the first k of the union under the same order are T, in order;
ties across shard boundaries included, since the order compares global indices.

The merge sends one int64 key per candidate, the fused kernels' key (``heads_topk.py``): the
fp32 value mapped to an order-preserving int32 (-0.0 read as +0.0, every NaN as the positive
quiet NaN, above +inf, as torch.sort places NaN) in the high half, ``2**31 - 1 - index`` in the
low half. Keys are distinct and ordered exactly as (value descending, index ascending), so the
merge is one all-gather and one ``torch.topk`` of distinct integers: deterministic, no host
sync, CUDA-graph capturable. Decoding returns -0.0 as +0.0 and NaN payloads as the one NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops._backend import check_values
from ..ops.heads_topk import NO_INDEX, lm_head_topk, medusa_heads_topk, topk_lower_index_first
from .group import TPGroup
from .layout import vocab_range

_LOW = 0xFFFFFFFF
_MAGNITUDE = 0x7FFFFFFF
_EMPTY_KEY = -(2**63)  # pads a short list: sorts after every key topk_keys makes


def _rank_vocab(tp: TPGroup, vocab_size: int, rows: int, what: str) -> tuple[int, int]:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < tp.world:
        raise ValueError(f"vocab_size must be an int >= world = {tp.world}, got {vocab_size!r}")
    start, stop = vocab_range(vocab_size, tp.world, tp.rank)
    if rows != stop - start:
        raise ValueError(f"{what} has {rows} vocabulary rows; rank {tp.rank} of {tp.world} holds "
                         f"[{start}, {stop}) of vocab_size = {vocab_size}: {stop - start} rows")
    return start, stop


def vocab_parallel_embedding(
    tokens: torch.Tensor, weight: torch.Tensor, tp: TPGroup, vocab_size: int
) -> torch.Tensor:
    """Embedding lookup with a vocabulary-split table.

    tokens: [*S] int64/int32 in [0, vocab_size); weight: [Vr, d], this rank's rows of the
    table. Returns [*S, d] in weight's dtype, equal on every rank to ``F.embedding(tokens,
    full_table)``. World 1: ``F.embedding(tokens, weight)``.
    """
    start, stop = _rank_vocab(tp, vocab_size, weight.shape[0], "weight")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be int64 or int32, got {tokens.dtype}")
    if check_values(tokens.device) and tokens.numel():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"tokens must lie in [0, vocab_size = {vocab_size}), got values in "
                             f"[{low}, {high}]")
    if tp.world == 1:
        return F.embedding(tokens, weight)
    mine = (tokens >= start) & (tokens < stop)
    out = F.embedding(torch.where(mine, tokens - start, 0), weight)
    out.masked_fill_(~mine[..., None], 0.0)  # not a product: other rows may hold inf/NaN
    return tp.all_reduce(out)


def gather_vocab(logits: torch.Tensor, tp: TPGroup, vocab_size: int) -> torch.Tensor:
    """This rank's logits [*S, Vr] -> the whole vocabulary's [*S, V], on every rank (one
    all-gather of max Vr columns per row and rank). World 1: ``logits`` itself."""
    _rank_vocab(tp, vocab_size, logits.shape[-1], "logits")
    if tp.world == 1:
        return logits
    widest = -(-vocab_size // tp.world)  # ranks hold widest or widest - 1 rows
    padded = F.pad(logits, (0, widest - logits.shape[-1]))
    gathered = tp.all_gather(padded)  # [world, *S, widest]
    parts = []
    for rank in range(tp.world):
        start, stop = vocab_range(vocab_size, tp.world, rank)
        parts.append(gathered[rank, ..., : stop - start])
    return torch.cat(parts, dim=-1)


def topk_keys(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (value descending, index ascending), distinct for distinct
    indices. values: [*S] float (read as fp32); indices: [*S] int in [0, 2**31 - 1)."""
    v = values.float()
    v = torch.where(v == 0, 0.0, v)  # -0.0 -> +0.0
    v = torch.where(v.isnan(), float("nan"), v)  # one NaN, the positive quiet one
    bits = v.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & _MAGNITUDE)
    return ordered.to(torch.int64) * 2**32 + (NO_INDEX - indices.to(torch.int64))


def keys_topk(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``topk_keys``: keys [*S] int64 -> (values [*S] float32, indices [*S]
    int64)."""
    ordered = (keys >> 32).to(torch.int32)
    values = (ordered ^ ((ordered >> 31) & _MAGNITUDE)).view(torch.float32)
    return values, NO_INDEX - (keys & _LOW)


def merge_topk_keys(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest keys of every rank's list, sorted descending: keys [world, *S, k'] with
    k <= world * k' -> [*S, k]."""
    flat = keys.movedim(0, -2).flatten(-2)  # [*S, world * k']
    return torch.topk(flat, k, dim=-1).values


def merge_topk(
    values: torch.Tensor, indices: torch.Tensor, tp: TPGroup, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every rank's top-k into the top-k of the whole vocabulary.

    values: [*S, k'] this rank's top-k' logits, sorted or not (float; compared as fp32);
    indices: [*S, k'] their GLOBAL vocabulary ids (int64, distinct across ranks, < 2**31 - 1);
    k: the width of the result (default k'). A rank with fewer than k vocabulary rows passes
    k' < k (all its rows): its list is padded with keys that sort after every candidate, so k'
    may differ between ranks as long as the ranks hold at least k candidates together.
    Returns (values [*S, k] float32 sorted descending, indices [*S, k] int64) on every rank:
    the single-rank ``topk_lower_index_first`` of the full logits (see the module docstring).
    World 1: the inputs, untouched (k must then be k').
    """
    if values.shape != indices.shape or values.dim() < 1:
        raise ValueError(f"values and indices must have one shape [*S, k], got "
                         f"{tuple(values.shape)} and {tuple(indices.shape)}")
    if not values.dtype.is_floating_point or indices.dtype != torch.int64:
        raise TypeError(f"values must be floating and indices int64, got {values.dtype}, "
                        f"{indices.dtype}")
    width = values.shape[-1]
    k = width if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < width or \
            (tp.world == 1 and k != width) or k > tp.world * max(width, 1):
        raise ValueError(f"k must be an int in [{width}, world x {width}] (the lists' width "
                         f"{width}; world 1: {width}), got {k!r}")
    if tp.world == 1:
        return values, indices
    if check_values(indices.device) and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= NO_INDEX:
            raise ValueError(f"indices must be global vocabulary ids in [0, {NO_INDEX}), got "
                             f"values in [{low}, {high}]")
    keys = topk_keys(values, indices)
    if width < k:  # fewer rows than k on this rank: pad with keys below every real one
        keys = torch.cat([keys, keys.new_full((*keys.shape[:-1], k - width), _EMPTY_KEY)], -1)
    gathered = tp.all_gather(keys)  # [world, *S, k]
    return keys_topk(merge_topk_keys(gathered, k))


def shard_topk(
    logits: torch.Tensor, k: int, tp: TPGroup, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of vocabulary-split logits: this rank's logits [*S, Vr] -> (values [*S, k]
    float32, indices [*S, k] int64 global ids) of the whole vocabulary, ties to the lower id
    (``topk_lower_index_first`` on the slice, then ``merge_topk``). 1 <= k <= V."""
    start, stop = _rank_vocab(tp, vocab_size, logits.shape[-1], "logits")
    _check_k(k, vocab_size)
    values, indices = topk_lower_index_first(logits, min(k, stop - start))
    return merge_topk(values.float(), indices + start, tp, k)


def lm_head_topk_parallel(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, tp: TPGroup, vocab_size: int, *,
    softcap: float | None = None, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.lm_head_topk`` over a vocabulary-split lm_head: hidden [N, d] (the same on every
    rank), weight [Vr, d] this rank's rows -> (values [N, k] float32, indices [N, k] int64
    global ids), as one rank with the full weight gives (k = 1: the greedy token; ``softcap``:
    the final logit soft-cap, elementwise, so capping each shard is capping the whole).
    1 <= k <= V (a rank with fewer rows than k contributes all of them)."""
    start, stop = _rank_vocab(tp, vocab_size, weight.shape[0], "weight")
    _check_k(k, vocab_size)
    values, indices = lm_head_topk(hidden, weight, min(k, stop - start), softcap=softcap,
                                   backend=backend)
    return merge_topk(values, indices + start, tp, k)


def medusa_heads_topk_parallel(
    hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, k: int,
    tp: TPGroup, vocab_size: int, *, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.medusa_heads_topk`` over vocabulary-split head projections: hidden [N, d], w1
    [K, d, d], b1 [K, d] (whole on every rank), w2 [K, Vr, d] this rank's rows -> (values
    [N, K, k] float32, indices [N, K, k] int64 global ids). 1 <= k <= V."""
    if w2.dim() != 3:
        raise ValueError(f"w2 must be [K, Vr, d], got shape {tuple(w2.shape)}")
    start, stop = _rank_vocab(tp, vocab_size, w2.shape[1], "w2")
    _check_k(k, vocab_size)
    values, indices = medusa_heads_topk(hidden, w1, b1, w2, min(k, stop - start),
                                        backend=backend)
    return merge_topk(values, indices + start, tp, k)


def _check_k(k, vocab_size: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"k must be an int in [1, vocab_size = {vocab_size}], got {k!r}")
