"""Shared heads top-k (ops/shared_heads_topk.py): K ResBlocks, then one projection for all heads
(the lm_head, or its pre-gathered rows of a trimmed vocabulary with a token map). The Triton
path (interpreter on the CPU) against a float64 reference on planted, tie-free inputs with
awkward shapes and poisoned buffers; ties to the lower token id; the argument checks."""

import pytest
import torch
from conftest import HAS_CUDA
from test_heads_topk import TOL, assert_topk_exact, poisoned_empty  # noqa: F401 (fixture)

from medusa_kernels.ops import shared_heads_topk
from medusa_kernels.ops.heads_topk import topk_lower_index_first
from medusa_kernels.ops.shared_heads_topk import shared_heads_topk_ref, shared_heads_topk_triton

DEV = "cuda" if HAS_CUDA else "cpu"
F32, F16 = torch.float32, torch.float16


def shared_logits(hidden, w1, b1, weight) -> torch.Tensor:
    """[N, K, R] float64 logits of the inputs as given."""
    h = hidden.double()
    z = torch.einsum("nd,ked->nke", h, w1.double()) + b1.double()
    return (h[:, None] + torch.nn.functional.silu(z)) @ weight.double().T


def planted(N, K, d, V, dtype, seed=0):
    """Tie-free inputs where every head ranks the vocabulary differently: W[v] = sum_j a_j[v]
    e_j (j < K, a_j a random permutation of linspace(-1, 1, V)) plus small noise; head k's
    ResBlock bias puts 4 on axis k and 0 on the other first K axes (whose W1 rows are 0), so
    h'_k is 3.93 e_k there and head k ranks v by a_k[v] (logit gaps ~ 7.9 / V)."""
    assert d > K
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g)
    hidden[:, :K] = 0
    w1 = torch.randn(K, d, d, generator=g) / d**0.5
    w1[:, :K] = 0
    b1 = 0.3 * torch.randn(K, d, generator=g)
    b1[:, :K] = 4.0 * torch.eye(K)
    a = torch.stack([torch.linspace(-1, 1, V)[torch.randperm(V, generator=g)] for _ in range(K)])
    weight = (0.1 / V) * torch.randn(V, d, generator=g)
    weight[:, :K] += a.T
    return tuple(t.to(dtype=dtype, device=DEV) for t in (hidden, w1, b1, weight))


def sorted_map(V, R, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(V, generator=g)[:R].sort().values.to(DEV)


CASES = [  # N, K, d, V, R (None: no map), k, dtype, chunks
    pytest.param(1, 1, 24, 300, None, 1, F32, None, id="N1-K1-gemv-V300"),
    pytest.param(1, 4, 40, 257, None, 10, F32, 3, id="N1-K4-dot16rows-V257-k10"),
    pytest.param(3, 5, 33, 301, 97, 7, F32, 2, id="N3-K5-d33-map97-odd"),
    pytest.param(5, 3, 32, 200, 64, 20, F16, 2, id="N5-K3-fp16-map64-k20"),
    pytest.param(7, 3, 24, 150, None, 3, F32, None, id="N7-K3-21rows-2blocks"),
    pytest.param(2, 2, 16, 40, 9, 9, F32, None, id="k=R=9"),
]


@pytest.mark.parametrize("N,K,d,V,R,k,dtype,chunks", CASES)
def test_kernel_matches_reference(poisoned_empty, N, K, d, V, R, k, dtype, chunks):  # noqa: F811
    hidden, w1, b1, weight = planted(N, K, d, V, dtype, seed=N * 7 + V)
    tmap = None if R is None else sorted_map(V, R, seed=R)
    rows = weight if tmap is None else weight[tmap].contiguous()  # pre-gathered
    values, indices = shared_heads_topk_triton(hidden, w1, b1, rows, k, tmap, chunks=chunks)
    assert values.shape == indices.shape == (N, K, k)
    logits = shared_logits(hidden, w1, b1, rows)
    if tmap is None:
        assert_topk_exact(values, indices, logits, k, dtype)
    else:  # rows ranked as the reference ranks them, reported as token ids
        want_v, want_r = topk_lower_index_first(logits, k)
        assert torch.equal(indices, tmap[want_r.to(DEV)])
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(values.double(), want_v.to(DEV), atol=atol, rtol=rtol)
    ref = shared_heads_topk_ref(*(t.double() for t in (hidden, w1, b1, rows)), k, tmap)
    assert torch.equal(indices, ref[1].to(DEV))
    # the heads differ (the test would see heads or tokens swapped)
    assert K == 1 or not torch.equal(indices[:, 0], indices[:, 1])


def test_reference_equals_k_separate_heads_with_copies_of_the_weight():
    """Shared heads are separate heads whose projections are all the same weight."""
    from medusa_kernels.ops import medusa_heads_topk_ref

    hidden, w1, b1, weight = planted(4, 3, 20, 90, torch.float64, seed=5)
    w2 = weight[None].expand(3, -1, -1)
    got = shared_heads_topk_ref(hidden, w1, b1, weight, 6)
    want = medusa_heads_topk_ref(hidden, w1, b1, w2, 6)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("N", [1, 3])
def test_ties_go_to_the_lower_token_id(N):
    """Integer inputs (exact in every path), duplicated rows across tiles and chunks, with and
    without a map: the result equals the reference's stable sort, ties to the lower id."""
    g = torch.Generator().manual_seed(N)
    K, d, V, k = 3, 16, 96, 24
    hidden = torch.randint(-2, 3, (N, d), generator=g).float()
    w1, b1 = torch.zeros(K, d, d), torch.zeros(K, d)  # SiLU(0) = 0: h' = h exactly
    weight = torch.randint(-2, 3, (V, d), generator=g).float()
    weight[50] = weight[3]
    weight[7] = weight[5]
    weight[60:] = weight[0]
    tmap = torch.arange(0, 2 * V, 2)  # every other id of a vocabulary of 2V
    for m in (None, tmap):
        args = tuple(t.to(DEV) for t in (hidden, w1, b1, weight))
        got = shared_heads_topk_triton(*args, k, None if m is None else m.to(DEV), chunks=3)
        want = shared_heads_topk_ref(*(t.double() for t in args), k, m)
        assert torch.equal(got[1], want[1].to(DEV)) and torch.equal(got[0], want[0].to(DEV))
        assert (got[1][..., 1:] != got[1][..., :-1]).all()


def test_public_op_backends_and_empty_batch():
    hidden, w1, b1, weight = planted(2, 2, 16, 50, F32, seed=2)
    tmap = sorted_map(50, 30, seed=1)
    rows = weight[tmap].contiguous()
    a = shared_heads_topk(hidden, w1, b1, rows, 5, token_map=tmap, backend="torch")
    b = shared_heads_topk(hidden, w1, b1, rows, 5, token_map=tmap, backend="triton")
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0])
    empty = shared_heads_topk(hidden[:0], w1, b1, rows, 5, backend="triton")
    assert empty[0].shape == empty[1].shape == (0, 2, 5)


def test_opcheck():
    hidden, w1, b1, weight = planted(2, 2, 16, 50, F32, seed=3)
    tmap = sorted_map(50, 20, seed=4)
    op = torch.ops.medusa_kernels.shared_heads_topk.default
    for args in ((hidden, w1, b1, weight, 4, None, "torch"),
                 (hidden, w1, b1, weight[tmap].contiguous(), 4, tmap, "torch")):
        torch.library.opcheck(op, args)


def _bad(change):
    hidden, w1, b1, weight = planted(2, 2, 16, 50, F32, seed=3)
    args = dict(hidden=hidden, w1=w1, b1=b1, weight=weight, k=4, token_map=None)
    args.update(change(args))
    return args


@pytest.mark.parametrize("change,err,match", [
    (lambda a: {"weight": a["weight"][:, :8]}, ValueError, "weight"),
    (lambda a: {"weight": a["weight"].double()}, (TypeError, ValueError), "weight"),
    (lambda a: {"w1": a["w1"][:, :8]}, ValueError, "w1 must be"),
    (lambda a: {"b1": a["b1"][:1]}, ValueError, "b1 must be"),
    (lambda a: {"k": 51}, ValueError, "k must be an int in"),
    (lambda a: {"token_map": torch.arange(49)}, ValueError, "one token id per projection row"),
    (lambda a: {"token_map": torch.arange(50).int()}, ValueError, "1-D int64"),
    (lambda a: {"token_map": torch.arange(50).flip(0)}, ValueError, "strictly ascending"),
    (lambda a: {"token_map": torch.arange(50) - 1}, ValueError, "ids must lie in"),
], ids=["weight-d", "weight-dtype", "w1-shape", "b1-shape", "k>R", "map-len", "map-dtype",
        "map-unsorted", "map-negative"])
def test_bad_arguments(change, err, match):
    a = _bad(change)
    with pytest.raises(err, match=match):
        shared_heads_topk(a["hidden"], a["w1"], a["b1"], a["weight"], a["k"],
                          token_map=a["token_map"], backend="torch")
