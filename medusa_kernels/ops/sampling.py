"""Sampling exactly from the base model: transformers' warpers, plain sampling, and exact
speculative sampling over the Medusa tree, on the device.

The distribution at a node (or a plain decode row) is transformers' sampling distribution:
``softmax(filter_logits(logits))``, where ``filter_logits`` applies, in transformers' order and
with its arithmetic (fp32), ``TemperatureLogitsWarper`` (scores / temperature), then
``TopKLogitsWarper`` (drop every score below the k-th largest: ties at the boundary are all kept;
k = max(top_k, min_tokens_to_keep), at most V), then ``TopPLogitsWarper`` (sort ascending, drop
the tokens whose cumulative probability is <= 1 - top_p, never the min_tokens_to_keep likeliest,
so at least one token always survives). Dropped tokens get -inf. top_p = 1 is no filter
(``GenerationConfig`` adds no warper then). One deliberate difference: where several tokens tie
exactly at the top-p boundary, transformers' unstable ``torch.sort`` decides which of them go;
here the lower vocabulary index is kept (a stable sort), as everywhere in this package.

A token is drawn by inverse CDF, from one uniform u in [0, 1) per draw: ``x = the first i with
cdf[i] > u * cdf[V-1]`` (``cdf`` = cumsum of the fp32 probabilities). For continuous u this is
exact: P(x = i) = p_i, and a token of probability 0 is never drawn (its cdf step is empty). The
fp32 uniforms and CDF make it exact up to ~1e-7 per token. Inverse CDF (not the exponential race
of ``acceptance.sample_tokens``) because the tree walk needs one draw per visited node, not V.

Exact speculative sampling (``accept_exact``). The tree's nodes carry tokens; node 0 (the root)
holds the token already sampled for the next position; ``tree_logits[b, u]`` is the base model's
prediction after node u. The walk, per sequence::

    n = root; d = 0
    loop: x = inverse_cdf(p_n, uniforms[b, d])      # p_n: the filtered distribution at n
          if some child of n carries x: n = the first such child (lowest node index); d += 1
          else: stop, emit x

Returned: the path to n (accepted: the root and the followed children), and x (the next root).

Why it is lossless (the accepted tokens plus the emitted one are distributed exactly as
sequential sampling from the base model, x_1 ~ p(.|c), x_2 ~ p(.|c, x_1), ...):

1. Medusa's candidates (the heads' top-k at the root's hidden state) are a function of the
   context only, never of the draws ``uniforms``; the tree is fixed before any draw is looked at.
2. The walk only moves to a child whose token equals the token just drawn, so the node visited
   at depth d holds exactly the prefix c, x_1, ..., x_d, and ``p_n`` is the base model's
   distribution after that prefix (that is what the tree forward computes).
3. Which node is visited at depth d is a function of uniforms[b, :d] only; uniforms[b, d] is
   independent of them, so x_{d+1} ~ p(.|c, x_1..x_d) given the past, whatever the tree.
4. Whether the walk goes on or stops is decided by x_{d+1} and the (fixed) tree: it only decides
   whether x_{d+1} is kept as an accepted node or emitted as the next root. Either way the token
   stream is the same draw; the next step continues from the same prefix with fresh draws. So
   the whole output is a sequence of draws x_t ~ p(.|c, x_<t): sequential sampling.

Edge cases follow: several children with the same token have the same prefix, so following the
first one is as good as any fixed rule (a rule that looked ahead at later draws would not be);
a child whose token has probability 0 (after top-k/top-p, or a -inf logit) is never entered, as
its token is never drawn. The rule is also the best a lossless one can do: a child of the visited
node carrying token y is entered with probability p_n(y), and no lossless rule can accept y more
often than the base model emits it.

Draws: ``uniforms [B, A]``, one per depth. The node at depth d samples with uniforms[b, d]; all
nodes of one depth share it, and the walk visits one node per depth, so every draw it consumes
is fresh. Both backends compute the samples of all nodes with the same torch code and differ
only in the walk, so given the same uniforms they agree bit for bit.

Draws keyed by position (``sequence_seeds``, ``seed_keys``, ``position_uniforms``): the
generation loop draws the token at absolute position t of sequence b with u = hash(seed_b, t)
(seed_b: the sequence's own seed), a counter-based generator
(three rounds of a 32-bit integer mixer over int64 tensors, on the device, no state). The walk
at depth d draws the token at position root + d + 1, so it uses the same u that plain sampling
uses for that position: for the same seed, exact Medusa sampling and plain sampling emit the
same tokens (the node's distribution is the base model's after the same prefix), and a row's
draws do not depend on the batch around it, on CUDA graphs or on the tree. A position's u is
only looked at by the step that emits the token there (draws the walk computed beyond the
node where it stopped decide nothing), so every draw that decides a token is fresh.

Backends: the work over V (warpers, softmax, cumsum, searchsorted, for every node) is a few large
torch kernels in both. The walk, ~6 small torch ops per depth, is one Triton program per
sequence (``_accept_exact_kernel``), as ``acceptance._accept_greedy_kernel``. Nothing syncs with
the host; ``generator`` draws the uniforms with ``torch.rand`` on the device (CUDA-graph safe
with a generator registered to the graph).

Shapes: B batch, T tree nodes, V vocabulary, P paths (leaves), A = tree depth + 1.
"""

from __future__ import annotations

import math

import torch

from ._backend import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_tensor,
    check_values,
    pick_backend,
)
from .acceptance import check_accept_args

if HAS_TRITON:
    import triton
    import triton.language as tl

UNIFORM_DTYPES = (torch.float32, torch.float64)


def check_sampling_args(
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    min_tokens_to_keep: int = 1,
) -> None:
    """Raise a ValueError/TypeError naming the argument unless temperature is a finite number
    > 0, top_k None or an int >= 1, top_p None or a number in (0, 1], min_tokens_to_keep an
    int >= 1. (Greedy decoding is temperature 0 elsewhere; the sampling ops never see it.)"""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a finite float > 0 for sampling, got {temperature!r} "
            "(temperature 0 is greedy: use accept_greedy / argmax)"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise TypeError(f"top_k must be an int >= 1 or None, got {type(top_k).__name__}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 or None (no top-k), got {top_k}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))):
        raise TypeError(f"top_p must be a float in (0, 1] or None, got {type(top_p).__name__}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (or be None: no top-p), got {top_p!r}")
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or (
            min_tokens_to_keep < 1):
        raise ValueError(f"min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep!r}")


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """transformers' Temperature -> TopK -> TopP warpers (see the module doc), no host sync.

    Args:
        logits: [..., V] float logits (any float dtype; computed in fp32 like transformers).
        temperature: > 0. top_k: None or >= 1 (clamped to V). top_p: None or in (0, 1].
        min_tokens_to_keep: tokens neither top-k nor top-p may drop (transformers' default 1).
    Returns:
        [..., V] float32 scores: logits / temperature, -inf where filtered out.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    check_sampling_args(temperature, top_k, top_p, min_tokens_to_keep)
    return _filter_logits(logits, float(temperature), top_k, top_p, min_tokens_to_keep)


def _filter_logits(logits, temperature, top_k, top_p, min_tokens_to_keep):
    shape, V = logits.shape, logits.shape[-1]
    scores = logits.reshape(-1, V).float()
    if temperature != 1.0:  # x / 1.0 == x: transformers skips the warper there
        scores = scores / temperature
    if top_k is not None:
        k = min(max(top_k, min_tokens_to_keep), V)
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # ascending; among equal scores the higher index first, so the lower one is kept
        sorted_rev, order_rev = torch.sort(scores.flip(-1), dim=-1, stable=True)
        order = (V - 1) - order_rev
        cumulative = sorted_rev.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[:, -min_tokens_to_keep:] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.reshape(shape)


def sampling_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """``softmax(filter_logits(...))``: [..., V] float32 probabilities, 0 where filtered out."""
    return filter_logits(logits, temperature, top_k, top_p,
                         min_tokens_to_keep=min_tokens_to_keep).softmax(dim=-1)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [N, V] float32 (>= 0, not all 0), uniforms [N] in [0, 1] -> [N] int64: the first
    i with cdf[i] > u * cdf[V-1]. The target is kept below cdf[V-1] (u * total can round up to
    it), so the token drawn always has positive mass; invalid rows (NaN) give an in-range index."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = uniforms.to(torch.float32)[:, None] * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, target, right=True)
    return index.clamp_(0, probs.shape[-1] - 1).squeeze(1)


def _check_distributions(probs: torch.Tensor, what: str) -> None:
    """Value check (CPU, or MEDUSA_KERNELS_CHECKS=1): every row is a distribution."""
    bad = torch.isnan(probs).any(dim=-1)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{what}: the logits at {where} give no distribution after temperature / top_k / "
            "top_p (NaN or +inf logits, every logit -inf, or logits / temperature overflowing)"
        )


def _check_uniforms(uniforms: torch.Tensor, shape: tuple, device: torch.device) -> None:
    check_tensor("uniforms", uniforms, dtypes=UNIFORM_DTYPES, device=device)
    if tuple(uniforms.shape) != tuple(shape):
        raise ValueError(f"uniforms must have shape {list(shape)}, got {list(uniforms.shape)}")
    if check_values(device) and bool(((uniforms < 0) | (uniforms > 1) | uniforms.isnan()).any()):
        raise ValueError("uniforms must lie in [0, 1] (draws of U[0, 1)), got values outside")


def _draws(shape, generator, uniforms, device, op):
    """The uniforms given, or fresh ones from ``generator`` (torch.rand, on the device)."""
    if uniforms is None:
        return torch.rand(shape, generator=generator, device=device)
    if generator is not None:
        raise ValueError(f"{op}: pass either generator or uniforms, not both")
    _check_uniforms(uniforms, shape, device)
    return uniforms


@torch.library.custom_op("medusa_kernels::sample_logits", mutates_args=())
def _sample_logits_op(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_tokens_to_keep: int,
) -> torch.Tensor:
    V = logits.shape[-1]
    probs = _filter_logits(logits, temperature, top_k, top_p, min_tokens_to_keep).softmax(-1)
    if check_values(logits.device):
        _check_distributions(probs, "sample_logits")
    return _inverse_cdf(probs.reshape(-1, V), uniforms.reshape(-1)).reshape(logits.shape[:-1])


@_sample_logits_op.register_fake
def _(logits, uniforms, temperature, top_k, top_p, min_tokens_to_keep):
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


def sample_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    min_tokens_to_keep: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Sample the next token from transformers' sampling distribution, no host sync.

    Args:
        logits: [..., V] float logits.
        temperature: finite > 0; top_k, top_p, min_tokens_to_keep: as ``filter_logits``.
        generator: draws the uniforms (``torch.rand`` on logits' device), or the default one.
        uniforms: [...] float32/float64 in [0, 1], the draws to use instead (tests, replays).
        backend: "auto" or "torch" (the work is over V: a few large torch kernels).
    Returns:
        [...] int64 tokens, each drawn by inverse CDF from ``sampling_probs(logits, ...)``.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    check_sampling_args(temperature, top_k, top_p, min_tokens_to_keep)
    pick_backend("sample_logits", backend, logits.device, {"torch": None})
    draws = _draws(logits.shape[:-1], generator, uniforms, logits.device, "sample_logits")
    return _sample_logits_op(logits, draws, float(temperature), top_k,
                             None if top_p is None else float(top_p), min_tokens_to_keep)


MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
# hash-prospector's lowbias32 multipliers, both < 2**31: x * m < 2**63 for x < 2**32, so the
# products fit in int64 and are exact
_MIX1, _MIX2 = 0x21F0AAAD, 0x735A2D97


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixer (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX2) & MASK32
    return x ^ (x >> 15)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def sequence_seeds(seed: int, batch: int) -> list[int]:
    """The seeds of ``batch`` sequences sampled with one ``seed`` (in [0, 2**64)): ``seed``
    itself for sequence 0, a hash of (seed, b) for sequence b > 0. Different seeds give
    unrelated streams, and sequence b of a batch samples as its prompt alone with
    ``sequence_seeds(seed, B)[b]``."""
    return [seed] + [_splitmix64((seed + _splitmix64(b)) & MASK64) for b in range(1, batch)]


def seed_keys(seeds, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sequence keys of ``position_uniforms``: seeds (B ints in [0, 2**64)) -> [B, 2] int64,
    two 32-bit words of splitmix64(seed) each (computed on the host, once)."""
    words = []
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MASK64:
            raise ValueError(f"seeds[{i}] must be an int in [0, 2**64), got {seed!r}")
        h = _splitmix64(seed)
        words.append([h & MASK32, h >> 32])
    return torch.tensor(words, dtype=torch.int64, device=device).view(-1, 2)


def position_uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The draw of the token at each position of each sequence, no host sync, no state.

    Args:
        keys: [B, 2] int64 from ``seed_keys``.
        positions: [B, n] (or [B]) integer absolute positions (>= 0) of the tokens to draw.
    Returns:
        [B, n] (or [B]) float32 uniforms in [0, 1 - 2**-24], multiples of 2**-24: a function of
        (key, position) only.
    """
    check_tensor("keys", keys, dtypes=(torch.int64,))
    check_tensor("positions", positions, dtypes=(torch.int64, torch.int32), device=keys.device)
    if keys.dim() != 2 or keys.shape[1] != 2 or positions.dim() not in (1, 2) or \
            positions.shape[0] != keys.shape[0]:
        raise ValueError(f"keys must be [B, 2] and positions [B] or [B, n], got "
                         f"{list(keys.shape)} and {list(positions.shape)}")
    flat = positions.dim() == 1
    t = positions.long().view(keys.shape[0], -1) & MASK32
    k0, k1 = keys[:, :1], keys[:, 1:]
    x = _mix32(t ^ k0)
    x = _mix32(x ^ k1)
    x = _mix32((x + k0) & MASK32)
    u = (x >> 8).to(torch.float32) * (1.0 / (1 << 24))
    return u[:, 0] if flat else u


def tree_node_depths(retrieve_indices: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """[T] int64 depth of every node (its column in retrieve_indices [P, A]; 0 for a node on no
    path), on the device."""
    P, A = retrieve_indices.shape
    ri = retrieve_indices.long()
    cols = torch.arange(A, device=ri.device).expand(P, A)
    depth = torch.zeros(num_nodes, dtype=torch.long, device=ri.device)
    return depth.scatter_reduce(0, ri.clamp(min=0).flatten(),
                                torch.where(ri >= 0, cols, 0).flatten(), "amax")


T_NONE = 2**62  # "no child": above any node index


def accept_exact_ids_ref(
    tree_samples: torch.Tensor, tree_tokens: torch.Tensor, retrieve_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The walk of ``accept_exact`` from the token sampled at every node (the ``torch`` backend).

    tree_samples [B, T] int (the token drawn at node u with its depth's uniform), tree_tokens
    [B, T] int, retrieve_indices [P, A] int -> (accept_lengths [B] int32, accept_indices [B, A]
    int64, next_tokens [B] int64)."""
    B = tree_samples.shape[0]
    ri = retrieve_indices.long()
    P, A = ri.shape
    samples, tokens = tree_samples.long(), tree_tokens.long()
    cur = ri[0, 0].expand(B).clone()  # [B] the node the walk stands on
    lengths = torch.ones(B, dtype=torch.int32, device=ri.device)
    walking = torch.ones(B, dtype=torch.bool, device=ri.device)
    for d in range(1, A):
        parent, child = ri[:, d - 1], ri[:, d]  # [P]
        drawn = samples.gather(1, cur[:, None])  # [B, 1]
        child_tok = tokens[:, child.clamp(min=0)]  # [B, P]
        match = (parent[None] == cur[:, None]) & (child[None] >= 0) & (child_tok == drawn)
        first = torch.where(match, child[None], T_NONE).amin(dim=1)  # lowest matching child
        walking = walking & (first < T_NONE)
        cur = torch.where(walking, first, cur)
        lengths += walking.to(torch.int32)
    # the first path whose node at depth length - 1 is the last accepted node
    on_path = ri.T[(lengths - 1).long()] == cur[:, None]  # [B, P]
    best = on_path.to(torch.int8).argmax(dim=1)
    next_tokens = samples.gather(1, cur[:, None]).squeeze(1)
    return lengths, ri[best], next_tokens


if HAS_TRITON:

    @triton.jit
    def _accept_exact_kernel(
        samples_ptr, tokens_ptr, ri_ptr, len_ptr, idx_ptr, next_ptr,
        P, A,
        samples_stride_b, tokens_stride_b, ri_stride_p, idx_stride_b,
        P_PAD: tl.constexpr, A_PAD: tl.constexpr,
    ):  # fmt: skip
        i_b = tl.program_id(0)
        o_p = tl.arange(0, P_PAD)
        o_a = tl.arange(0, A_PAD)
        m_p = o_p < P
        p_row = ri_ptr + o_p * ri_stride_p  # column d of every path: p_row + d
        p_samples = samples_ptr + i_b * samples_stride_b
        cur = tl.load(ri_ptr).to(tl.int64)  # the root
        length = 1
        walking = 1
        for d in range(1, A):
            parent = tl.load(p_row + d - 1, mask=m_p, other=-1).to(tl.int64)
            child = tl.load(p_row + d, mask=m_p, other=-1).to(tl.int64)
            drawn = tl.load(p_samples + cur).to(tl.int64)
            m_child = m_p & (child >= 0)
            b_tok = tl.load(tokens_ptr + i_b * tokens_stride_b + child, mask=m_child, other=-1)
            match = m_child & (parent == cur) & (b_tok.to(tl.int64) == drawn)
            first = tl.min(tl.where(match, child, 2**62), axis=0)  # lowest matching child
            found = walking * (first < 2**62).to(tl.int32)
            cur = tl.where(found > 0, first, cur)
            length += found
            walking = found
        last_col = tl.load(p_row + length - 1, mask=m_p, other=-1).to(tl.int64)
        best = tl.min(tl.where(m_p & (last_col == cur), o_p, P_PAD), axis=0)
        path = tl.load(ri_ptr + best * ri_stride_p + o_a, mask=o_a < A, other=-1)
        tl.store(idx_ptr + i_b * idx_stride_b + o_a, path.to(tl.int64), mask=o_a < A)
        tl.store(len_ptr + i_b, length.to(tl.int32))
        tl.store(next_ptr + i_b, tl.load(p_samples + cur).to(tl.int64))


def accept_exact_ids_triton(
    tree_samples: torch.Tensor, tree_tokens: torch.Tensor, retrieve_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher of ``_accept_exact_kernel`` (arguments already checked); same arguments and
    returns as ``accept_exact_ids_ref``, bit for bit."""
    B = tree_samples.shape[0]
    P, A = retrieve_indices.shape
    if tree_samples.stride(1) != 1:
        tree_samples = tree_samples.contiguous()
    if tree_tokens.stride(1) != 1:
        tree_tokens = tree_tokens.contiguous()
    if retrieve_indices.stride(1) != 1:
        retrieve_indices = retrieve_indices.contiguous()
    dev = tree_samples.device
    lengths = torch.empty(B, dtype=torch.int32, device=dev)
    indices = torch.empty(B, A, dtype=torch.int64, device=dev)
    next_tokens = torch.empty(B, dtype=torch.int64, device=dev)
    if B == 0:
        return lengths, indices, next_tokens
    p_pad = max(2, triton.next_power_of_2(P))
    a_pad = max(2, triton.next_power_of_2(A))
    _accept_exact_kernel[(B,)](
        tree_samples, tree_tokens, retrieve_indices, lengths, indices, next_tokens,
        P, A, tree_samples.stride(0), tree_tokens.stride(0), retrieve_indices.stride(0),
        indices.stride(0),
        P_PAD=p_pad, A_PAD=a_pad, num_warps=1 if p_pad <= 128 else 4,
    )  # fmt: skip
    return lengths, indices, next_tokens


_WALK_IMPLS = {"torch": accept_exact_ids_ref}
if HAS_TRITON:
    _WALK_IMPLS["triton"] = accept_exact_ids_triton


def _tree_samples(tree_logits, retrieve_indices, uniforms, temperature, top_k, top_p,
                  min_tokens_to_keep):
    """[B, T] int64: the token drawn at every node with its depth's uniform."""
    B, T, V = tree_logits.shape
    probs = _filter_logits(tree_logits, temperature, top_k, top_p, min_tokens_to_keep)
    probs = probs.softmax(dim=-1)  # [B, T, V] float32
    if check_values(tree_logits.device):
        _check_distributions(probs, "accept_exact")
    depths = tree_node_depths(retrieve_indices, T)  # [T]
    node_uniforms = uniforms[:, depths]  # [B, T]
    return _inverse_cdf(probs.reshape(B * T, V), node_uniforms.reshape(B * T)).view(B, T)


@torch.library.custom_op("medusa_kernels::accept_exact", mutates_args=())
def _accept_exact_op(
    tree_logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    retrieve_indices: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_tokens_to_keep: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    samples = _tree_samples(tree_logits, retrieve_indices, uniforms, temperature, top_k, top_p,
                            min_tokens_to_keep)
    return _WALK_IMPLS[backend](samples, tree_tokens, retrieve_indices)


@_accept_exact_op.register_fake
def _(tree_logits, tree_tokens, retrieve_indices, uniforms, temperature, top_k, top_p,
      min_tokens_to_keep, backend):
    B, A = tree_logits.shape[0], retrieve_indices.shape[1]
    return (tree_logits.new_empty(B, dtype=torch.int32),
            tree_logits.new_empty(B, A, dtype=torch.int64),
            tree_logits.new_empty(B, dtype=torch.int64))


def accept_exact(
    tree_logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    retrieve_indices: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    min_tokens_to_keep: int = 1,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact speculative sampling over the tree (the walk and the proof: module doc).

    Args:
        tree_logits: [B, T, V] base-model logits after each tree node (any float dtype).
        tree_tokens: [B, T] int tokens of the nodes (node 0 = the root, never compared).
        retrieve_indices: [P, A] int node indices of each root-to-leaf path, -1 padded at the
            end (``build_tree(...).retrieve_indices``; the one-node tree is ``[[0]]``).
        temperature: finite > 0 (temperature 0 is ``accept_greedy``).
        top_k, top_p, min_tokens_to_keep: transformers' warpers, as ``filter_logits``.
        generator: draws the uniforms (``torch.rand([B, A])`` on the device) if given, else the
            default generator does.
        uniforms: [B, A] float32/float64 in [0, 1]: the draws to use instead of the generator;
            uniforms[b, d] is the draw at depth d of row b's walk.
        backend: "auto" (the walk in Triton on CUDA tensors, torch elsewhere), "torch", "triton".
    Returns:
        accept_lengths [B] int32 (>= 1: the root and the children followed), accept_indices
        [B, A] int64 (a path through the accepted nodes, retrieve_indices[best]: the first
        path that contains them, so -1 padded only where that path is; like accept_greedy),
        next_tokens [B] int64 (the token drawn at the last accepted node: the next root).
    """
    check_accept_args(tree_logits, tree_tokens, retrieve_indices)
    check_sampling_args(temperature, top_k, top_p, min_tokens_to_keep)
    B, T, V = tree_logits.shape
    dev = tree_logits.device
    A = retrieve_indices.shape[1]
    name = pick_backend("accept_exact", backend, dev, _WALK_IMPLS)
    draws = _draws((B, A), generator, uniforms, dev, "accept_exact")
    return _accept_exact_op(tree_logits, tree_tokens, retrieve_indices, draws, float(temperature),
                            top_k, None if top_p is None else float(top_p), min_tokens_to_keep,
                            name)


def accept_exact_ids(
    tree_samples: torch.Tensor,
    tree_tokens: torch.Tensor,
    retrieve_indices: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The walk of ``accept_exact`` from tokens already drawn at every node.

    Args:
        tree_samples: [B, T] int, the token drawn at node u from its distribution with the
            uniform of its depth (what ``accept_exact`` computes first).
        tree_tokens, retrieve_indices, backend: as ``accept_exact``.
    Returns:
        as ``accept_exact``. For trees whose siblings carry distinct tokens (every Medusa tree:
        a head's top-k are distinct) this equals ``accept_greedy_ids(tree_samples, ...)``.
    """
    check_accept_args(tree_samples, tree_tokens, retrieve_indices, ids=True,
                      ids_name="tree_samples")
    name = pick_backend("accept_exact", backend, tree_samples.device, _WALK_IMPLS)
    return _WALK_IMPLS[name](tree_samples, tree_tokens, retrieve_indices)

