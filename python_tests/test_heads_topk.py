"""Medusa heads top-k and lm_head top-k: the Triton kernels (CPU interpreter at small shapes, GPU
at 7B shapes) against a float64 reference; ties, strides, token blocks and argument checks."""

import importlib

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda

import medusa_kernels as mk
from medusa_kernels.ops import lm_head_topk
from medusa_kernels.ops.heads_topk import (
    lm_head_topk_ref,
    lm_head_topk_triton,
    medusa_heads_topk,
    medusa_heads_topk_ref,
    medusa_heads_topk_triton,
)

ht = importlib.import_module("medusa_kernels.ops.heads_topk")  # the module, not the op
DEV = "cuda" if HAS_CUDA else "cpu"
# absolute / relative tolerance of the values against the float64 logits (|logits| <~ 10 here)
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (5e-3, 1e-3), torch.bfloat16: (3e-2, 3e-3)}


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty (outputs, h', partial keys) starts as NaN (floats) or -1 (ints)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.dtype.is_floating_point else -1)

    monkeypatch.setattr(torch, "empty", poisoned)


def heads_logits(hidden, w1, b1, w2) -> torch.Tensor:
    """[N, K, V] logits in float64 from the inputs as given (also on the GPU: an fp32 einsum
    there could run in TF32 if a global matmul-precision setting allows it)."""
    dtype = torch.float64
    h = hidden.to(dtype)
    z = torch.einsum("nd,ked->nke", h, w1.to(dtype)) + b1.to(dtype)
    return torch.einsum("nkd,kvd->nkv", h[:, None] + torch.nn.functional.silu(z), w2.to(dtype))


def planted(N, K, d, V, dtype, seed=0, device=DEV):
    """Inputs whose logits have no near-ties: row v of W2[k] is a[k, v] * u plus small noise,
    a[k] a random permutation of linspace(-1, 1, V), u = 1/sqrt(d); h' has a large positive
    component along u (hidden ~ 1 + noise), so head k ranks v by a[k, v] with logit gaps of
    about 2 * |u.h'| / V. The ResBlock weights are generic."""
    g = torch.Generator().manual_seed(seed)
    hidden = 1.0 + 0.5 * torch.randn(N, d, generator=g)
    w1 = torch.randn(K, d, d, generator=g) / d**0.5
    b1 = 0.5 * torch.randn(K, d, generator=g)
    a = torch.stack([torch.linspace(-1, 1, V)[torch.randperm(V, generator=g)] for _ in range(K)])
    w2 = a[..., None] / d**0.5 + (0.2 / V) * torch.randn(K, V, d, generator=g)
    return tuple(t.to(dtype=dtype, device=device) for t in (hidden, w1, b1, w2))


def assert_tie_free(logits: torch.Tensor, k: int, margin: float) -> None:
    """The premise of an exact index check: the top k + 1 logits are at least ``margin`` apart."""
    top = logits.topk(min(k + 1, logits.shape[-1]), dim=-1).values
    gap = (top[..., :-1] - top[..., 1:]).min().item() if top.shape[-1] > 1 else float("inf")
    assert gap > margin, f"inputs have near-ties: gap {gap:.3g} <= {margin:.3g}"


def assert_topk_exact(values, indices, logits, k, dtype):
    """Indices equal the reference's; values within the dtype's tolerance of its logits."""
    atol, rtol = TOL[dtype]
    assert_tie_free(logits, k, 2 * (atol + rtol * logits.abs().max().item()))
    want_v, want_i = (t.to(values.device) for t in ht.topk_lower_index_first(logits, k))
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices, want_i)
    torch.testing.assert_close(values.double(), want_v.double(), atol=atol, rtol=rtol)


def assert_topk_close(values, indices, logits, k, atol, rtol):
    """Tie-tolerant: distinct indices whose reference logits are within tolerance of the values
    and not below the reference's k-th logit by more than the tolerance; values sorted."""
    logits = logits.to(values.device).double()
    tol = atol + rtol * logits.abs().max().item()
    kth = logits.topk(k, dim=-1).values[..., -1:]
    at = logits.gather(-1, indices)
    assert torch.isfinite(values).all()
    assert (values[..., 1:] <= values[..., :-1]).all(), "values not sorted descending"
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "repeated indices"
    assert ((values.double() - at).abs() <= tol).all(), (values.double() - at).abs().max()
    assert (at >= kth - 2 * tol).all(), (kth - at).max()


# --- the kernels in the interpreter (CPU) or on the GPU, small shapes --------------------------

F32, F16 = torch.float32, torch.float16
SMALL = [  # N, K, d, V, k, dtype, launch overrides
    pytest.param(1, 1, 40, 300, 1, F32, {}, id="N1-K1-V300-k1-gemv"),
    pytest.param(1, 5, 48, 257, 10, F32, dict(chunks=3), id="N1-K5-V257-k10-3chunks"),
    pytest.param(3, 2, 40, 300, 20, F32, dict(chunks=4, block_v=16), id="N3-k20>tile16-unaligned"),
    pytest.param(5, 5, 32, 100, 5, F16, dict(chunks=2), id="N5-K5-fp16-dot"),
    pytest.param(1, 3, 64, 130, 20, F16, dict(chunks=2, block_v=16), id="N1-fp16-gemv-k20>tile"),
    pytest.param(1, 2, 32, 77, 4, F16, dict(gemv=False), id="N1-fp16-dot-path"),
    pytest.param(17, 1, 24, 90, 3, F32, dict(block_d=16), id="N17-bn32-d24-odd-d"),
    pytest.param(2, 2, 16, 7, 7, F32, {}, id="V7<tile-k=V"),
]


@pytest.mark.parametrize("N,K,d,V,k,dtype,launch", SMALL)
def test_heads_kernel_matches_reference(poisoned_empty, N, K, d, V, k, dtype, launch):
    hidden, w1, b1, w2 = planted(N, K, d, V, dtype, seed=N * 100 + V)
    values, indices = medusa_heads_topk_triton(hidden, w1, b1, w2, k, **launch)
    assert values.shape == indices.shape == (N, K, k)
    assert_topk_exact(values, indices, heads_logits(hidden, w1, b1, w2), k, dtype)


@pytest.mark.parametrize(
    "N,d,V,k,dtype,launch",
    [
        pytest.param(1, 40, 301, 7, torch.float32, dict(chunks=3), id="N1-gemv"),
        pytest.param(4, 32, 200, 32, torch.float16, dict(chunks=2, block_v=32), id="N4-fp16-k32"),
    ],
)
def test_lm_head_kernel_matches_reference(poisoned_empty, N, d, V, k, dtype, launch):
    hidden, _, _, w2 = planted(N, 1, d, V, dtype, seed=V)
    values, indices = lm_head_topk_triton(hidden, w2[0], k, **launch)
    assert values.shape == indices.shape == (N, k)
    logits = hidden.double() @ w2[0].double().T
    assert_topk_exact(values, indices, logits, k, dtype)


def test_random_inputs_tie_tolerant():
    g = torch.Generator().manual_seed(5)
    N, K, d, V, k = 2, 2, 32, 150, 8
    hidden, b1 = torch.randn(N, d, generator=g), torch.randn(K, d, generator=g)
    w1, w2 = torch.randn(K, d, d, generator=g) / d**0.5, torch.randn(K, V, d, generator=g)
    args = tuple(t.to(DEV) for t in (hidden, w1, b1, w2))
    values, indices = medusa_heads_topk_triton(*args, k, chunks=3, block_v=16)
    assert_topk_close(values, indices, heads_logits(*args), k, *TOL[torch.float32])


@pytest.mark.parametrize("N,K", [(65, 1), (130, 2)])
def test_more_than_64_tokens_run_several_token_blocks(poisoned_empty, N, K):
    """Token blocks on the grid's fastest axis, with several chunks and heads on the others."""
    d, V, k = 16, 70, 2
    hidden, w1, b1, w2 = planted(N, K, d, V, torch.float32, seed=N)
    values, indices = medusa_heads_topk_triton(hidden, w1, b1, w2, k)
    assert_topk_exact(values, indices, heads_logits(hidden, w1, b1, w2), k, torch.float32)
    values, indices = lm_head_topk_triton(hidden, w2[-1], k, chunks=3)
    assert_topk_exact(values, indices, hidden.double() @ w2[-1].double().T, k, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N", [1, 3])
def test_ties_go_to_the_lower_index(dtype, N):
    """Integer inputs (exact in every path) with many equal logits, duplicated W2 rows across
    tiles and chunks: the result equals a stable descending sort of the exact logits."""
    g = torch.Generator().manual_seed(N)
    K, d, V, k = 2, 16, 96, 24
    hidden = torch.randint(-2, 3, (N, d), generator=g).float()
    w1, b1 = torch.zeros(K, d, d), torch.zeros(K, d)  # SiLU(0) = 0: h' = h exactly
    w2 = torch.randint(-2, 3, (K, V, d), generator=g).float()
    w2[:, 50] = w2[:, 3]  # another chunk
    w2[:, 7] = w2[:, 5]  # the same tile
    w2[1, 60:] = w2[1, 0]  # one head: a long run of equal rows
    args = tuple(t.to(dtype=dtype, device=DEV) for t in (hidden, w1, b1, w2))
    got = medusa_heads_topk_triton(*args, k, chunks=3, block_v=16)
    want = medusa_heads_topk_ref(*(t.double() for t in args), k)
    assert torch.equal(got[1], want[1].to(DEV))
    assert torch.equal(got[0], want[0].to(DEV))
    lm = lm_head_topk_triton(args[0], args[3][1], k, chunks=2, block_v=16)
    lm_want = lm_head_topk_ref(args[0].double(), args[3][1].double(), k)
    assert torch.equal(lm[1], lm_want[1].to(DEV)) and torch.equal(lm[0], lm_want[0].to(DEV))


@pytest.mark.parametrize("kind", ["distinct", "ties", "zeros_signed", "nan", "inf"])
@pytest.mark.parametrize("V,k", [(1, 1), (7, 1), (7, 6), (7, 7), (300, 10), (300, 32)])
def test_cpu_topk_shortcut_equals_the_stable_sort(kind, V, k):
    """The CPU shortcut (torch.topk, then sorting those k) returns exactly what the stable sort
    of the whole row does: ties across the cut, -0.0 / +0.0, NaN and inf included."""
    g = torch.Generator().manual_seed(V * 100 + k)
    rows = torch.randn(3, 4, V, generator=g)
    if kind == "ties":  # few distinct values: ties everywhere, often across the cut
        rows = torch.randint(0, 4, (3, 4, V), generator=g).float()
    elif kind == "zeros_signed":
        rows = torch.where(torch.rand(3, 4, V, generator=g) < 0.5, -0.0, 0.0) + torch.where(
            torch.rand(3, 4, V, generator=g) < 0.2, 1.0, 0.0)
    elif kind in ("nan", "inf"):
        special = float("nan") if kind == "nan" else float("inf")
        rows[torch.rand(3, 4, V, generator=g) < 0.1] = special
    got_v, got_i = ht.topk_lower_index_first(rows, k)
    want_v, want_i = torch.sort(rows, dim=-1, descending=True, stable=True)
    assert torch.equal(got_i, want_i[..., :k])
    torch.testing.assert_close(got_v, want_v[..., :k], equal_nan=True, rtol=0, atol=0)
    assert torch.equal(torch.signbit(got_v), torch.signbit(want_v[..., :k]))


def test_all_equal_logits_give_the_first_indices():
    """Identical rows and integer hidden states (exact logits, whatever the summation order)."""
    weight = torch.ones(70, 8, device=DEV)
    hidden = torch.tensor([[1.0, -2, 3, 0, 1, 1, -1, 2], [0, 0, 0, 0, 0, 0, 0, 0]], device=DEV)
    values, indices = lm_head_topk_triton(hidden, weight, 5, chunks=3, block_v=16)
    assert indices.tolist() == [[0, 1, 2, 3, 4]] * 2
    assert values.tolist() == [[5.0] * 5, [0.0] * 5]


@pytest.mark.parametrize("N", [1, 2])
def test_nan_logits_sort_first_as_in_torch_sort(N):
    g = torch.Generator().manual_seed(N)
    hidden = torch.randint(-3, 4, (N, 8), generator=g).float().to(DEV)
    weight = torch.randint(-3, 4, (50, 8), generator=g).float().to(DEV)
    weight[40, 3] = weight[5, 0] = float("nan")
    values, indices = lm_head_topk_triton(hidden, weight, 6, chunks=3, block_v=16)
    want_v, want_i = lm_head_topk_ref(hidden.double(), weight.double(), 6)
    assert indices[:, :2].tolist() == [[5, 40]] * N
    assert torch.equal(indices, want_i.to(DEV))
    torch.testing.assert_close(values, want_v.to(DEV), equal_nan=True)


def test_strided_inputs_and_public_entry_points():
    """w1 / b1 sliced from stacked [K, L, ...] parameters (as MedusaHeads passes them), hidden a
    strided view: no copies needed."""
    N, K, d, V, k = 3, 2, 32, 120, 6
    hidden, w1, b1, w2 = planted(N, K, d, V, torch.float32, seed=7)
    w1_stack = torch.randn(K, 2, d, d, device=DEV)
    w1_stack[:, 1] = w1
    b1_stack = torch.randn(K, 2, d, device=DEV)
    b1_stack[:, 1] = b1
    wide = torch.randn(N, 2 * d, device=DEV)
    wide[:, ::2] = hidden
    args = (wide[:, ::2], w1_stack[:, 1], b1_stack[:, 1], w2)
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    got = medusa_heads_topk(*args, k, backend="triton")
    want = medusa_heads_topk(*args, k, backend="torch")
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)
    got = lm_head_topk(args[0], w2[1], k, backend="triton")
    want = lm_head_topk(args[0], w2[1], k, backend="torch")
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)


def test_empty_batch():
    hidden, w1, b1, w2 = planted(1, 2, 16, 20, torch.float32)
    values, indices = medusa_heads_topk_triton(hidden[:0], w1, b1, w2, 3)
    assert values.shape == indices.shape == (0, 2, 3)
    values, indices = lm_head_topk_triton(hidden[:0], w2[0], 3)
    assert values.shape == indices.shape == (0, 3)


def test_auto_takes_the_reference_on_cpu(monkeypatch):
    hidden, w1, b1, w2 = (t.cpu() for t in planted(2, 2, 16, 30, torch.float32))
    monkeypatch.setitem(ht._IMPLS, "triton", None)  # would fail if called
    monkeypatch.setitem(ht._LM_IMPLS, "triton", None)
    got = medusa_heads_topk(hidden, w1, b1, w2, 4)
    assert all(
        torch.equal(a, b)
        for a, b in zip(got, medusa_heads_topk_ref(hidden, w1, b1, w2, 4), strict=True)
    )
    got = lm_head_topk(hidden, w2[0], 4)
    assert all(
        torch.equal(a, b) for a, b in zip(got, lm_head_topk_ref(hidden, w2[0], 4), strict=True)
    )


def test_opcheck_both_ops():
    hidden, w1, b1, w2 = (t.cpu() for t in planted(3, 2, 8, 20, torch.float32))
    torch.library.opcheck(
        torch.ops.medusa_kernels.medusa_heads_topk.default, (hidden, w1, b1, w2, 4, "torch")
    )
    torch.library.opcheck(
        torch.ops.medusa_kernels.lm_head_topk.default, (hidden, w2[0], 4, None, "torch")
    )
    torch.library.opcheck(
        torch.ops.medusa_kernels.lm_head_topk.default, (hidden, w2[0], 4, 2.5, "torch")
    )
    assert mk.ops.lm_head_topk is lm_head_topk


def test_reference_lm_head_equals_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    hidden, weight = (
        torch.randn(2, 6, generator=g, dtype=torch.float64),
        torch.randn(30, 6, generator=g, dtype=torch.float64),
    )
    values, indices = lm_head_topk_ref(hidden, weight, 4)
    for n in range(2):
        logits = weight @ hidden[n]
        order = sorted(range(30), key=lambda j: -logits[j].item())[:4]
        assert indices[n].tolist() == order
        torch.testing.assert_close(values[n].double(), logits[order], atol=1e-6, rtol=0)


# --- final logit soft-capping (Gemma-2's final_logit_softcapping) ------------------------------


def capped(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """transformers' Gemma-2 capping, in the logits' dtype: divide, tanh, multiply."""
    return torch.tanh(logits / softcap) * softcap


@pytest.mark.parametrize(
    "N,dtype,softcap,launch",
    [
        pytest.param(1, F32, 30.0, {}, id="N1-gemv-cap30"),
        pytest.param(1, F16, 3.0, dict(chunks=3), id="N1-fp16-gemv-cap3"),
        pytest.param(3, F32, 0.5, dict(chunks=2, block_v=16), id="N3-dot-cap0.5"),
        pytest.param(5, F16, 4.0, {}, id="N5-fp16-dot-cap4"),
    ],
)
def test_lm_head_softcap_matches_reference(poisoned_empty, N, dtype, softcap, launch):
    """Planted logits scaled so that the largest sit at 1.2 caps, where tanh bends them (slope
    0.3) and ranks survive: capped values and indices as the float64 reference gives them."""
    d, V, k = 32, 64, 8
    hidden, _, _, w2 = planted(N, 1, d, V, torch.float32, seed=N + 11)
    scale = 1.2 * softcap / (hidden @ w2[0].T).abs().max().item()
    hidden, weight = hidden.to(dtype), (w2[0] * scale).to(dtype)
    logits = capped(hidden.double() @ weight.double().T, softcap)
    values, indices = lm_head_topk_triton(hidden, weight, k, softcap=softcap, **launch)
    assert_topk_exact(values, indices, logits, k, dtype)
    want = lm_head_topk_ref(hidden.double(), weight.double(), k, softcap=softcap)
    assert torch.equal(indices, want[1].to(DEV))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("N", [1, 2])
def test_softcap_ties_go_to_the_lower_index(backend, N):
    """Integer logits (exact in every path): tanh(logit / 1.0) is exactly 1.0 from 9.0109 on, so
    logits 10, 11, 12 tie after capping while 9 stays below (0.99999994): greedy takes the
    lowest index among the saturated ones, as torch.argmax does on the capped logits."""
    V, d = 40, 4
    g = torch.Generator().manual_seed(N)
    weight = torch.randint(-2, 3, (V, d), generator=g).float()
    weight[:, 1:] = 0.0
    weight[:, 0] = torch.randint(-8, 9, (V,), generator=g).float()  # logits -8 .. 8
    weight[[17, 6, 30, 2, 25], 0] = torch.tensor([11.0, 10.0, 12.0, 9.0, 10.0])
    hidden = torch.zeros(N, d)
    hidden[:, 0] = 1.0
    if N == 2:
        hidden[1, 0] = -1.0  # the other end: -8 .. 8 flipped, -12 .. -9 at the bottom
    args = (hidden.to(DEV), weight.to(DEV))
    exact = hidden.double() @ weight.double().T
    want_capped = capped(exact.float(), 1.0)  # fp32 capping, as the op computes
    assert want_capped[0, 17] == want_capped[0, 6] == want_capped[0, 30] == 1.0 > \
        want_capped[0, 2]
    for k in (1, 3, 7):
        values, indices = lm_head_topk(*args, k, softcap=1.0, backend=backend)
        want_v, want_i = ht.topk_lower_index_first(want_capped, k)
        assert torch.equal(indices, want_i.to(DEV)), (k, indices, want_i)
        assert torch.equal(values, want_v.to(DEV))
        assert torch.equal(indices[:, 0], want_capped.argmax(-1).to(DEV))
    assert lm_head_topk(*args, 1, softcap=1.0, backend=backend)[1][0, 0].item() == 6
    assert lm_head_topk(*args, 1, backend=backend)[1][0, 0].item() == 30  # uncapped: 12 wins


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on inf
def test_kernel_tanh_is_within_a_few_ulp_and_saturates_where_torch_does():
    """The kernels' tanh (exp only) over |x| <= 12 densely and 1e-8 .. 16 logarithmically:
    within 4 ulp of float64 tanh (interpreter; the GPU's ex2.approx may add a few), exactly
    +-1 from the same x as torch.tanh in fp32, odd, NaN / inf / -0.0 kept."""
    import triton
    import triton.language as tl

    @triton.jit
    def tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + o, ht._tanh(tl.load(x_ptr + o, mask=o < n, other=0.0)), mask=o < n)

    mag = torch.cat([torch.linspace(0, 12, 60001), torch.logspace(-8, 1.2, 8001)])
    x = torch.cat([mag, -mag, torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])])
    x = x.float().to(DEV)
    y = torch.full_like(x, float("nan"))
    tanh_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    fin = torch.isfinite(x) & (x != 0)
    want = torch.tanh(x.double())
    ulps = (y.double() - want).abs() / (want.abs() * torch.finfo(torch.float32).eps)
    assert ulps[fin].max().item() <= 4.0
    assert torch.equal(y[fin] == 1.0, torch.tanh(x[fin]) == 1.0)  # saturation from 9.0109
    assert torch.equal(y[: mag.numel()], -y[mag.numel(): 2 * mag.numel()])
    assert y[-4].item() == 1.0 and y[-3].item() == -1.0 and y[-2].isnan()
    assert y[-1].item() == 0.0 and torch.signbit(y[-1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on inf
def test_softcap_keeps_nan_inf_and_signed_zero():
    hidden = torch.tensor([[1.0, 0.0]], device=DEV)
    weight = torch.tensor([[float("inf"), 0], [-float("inf"), 0], [-0.0, 0], [3.0, 0],
                           [float("nan"), 0], [0.5, 0]], device=DEV)  # fmt: skip
    for backend in ("torch", "triton"):
        values, indices = lm_head_topk(hidden, weight, 6, softcap=2.0, backend=backend)
        assert indices.tolist() == [[4, 0, 3, 5, 2, 1]], backend  # NaN first, as torch.sort
        assert values[0, 1].item() == 2.0 and values[0, 5].item() == -2.0
        assert values[0, 0].isnan()


# --- argument checks -------------------------------------------------------------------------


def _heads_args(**change):
    hidden, w1, b1, w2 = (t.cpu() for t in planted(2, 3, 8, 20, torch.float32))
    args = dict(hidden=hidden, w1=w1, b1=b1, w2=w2, k=4)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(hidden=torch.randn(8)), ValueError, "hidden must have 2 dims"),
        (dict(hidden=torch.randn(2, 8, dtype=torch.float64)), TypeError, "w1 must have dtype"),
        (dict(w1=torch.randn(3, 8, 7)), ValueError, r"w1 must be \[K, d, d\] with d = 8"),
        (dict(b1=torch.randn(2, 8)), ValueError, r"b1 must be \[K, d\] = \[3, 8\]"),
        (dict(w2=torch.randn(2, 20, 8)), ValueError, "w2 has shape .* number of heads K"),
        (dict(w2=torch.randn(3, 20, 9)), ValueError, "w2 has shape .* hidden size d"),
        (dict(w2=torch.randn(3, 20, 8).half()), TypeError, "w2 must have dtype"),
        (dict(k=0), ValueError, r"k must be an int in \[1, V = 20\], got 0"),
        (dict(k=21), ValueError, r"k must be an int in \[1, V = 20\], got 21"),
        (dict(k=2.0), ValueError, "k must be an int"),
        (dict(k=True), ValueError, "k must be an int"),
    ],
)
def test_heads_bad_arguments(change, err, match):
    with pytest.raises(err, match=match):
        medusa_heads_topk(**_heads_args(**change))


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(hidden=torch.randn(2, 3, 8)), ValueError, "hidden must have 2 dims"),
        (dict(weight=torch.randn(20, 9)), ValueError, "weight has shape .* hidden size d"),
        (dict(weight=torch.randn(20)), ValueError, "weight must have 2 dims"),
        (dict(weight=torch.randn(20, 8).half()), TypeError, "weight must have dtype"),
        (dict(weight=torch.randn(20, 8, device="meta")), ValueError, "weight must be on cpu"),
        (dict(k=25), ValueError, r"k must be an int in \[1, V = 20\], got 25"),
    ],
)
def test_lm_head_bad_arguments(change, err, match):
    args = dict(hidden=torch.randn(2, 8), weight=torch.randn(20, 8), k=3) | change
    with pytest.raises(err, match=match):
        lm_head_topk(**args)


@pytest.mark.parametrize(
    "softcap,err,match",
    [
        (0.0, ValueError, r"softcap must be a finite number > 0 \(the logit cap\), got 0.0"),
        (-30.0, ValueError, "got -30.0"),
        (float("inf"), ValueError, "got inf"),
        (float("nan"), ValueError, "got nan"),
        ("30", TypeError, "softcap must be None or a number, got str '30'"),
        (True, TypeError, "softcap must be None or a number, got bool True"),
        (torch.tensor(30.0), TypeError, "got Tensor"),
    ],
)
def test_lm_head_bad_softcap(softcap, err, match):
    with pytest.raises(err, match=match):
        lm_head_topk(torch.randn(2, 8), torch.randn(20, 8), 3, softcap=softcap)


def test_lm_head_softcap_takes_ints():
    hidden, weight = torch.randn(2, 8), torch.randn(20, 8)
    got = lm_head_topk(hidden, weight, 3, softcap=30)
    want = lm_head_topk_ref(hidden, weight, 3, softcap=30.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_triton_refuses_what_it_does_not_support():
    hidden, w1, b1, w2 = planted(2, 2, 8, 40, torch.float64)
    with pytest.raises(ValueError, match="supports dtypes .* got torch.float64"):
        medusa_heads_topk(hidden, w1, b1, w2, 3, backend="triton")
    hidden, w1, b1, w2 = planted(2, 2, 8, 40, torch.float32)
    with pytest.raises(ValueError, match="k <= 32, got k = 33"):
        lm_head_topk(hidden, w2[0], 33, backend="triton")
    with pytest.raises(ValueError, match="gemv=True needs N = 1"):
        medusa_heads_topk_triton(hidden, w1, b1, w2, 3, gemv=True)
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        lm_head_topk_triton(hidden, w2[0], 3, chunks=0)


def test_chunks_are_whole_tiles_in_one_wave(monkeypatch):
    """Chunk sizes come from static shapes only: whole BLOCK_V tiles, as few rows per chunk as
    one wave of ctas_per_sm programs per SM allows."""
    monkeypatch.setattr(ht, "sm_count", lambda device: 132)
    h100 = torch.device("cuda", 0)
    for N in (1, 8, 64):
        cfg = ht._config(N, N == 1, torch.bfloat16, 10)
        slots = cfg.ctas_per_sm * 132
        for V in (100, 32000, 128256):
            for programs in (1, 4, 5, 40):
                chunks, rows = ht._chunks(V, programs, cfg.block_v, cfg.ctas_per_sm, h100, None)
                assert rows % cfg.block_v == 0 and chunks == -(-V // rows)
                assert chunks * programs <= max(programs, slots)  # one wave
                fewer_rows = rows - cfg.block_v  # the next smaller chunk does not fit
                assert fewer_rows == 0 or -(-V // fewer_rows) * programs > slots
    gemv = ht._config(1, True, torch.bfloat16, 10)
    assert (gemv.block_v, gemv.ctas_per_sm) == (32, 4)
    assert ht._chunks(32000, 5, 32, 4, h100, None) == (100, 320)  # 1000 tiles, 10 per chunk
    assert ht._chunks(128256, 5, 32, 4, h100, None) == (103, 1248)  # 4008 tiles, 39 per chunk
    assert ht._chunks(300, 1, 32, 4, h100, 7) == (7, 43)  # explicit count: any rows


def test_resblock_tiles_split_evenly(monkeypatch):
    monkeypatch.setattr(ht, "sm_count", lambda device: 132)
    h100 = torch.device("cuda", 0)
    cfg = ht._config(1, True, torch.bfloat16, 10)
    per_head, per_program, programs = ht._resblock_grid(5, 4096, 1, 8, 4, h100)
    assert (per_head, per_program, programs) == (512, 5, 512)  # 2560 tiles, <= 528 programs
    for K, d, tb in ((1, 40, 1), (4, 4096, 1), (5, 4096, 8), (3, 1000, 2)):
        per_head, per_program, programs = ht._resblock_grid(K, d, tb, cfg.block_o,
                                                            cfg.res_ctas_per_sm, h100)
        assert per_head == -(-d // cfg.block_o) and (programs - 1) * per_program < K * per_head
        assert programs * per_program >= K * per_head
        assert programs <= max(1, cfg.res_ctas_per_sm * 132 // tb)


class _GridSpy:
    """Stands in for a Triton kernel: records each launch's grid, then launches."""

    def __init__(self, kernel, grids):
        self.kernel, self.fn, self.grids = kernel, getattr(kernel, "fn", kernel), grids

    def __getitem__(self, grid):
        self.grids.append((self.fn.__name__, tuple(grid)))
        return self.kernel[grid]


@pytest.mark.parametrize("N,ctas", [(1, 3), (5, 1), (20, 2)])
def test_launchers_plan_with_the_occupancy_they_are_given(monkeypatch, N, ctas):
    """The grids follow the CTAs/SM that ops._backend.ctas_per_sm answers (on CUDA: derived from
    the compiled kernel; here: a stand-in), asked with each kernel and its static value."""
    asked, grids = [], []

    def fake_ctas_per_sm(kernel, args, kwargs, static, device):
        asked.append((kernel.fn.__name__, static, kwargs["num_warps"]))
        return ctas

    monkeypatch.setattr(ht, "ctas_per_sm", fake_ctas_per_sm)
    monkeypatch.setattr(ht, "sm_count", lambda device: 3)
    for name in ("_resblock_kernel", "_vocab_topk_kernel"):
        monkeypatch.setattr(ht, name, _GridSpy(getattr(ht, name), grids))
    K, d, V, k = 3, 40, 300, 4
    hidden, w1, b1, w2 = planted(N, K, d, V, torch.float32, seed=N)
    values, indices = medusa_heads_topk_triton(hidden, w1, b1, w2, k)
    assert_topk_exact(values, indices, heads_logits(hidden, w1, b1, w2), k, torch.float32)
    cfg = ht._config(N, N == 1, torch.float32, k)
    assert asked == [("_resblock_kernel", cfg.res_ctas_per_sm, cfg.num_warps),
                     ("_vocab_topk_kernel", cfg.ctas_per_sm, cfg.num_warps)]
    tb = -(-N // cfg.block_n)
    _, per_program, programs = ht._resblock_grid(K, d, tb, cfg.block_o, ctas, hidden.device)
    chunks, _ = ht._chunks(V, K * tb, cfg.block_v, ctas, hidden.device, None)
    assert programs <= max(1, ctas * 3 // tb) and chunks * K * tb <= max(K * tb, ctas * 3)
    assert grids == [("_resblock_kernel", (tb, programs)), ("_vocab_topk_kernel", (tb, chunks, K))]


# --- GPU: 7B shapes in bf16 ----------------------------------------------------------------------


def _gpu_inputs(N, K, d, V, dtype, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, device="cuda", dtype=dtype)
    w1 = (torch.randn(K, d, d, generator=g, device="cuda") * 0.5 / d**0.5).to(dtype)
    b1 = (0.1 * torch.randn(K, d, generator=g, device="cuda")).to(dtype)
    w2 = (torch.randn(K, V, d, generator=g, device="cuda") / d**0.5).to(dtype)
    return hidden, w1, b1, w2


@requires_cuda
@pytest.mark.parametrize("N", [1, 8])
def test_gpu_heads_7b_bf16(N):
    hidden, w1, b1, w2 = _gpu_inputs(N, 5, 4096, 32000, torch.bfloat16, seed=N)
    values, indices = medusa_heads_topk(hidden, w1, b1, w2, 10)  # "auto" takes triton
    assert_topk_close(values, indices, heads_logits(hidden, w1, b1, w2), 10, 3e-2, 3e-3)


@requires_cuda
@pytest.mark.parametrize("N,V", [(1, 32000), (8, 32000), (1, 128256), (3, 128256)])
def test_gpu_lm_head_bf16(N, V):
    hidden, _, _, w2 = _gpu_inputs(N, 1, 4096, V, torch.bfloat16, seed=V + N)
    values, indices = lm_head_topk(hidden, w2[0], 10)
    logits = hidden.double() @ w2[0].double().T
    assert_topk_close(values, indices, logits, 10, 3e-2, 3e-3)


@requires_cuda
@pytest.mark.parametrize(
    "N,K,k,dtype",
    [
        (64, 8, 32, torch.float16),
        (33, 3, 1, torch.bfloat16),
        (2, 1, 32, torch.float16),
        (70, 2, 5, torch.bfloat16),
    ],
)
def test_gpu_other_shapes(N, K, k, dtype):
    hidden, w1, b1, w2 = _gpu_inputs(N, K, 1024, 10007, dtype, seed=N)
    values, indices = medusa_heads_topk(hidden, w1, b1, w2, k)
    assert_topk_close(values, indices, heads_logits(hidden, w1, b1, w2), k, 3e-2, 3e-3)


@requires_cuda
def test_gpu_auto_picks_triton_and_cuda_graph_capture(monkeypatch):
    calls = []
    monkeypatch.setitem(
        ht._IMPLS, "triton", lambda *a: calls.append(1) or medusa_heads_topk_triton(*a)
    )
    hidden, w1, b1, w2 = _gpu_inputs(2, 3, 512, 5000, torch.float16)
    eager = medusa_heads_topk(hidden, w1, b1, w2, 10)
    assert calls == [1]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = medusa_heads_topk(hidden, w1, b1, w2, 10)
    hidden.copy_(torch.randn_like(hidden))
    graph.replay()
    want = medusa_heads_topk(hidden, w1, b1, w2, 10)
    assert torch.equal(out[1], want[1]) and torch.equal(out[0], want[0])
    assert not torch.equal(eager[1], want[1])
