"""Verification of the candidate tree: greedy (lossless) and typical acceptance, on the device.

The tree's T nodes carry tokens ``tree_tokens[b, u]`` (node 0 is the root: the base model's own
next token, always accepted). ``retrieve_indices[p]`` lists the node indices on the path from the
root to leaf p, padded with -1. After the tree forward, ``tree_logits[b, u]`` is the base model's
prediction for the token after node u. A path's tokens are accepted while each one is what the
base model predicts after its parent:

- greedy: ``token == argmax(tree_logits[parent])`` (the output equals plain greedy decoding);
- typical (Cai et al. 2024): ``p(token) > min(posterior_threshold, posterior_alpha * exp(-H))``
  where p = softmax(tree_logits[parent] / temperature) and H its entropy.

The longest accepted path wins (greedy: the first such path; typical: the likeliest among the
longest). The next root token is the base model's choice after the last accepted node (argmax,
or a sample at ``temperature`` for typical acceptance). Shapes: B batch, T nodes, V vocabulary,
P paths (leaves), A = max depth + 1. Nothing here syncs with the host, except the value checks.

Valid trees: every ``retrieve_indices`` row starts at the root (0), its node indices grow along
the path (parents are numbered before their children, as ``build_tree`` and Medusa do) and lie
in [0, T), and -1 only pads its end; tree tokens lie in [0, V). ``check_values`` (CPU tensors,
or ``MEDUSA_KERNELS_CHECKS=1`` on CUDA) rejects anything else with a ValueError naming the entry.
Unchecked, no backend reads out of bounds: a path step to a node outside [0, T) (or a token
outside [0, V)) is rejected like padding, and node indices are clamped where they are read.
Outputs on every backend: accept_lengths int32, accept_indices int64, next tokens int64.

Backends: greedy acceptance has a Triton kernel (``_accept_greedy_kernel``, one program per
sequence, after a torch argmax over V) that replaces the ~15 small torch ops of path selection.
Typical acceptance stays torch only: its cost is the softmax/entropy over V, which torch already
does in a few large kernels; the path selection after it is the same small graph.
"""

from __future__ import annotations

import torch

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


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def sample_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Argmax (temperature 0) or a sample from softmax(logits / temperature), no host sync.

    logits: [..., V] float, V >= 1; temperature: finite, >= 0. Returns [...] int64. Sampling
    uses the exponential race ``argmax(p / E)`` with E ~ Exp(1), which draws exactly from p.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    temperature = check_real("temperature", temperature)
    _check_generator(generator)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def _path_matches(tree_tokens, retrieve_indices):
    """Path node indices clamped into [0, T) [P, A], the child token at each path step
    [B, P, A-1], and whether that step is real [P, A-1]: padding and (unchecked values) steps
    to a node outside [0, T) are not, and are never accepted."""
    T = tree_tokens.shape[1]
    real = (retrieve_indices[:, 1:] >= 0) & (retrieve_indices[:, 1:] < T)
    nodes = retrieve_indices.clamp(0, T - 1).to(torch.long)
    return nodes, tree_tokens[:, nodes[:, 1:]], real


def _select_path(ok, score, retrieve_indices, nodes):
    """From per-step acceptance ``ok`` [B, P, A-1] pick each sequence's best path."""
    accepted = torch.cumprod(ok.to(torch.int32), dim=-1)  # [B, P, A-1]
    lengths = 1 + accepted.sum(dim=-1)  # [B, P]
    longest = lengths.max(dim=-1, keepdim=True).values
    path_score = torch.where(accepted.bool(), score, 0.0).sum(dim=-1)
    key = torch.where(lengths == longest, path_score, float("-inf"))
    best = key.argmax(dim=-1)  # first of the best
    accept_lengths = lengths.gather(1, best[:, None]).squeeze(1).to(torch.int32)
    accept_indices = retrieve_indices.to(torch.long)[best]  # [B, A], -1 past the length
    last_node = nodes[best].gather(1, (accept_lengths.long() - 1)[:, None]).squeeze(1)
    return accept_lengths, accept_indices, last_node


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def check_retrieve_values(retrieve_indices: torch.Tensor, T: int) -> None:
    """Host checks of a tree's paths (module doc); errors name the first bad entry."""
    ri = retrieve_indices.long()
    bad = (ri < -1) | (ri >= T)
    if bool(bad.any()):
        p, a = _first(bad)
        raise ValueError(
            f"retrieve_indices[{p}, {a}] = {int(ri[p, a])} must be a node index in [0, T = {T})"
            " or -1 (padding)"
        )
    bad = ri[:, 0] != 0
    if bool(bad.any()):
        (p,) = _first(bad)
        raise ValueError(
            f"retrieve_indices[{p}, 0] = {int(ri[p, 0])} must be 0: every path starts at the "
            "root (a row of -1 is no path)"
        )
    pad = ri < 0
    bad = pad[:, :-1] & ~pad[:, 1:]
    if bool(bad.any()):
        p, a = _first(bad)
        raise ValueError(
            f"retrieve_indices[{p}, {a + 1}] = {int(ri[p, a + 1])} follows -1 padding: -1 may "
            "only pad the end of a path"
        )
    bad = ~pad[:, 1:] & (ri[:, 1:] <= ri[:, :-1])
    if bool(bad.any()):
        p, a = _first(bad)
        raise ValueError(
            f"retrieve_indices[{p}, {a + 1}] = {int(ri[p, a + 1])} must be > retrieve_indices"
            f"[{p}, {a}] = {int(ri[p, a])}: node indices grow along a path (parents are "
            "numbered before their children)"
        )


def check_accept_args(
    tree_logits, tree_tokens, retrieve_indices, *, ids: bool = False, ids_name: str = "tree_pred"
) -> None:
    """Shapes, dtypes and devices; with ``check_values`` also the tree's paths and (for
    logits) the tree tokens in [0, V). ``ids``: ``tree_logits`` holds token ids [B, T] (named
    ``ids_name`` in errors) instead of logits."""
    name = ids_name if ids else "tree_logits"
    if ids:
        check_tensor(name, tree_logits, ndim=2, dtypes=INDEX_DTYPES)
    else:
        check_tensor(name, tree_logits, ndim=3, dtypes=FLOAT_DTYPES)
    B, T = tree_logits.shape[:2]
    if T < 1:
        raise ValueError(f"{name} must hold T >= 1 tree nodes (the root), got shape "
                         f"{tuple(tree_logits.shape)}")
    if not ids and tree_logits.shape[2] < 1:
        raise ValueError(f"tree_logits must be [B, T, V] with V >= 1, got shape "
                         f"{tuple(tree_logits.shape)}")
    dev = tree_logits.device
    check_tensor("tree_tokens", tree_tokens, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    if tuple(tree_tokens.shape) != (B, T):
        raise ValueError(f"tree_tokens must be [B, T] = [{B}, {T}], got {tuple(tree_tokens.shape)}")
    check_tensor("retrieve_indices", retrieve_indices, ndim=2, dtypes=INDEX_DTYPES, device=dev)
    if retrieve_indices.shape[1] < 1:
        raise ValueError("retrieve_indices must have at least one column (the root), got shape "
                         f"{tuple(retrieve_indices.shape)}")
    if retrieve_indices.shape[0] < 1:
        raise ValueError("retrieve_indices must have at least one row (a path), got shape "
                         f"{tuple(retrieve_indices.shape)}")
    if not check_values(dev):
        return
    check_retrieve_values(retrieve_indices, T)
    V = None if ids else tree_logits.shape[2]
    names = (name, "tree_tokens") if ids else ("tree_tokens",)
    for arg in names:
        t = tree_logits if arg == name else tree_tokens
        bad = (t < 0) if V is None else (t < 0) | (t >= V)
        if bool(bad.any()):
            b, u = _first(bad)
            want = ">= 0" if V is None else f"in [0, V = {V})"
            raise ValueError(f"{arg}[{b}, {u}] = {int(t[b, u])} must be a token id {want}")


def accept_greedy_ids_ref(
    pred: torch.Tensor, tree_tokens: torch.Tensor, retrieve_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification from the argmax ids ``pred`` [B, T] (the ``torch`` backend)."""
    nodes, child_tokens, real = _path_matches(tree_tokens, retrieve_indices)
    ok = real & (child_tokens == pred[:, nodes[:, :-1]])
    lengths, indices, last = _select_path(ok, torch.zeros_like(ok, dtype=torch.float32),
                                          retrieve_indices, nodes)
    return lengths, indices, pred.gather(1, last[:, None]).squeeze(1).long()


if HAS_TRITON:

    @triton.jit
    def _accept_greedy_kernel(
        pred_ptr, tokens_ptr, ri_ptr, len_ptr, idx_ptr, next_ptr,
        T, P, A,
        pred_stride_b, tokens_stride_b, ri_stride_p, idx_stride_b,
        P_PAD: tl.constexpr, A_PAD: tl.constexpr,
    ):  # fmt: skip
        i_b = tl.program_id(0)
        o_p = tl.arange(0, P_PAD)
        o_a = tl.arange(0, A_PAD)
        # step j of path p: parent node ri[p, j], child node ri[p, j + 1] (-1 = padding); node
        # indices are clamped into [0, T) where read, a step to a node outside is never taken
        m_step = (o_p < P)[:, None] & (o_a < A - 1)[None, :]
        p_ri = ri_ptr + o_p[:, None] * ri_stride_p + o_a[None, :]
        parent = tl.minimum(tl.maximum(tl.load(p_ri, mask=m_step, other=0), 0), T - 1)
        child = tl.load(p_ri + 1, mask=m_step, other=-1)
        real = (child >= 0) & (child < T)
        b_pred = tl.load(pred_ptr + i_b * pred_stride_b + parent, mask=m_step, other=-1)
        b_tok = tl.load(tokens_ptr + i_b * tokens_stride_b + child, mask=m_step & real, other=-1)
        rejected = m_step & (~real | (b_tok != b_pred))  # padding is never accepted
        # accepted length of each path: 1 (the root) + steps before the first rejection
        first_bad = tl.min(tl.where(rejected, o_a[None, :], A - 1), axis=1)  # [P_PAD]
        lengths = tl.where(o_p < P, 1 + first_bad, 0)
        longest = tl.max(lengths, axis=0)
        best = tl.min(tl.where(lengths == longest, o_p, P_PAD), axis=0)  # first longest path
        path = tl.load(ri_ptr + best * ri_stride_p + o_a, mask=o_a < A, other=-1)
        tl.store(idx_ptr + i_b * idx_stride_b + o_a, path.to(tl.int64), mask=o_a < A)
        tl.store(len_ptr + i_b, longest.to(tl.int32))
        last = tl.sum(tl.where(o_a == longest - 1, path, 0), axis=0)
        last = tl.minimum(tl.maximum(last, 0), T - 1)
        tl.store(next_ptr + i_b, tl.load(pred_ptr + i_b * pred_stride_b + last).to(tl.int64))


def accept_greedy_ids_triton(
    pred: torch.Tensor, tree_tokens: torch.Tensor, retrieve_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher of ``_accept_greedy_kernel`` (arguments already checked): pred [B, T] int,
    tree_tokens [B, T] int, retrieve_indices [P >= 1, A] int -> (accept_lengths [B] int32,
    accept_indices [B, A] int64, next_tokens [B] int64), exactly as ``accept_greedy_ids_ref``."""
    B, A = pred.shape[0], retrieve_indices.shape[1]
    P = retrieve_indices.shape[0]
    if tree_tokens.stride(1) != 1:
        tree_tokens = tree_tokens.contiguous()
    if pred.stride(1) != 1:
        pred = pred.contiguous()
    if retrieve_indices.stride(1) != 1:
        retrieve_indices = retrieve_indices.contiguous()
    dev = pred.device
    lengths = torch.empty(B, dtype=torch.int32, device=dev)
    indices = torch.empty(B, A, dtype=torch.int64, device=dev)
    next_tokens = torch.empty(B, dtype=torch.int64, device=dev)
    if B == 0:
        return lengths, indices, next_tokens
    p_pad = max(2, triton.next_power_of_2(P))
    a_pad = max(2, triton.next_power_of_2(A))
    _accept_greedy_kernel[(B,)](
        pred, tree_tokens, retrieve_indices, lengths, indices, next_tokens,
        pred.shape[1], P, A,
        pred.stride(0), tree_tokens.stride(0), retrieve_indices.stride(0), indices.stride(0),
        P_PAD=p_pad, A_PAD=a_pad, num_warps=1 if p_pad * a_pad <= 512 else 4,
    )  # fmt: skip
    return lengths, indices, next_tokens


_GREEDY_IMPLS = {"torch": accept_greedy_ids_ref}
if HAS_TRITON:
    _GREEDY_IMPLS["triton"] = accept_greedy_ids_triton


def accept_greedy(
    tree_logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    retrieve_indices: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification: the longest path whose every token is the base model's argmax.

    Args:
        tree_logits: [B, T, V] float base-model logits at each tree node (T, V >= 1).
        tree_tokens: [B, T] int32/int64 token ids in [0, V) of the tree nodes (node 0 = root).
        retrieve_indices: [P, A] int32/int64 node indices of each root-to-leaf path (P, A >= 1;
            a valid tree, see the module doc), -1 padded.
        backend: "auto" (Triton on CUDA tensors, torch elsewhere), "torch", "triton". Both
            take the argmax over V with torch, then select the path.
    Returns:
        accept_lengths [B] int32 (>= 1: the root), accept_indices [B, A] int64 (the node indices
        of the chosen path: retrieve_indices[best], so -1 padded only where the path is),
        next_tokens [B] int64 (argmax after the last accepted node), on every backend whatever
        the input int dtypes. B = 0 gives empty outputs.
    """
    check_accept_args(tree_logits, tree_tokens, retrieve_indices)
    return accept_greedy_ids(tree_logits.argmax(dim=-1), tree_tokens, retrieve_indices,
                             backend=backend)


def accept_greedy_ids(
    tree_pred: torch.Tensor,
    tree_tokens: torch.Tensor,
    retrieve_indices: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``accept_greedy`` from the base model's argmax ids ``tree_pred`` [B, T] int instead of
    logits (e.g. from ``lm_head_topk(..., k=1)``, so no [B, T, V] row is ever written).
    tree_pred and tree_tokens: int32/int64 token ids >= 0. Same returns (and dtypes) as
    ``accept_greedy``."""
    check_accept_args(tree_pred, tree_tokens, retrieve_indices, ids=True)
    name = pick_backend("accept_greedy", backend, tree_pred.device, _GREEDY_IMPLS)
    return _GREEDY_IMPLS[name](tree_pred, tree_tokens, retrieve_indices)


def accept_typical(
    tree_logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    retrieve_indices: torch.Tensor,
    temperature: float,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    generator: torch.Generator | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Typical acceptance (see the module doc); temperature 0 is exactly ``accept_greedy``.

    Same arguments and returns as ``accept_greedy``; ``temperature``, ``posterior_threshold``
    and ``posterior_alpha`` are finite numbers >= 0. The next token is sampled from
    softmax(tree_logits[last] / temperature). -inf logits (a masked vocabulary) are fine: they
    add 0 to the entropy (0 log 0 = 0) and their tokens are never accepted. ``backend`` goes
    to ``accept_greedy`` at temperature 0; above it only "torch" exists ("auto" picks it).
    """
    temperature = check_real("temperature", temperature)
    posterior_threshold = check_real("posterior_threshold", posterior_threshold)
    posterior_alpha = check_real("posterior_alpha", posterior_alpha)
    _check_generator(generator)
    if temperature == 0:
        return accept_greedy(tree_logits, tree_tokens, retrieve_indices, backend=backend)
    check_accept_args(tree_logits, tree_tokens, retrieve_indices)
    pick_backend("accept_typical", backend, tree_logits.device, {"torch": None})
    B, T, V = tree_logits.shape
    logp = torch.log_softmax(tree_logits.float() / temperature, dim=-1)  # [B, T, V]
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)  # [B, T]; xlogy: 0 log 0 = 0
    cutoff = torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)
    nodes, child_tokens, real = _path_matches(tree_tokens, retrieve_indices)
    real = real & (child_tokens >= 0) & (child_tokens < V)  # unchecked: never read past V
    parents = nodes[:, :-1]  # [P, A-1]
    batch = torch.arange(B, device=tree_logits.device)[:, None, None]
    child_logp = logp[batch, parents[None], child_tokens.clamp(0, V - 1)]  # [B, P, A-1]
    ok = real & (child_logp.exp() > cutoff[:, parents])
    lengths, indices, last = _select_path(ok, child_logp, retrieve_indices, nodes)
    last_logits = tree_logits[torch.arange(B, device=tree_logits.device), last]
    return lengths, indices, sample_tokens(last_logits, temperature, generator)
