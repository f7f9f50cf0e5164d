"""compact_kv_cache: the Triton kernel (CPU interpreter here) and the CUDA C++ op (GPU only)
against a naive loop and the torch reference, bit-exactly over the whole cache."""

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda

import medusa_kernels as mk
from medusa_kernels.ops import compact_kv
from medusa_kernels.ops._backend import cuda_extension
from medusa_kernels.ops.compact_kv import compact_kv_cache_ref

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
KERNELS = ["triton"] + (["cuda"] if HAS_CUDA and cuda_extension() is not None else [])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaN poison compares equal to itself."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def random_cache(shape, dtype, device, seed):
    """Random values with scattered NaN poison (compared by bits, so they must survive)."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    return x.masked_fill_(torch.rand(shape, generator=gen, device=device) < 0.05, float("nan"))


def tree_paths(lens, acc, A, T, gen):
    """accept_indices [B, A]: increasing node ids from the root (0), < T; -1 past the length."""
    idx = torch.full((len(acc), A), -1, dtype=torch.long)
    for b, n in enumerate(acc):
        if n:
            nodes = torch.randperm(T - 1, generator=gen)[: n - 1].sort().values + 1
            idx[b, :n] = torch.cat([torch.zeros(1, dtype=torch.long), nodes])
    return idx


def naive(cache, lens, idx, acc, table=None):
    """Expected cache after compaction: loop over (b, i), reading from the untouched input."""
    out = cache.clone()
    src_layers, dst_layers = (cache, out) if cache.dim() == 5 else (cache[None], out[None])

    def loc(b, p):
        if table is None:
            return b, p
        bs = cache.shape[-3]
        return int(table[b, p // bs]), p % bs

    for b in range(len(acc)):
        for i in range(int(acc[b])):
            s, d = loc(b, int(lens[b] + idx[b, i])), loc(b, int(lens[b]) + i)
            dst_layers[:, d[0], d[1]] = src_layers[:, s[0], s[1]]
    return out


def make_dense(NL, B, S, H, D, lens, acc, A, T, dtype, seed, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    shape = (B, S, H, D) if NL is None else (NL, B, S, H, D)
    k, v = (random_cache(shape, dtype, device, seed + i) for i in range(2))
    idx = tree_paths(lens, acc, A, T, gen).to(device)
    return k, v, idx, None


def make_paged(NL, B, MB, bs, H, D, lens, acc, A, T, dtype, seed, device=DEV):
    """Each sequence owns MB distinct random blocks out of NB = B * MB + 3; a few table entries
    past the used positions are -1 (unallocated)."""
    gen = torch.Generator().manual_seed(seed)
    NB = B * MB + 3
    shape = (NB, bs, H, D) if NL is None else (NL, NB, bs, H, D)
    k, v = (random_cache(shape, dtype, device, seed + i) for i in range(2))
    table = torch.randperm(NB, generator=gen)[: B * MB].view(B, MB).to(torch.int32)
    for b in range(B):
        first_unused = -(-(lens[b] + T) // bs)
        table[b, first_unused:] = -1
    idx = tree_paths(lens, acc, A, T, gen).to(device)
    return k, v, idx, table.to(device)


def run_and_compare(backend, k, v, idx, lens, acc, table=None, loop=True):
    """The kernel against the reference (and, with ``loop``, the reference against ``naive``)."""
    lens_t = torch.tensor(lens, dtype=torch.int32, device=k.device)
    acc_t = torch.tensor(acc, dtype=torch.int32, device=k.device)
    want_k, want_v, rl = k.clone(), v.clone(), lens_t.clone()
    compact_kv_cache_ref(want_k, want_v, rl, idx, acc_t, table)
    if loop:
        cpu_table = None if table is None else table.cpu()
        loop_k = naive(k.cpu(), lens, idx.cpu(), acc, cpu_table)
        loop_v = naive(v.cpu(), lens, idx.cpu(), acc, cpu_table)
        assert torch.equal(bits(want_k.cpu()), bits(loop_k)), "reference K differs from the loop"
        assert torch.equal(bits(want_v.cpu()), bits(loop_v)), "reference V differs from the loop"
    mk.compact_kv_cache(k, v, lens_t, idx, acc_t, block_table=table, backend=backend)
    assert torch.equal(bits(k), bits(want_k)), "K differs"
    assert torch.equal(bits(v), bits(want_v)), "V differs"
    assert torch.equal(lens_t, rl)
    assert lens_t.tolist() == [a + b for a, b in zip(lens, acc, strict=True)]
    assert int(compact_kv._COUNTERS[k.device].abs().sum()) == 0, "counters not re-armed"


DENSE_CASES = [
    # NL, B, S, H, D, lens, acc, A, T, dtype
    pytest.param(3, 3, 29, 2, 8, [2, 5, 9], [3, 0, 2], 4, 9, torch.float16, id="NL3-B3-unequal"),
    pytest.param(None, 2, 23, 3, 5, [0, 7], [4, 1], 4, 12, torch.float32, id="1layer-D5-odd"),
    pytest.param(2, 1, 40, 4, 16, [17], [6], 6, 20, torch.float16, id="NL2-full-depth"),
    pytest.param(2, 4, 19, 1, 8, [0, 3, 6, 10], [0, 0, 0, 0], 3, 8, torch.float32, id="all-zero"),
    pytest.param(2, 2, 64, 8, 64, [1, 30], [5, 3], 5, 33, torch.float16, id="NL2-HD512-blocks"),
    pytest.param(1, 3, 21, 2, 4, [4, 0, 9], [1, 2, 1], 2, 6, torch.bfloat16, id="bf16-A2"),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("NL,B,S,H,D,lens,acc,A,T,dtype", DENSE_CASES)
def test_dense(backend, NL, B, S, H, D, lens, acc, A, T, dtype):
    k, v, idx, _ = make_dense(NL, B, S, H, D, lens, acc, A, T, dtype, seed=S * 7 + B)
    run_and_compare(backend, k, v, idx, lens, acc)


PAGED_CASES = [
    # NL, B, MB, bs, H, D, lens, acc, A, T, dtype
    pytest.param(2, 3, 6, 4, 2, 8, [1, 5, 9], [3, 0, 4], 4, 9, torch.float16, id="NL2-bs4"),
    pytest.param(None, 2, 4, 8, 3, 5, [7, 0], [5, 1], 5, 14, torch.float32, id="1layer-bs8"),
    pytest.param(3, 1, 5, 3, 1, 16, [2], [4], 4, 10, torch.float16, id="bs3-crosses-blocks"),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("NL,B,MB,bs,H,D,lens,acc,A,T,dtype", PAGED_CASES)
def test_paged(backend, NL, B, MB, bs, H, D, lens, acc, A, T, dtype):
    k, v, idx, table = make_paged(NL, B, MB, bs, H, D, lens, acc, A, T, dtype, seed=MB * 5 + B)
    run_and_compare(backend, k, v, idx, lens, acc, table)


@pytest.mark.parametrize("backend", KERNELS)
def test_chained_overlap(backend):
    """dst of row i is the source of row i + 1 (idx = 0, 2, 3, 4, 6): loads must precede stores."""
    k, v, _, _ = make_dense(2, 2, 30, 2, 8, [3, 3], [5, 5], 5, 9, torch.float32, seed=3)
    idx = torch.tensor([[0, 2, 3, 4, 6], [0, 1, 2, 3, 4]], device=k.device)
    run_and_compare(backend, k, v, idx, [3, 3], [5, 5])


@pytest.mark.parametrize("backend", KERNELS)
def test_strided_caches_and_int32_indices(backend):
    """K and V views into larger buffers (different layer/batch/position strides)."""
    gen = torch.Generator().manual_seed(11)
    big_k = random_cache((3, 4, 40, 2, 8), torch.float16, DEV, 1)
    big_v = random_cache((2, 3, 33, 2, 8), torch.float16, DEV, 2)
    k, v = big_k[1:3, 1:4, 5:30], big_v[:, :, 2:27]
    lens, acc = [4, 0, 11], [3, 4, 2]
    idx = tree_paths(lens, acc, 4, 10, gen).to(torch.int32).to(DEV)
    want_k, want_v = big_k.clone(), big_v.clone()
    rl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    compact_kv_cache_ref(want_k[1:3, 1:4, 5:30], want_v[:, :, 2:27], rl, idx,
                         torch.tensor(acc, dtype=torch.int32, device=DEV))
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    mk.compact_kv_cache(k, v, lens_t, idx, torch.tensor(acc, dtype=torch.int32, device=DEV),
                        backend=backend)
    assert torch.equal(bits(big_k), bits(want_k)) and torch.equal(bits(big_v), bits(want_v))
    assert torch.equal(lens_t, rl)


def test_auto_on_cpu_is_torch_and_opcheck_with_block_table():
    assert compact_kv.pick_backend(
        "compact_kv_cache", "auto", torch.device("cpu"), compact_kv._IMPLS, compact_kv.AUTO_ORDER
    ) == "torch"
    k, v, idx, table = make_paged(2, 2, 3, 4, 2, 4, [1, 4], [2, 1], 2, 5, torch.float32, 0, "cpu")
    args = (k, v, torch.tensor([1, 4], dtype=torch.int32), idx,
            torch.tensor([2, 1], dtype=torch.int32), "torch", table)
    torch.library.opcheck(torch.ops.medusa_kernels.compact_kv_cache.default, args)


def _args(**change):
    k, v, idx, table = make_paged(2, 2, 3, 4, 2, 4, [1, 4], [2, 1], 2, 5, torch.float32, 0, "cpu")
    args = dict(k_cache=k, v_cache=v, cache_seqlens=torch.tensor([1, 4], dtype=torch.int32),
                accept_indices=idx, accept_lengths=torch.tensor([2, 1], dtype=torch.int32),
                block_table=table)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(block_table=torch.zeros(2, 3, dtype=torch.int64)), "block_table must have dtype"),
        (dict(block_table=torch.zeros(3, 3, dtype=torch.int32)), "cache_seqlens has shape"),
        (dict(block_table=torch.tensor([[0, 1, 2], [3, 99, 5]], dtype=torch.int32)),
         "block_table maps an accepted position of sequence 1 outside"),
        (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), "outside the cache"),
        (dict(accept_lengths=torch.tensor([3, 1], dtype=torch.int32)),
         r"accept_lengths\[0\] = 3 must lie in \[0, A = 2\]"),
        (dict(accept_indices=torch.zeros(2, 2)), "accept_indices must have dtype"),
        (dict(v_cache=torch.zeros(2, 9, 4, 2, 5)), "must match"),
    ],
)
def test_bad_input(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mk.compact_kv_cache(**_args(**change))


def test_kernels_need_contiguous_rows_and_cuda_needs_the_gpu():
    # on DEV: on a GPU machine Triton refuses CPU tensors (no interpreter) before the layout check
    args = {name: t.to(DEV) for name, t in _args().items()}
    args["k_cache"] = args["k_cache"].transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match="k_cache must have contiguous"):
        mk.compact_kv_cache(**args, backend="triton")
    with pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors|not built"):
        mk.compact_kv_cache(**_args(), backend="cuda")


# ------------------------------------------------- invalid values: refused when checked, else skipped

A_BAD = 4
GOOD = {0: (6, 3, [0, 2, 5, -1]), 2: (0, 2, [0, 1, -1, -1])}  # b: (length, accepted, path)
# sequence 1 broken in one way each: (length, accepted, path, the checked error)
BAD_SEQUENCES = [
    pytest.param(-2, 3, [0, 3, 5, -1], r"cache_seqlens\[1\] = -2 must be >= 0", id="len-negative"),
    pytest.param(16, 3, [0, 1, 2, -1], r"cache_seqlens\[1\] \+ accept_lengths\[1\] = 16 \+ 3",
                 id="len-past-capacity"),
    pytest.param(2**31 - 1, 1, [0, -1, -1, -1], "reaches outside the cache", id="len-int32-max"),
    pytest.param(3, -1, [0, 1, -1, -1], r"accept_lengths\[1\] = -1 must lie", id="acc-negative"),
    pytest.param(3, 5, [0, 1, 2, 3], r"accept_lengths\[1\] = 5 must lie in \[0, A = 4\]",
                 id="acc-past-A"),
    pytest.param(3, 3, [0, 0, 2, -1], r"accept_indices\[1, 1\] = 0 must lie in \[1, ",
                 id="idx-behind-row"),
    pytest.param(3, 3, [0, -1, 3, -1], r"accept_indices\[1, 1\] = -1", id="idx-negative"),
    pytest.param(3, 3, [0, 2, 14, -1], r"accept_indices\[1, 2\] = 14 must lie in \[2, S - ",
                 id="idx-past-capacity"),
    pytest.param(3, 2, [0, 2**62, -1, -1], r"accept_indices\[1, 1\] = 4611686018427387904",
                 id="idx-int64-overflow"),
]


def _bad_case(L1, n1, path1, paged=False):
    """B = 3 (sequences 0 and 2 valid, 1 broken), NL 2, S 17 (paged: 5 blocks of 4 = 20)."""
    lens = [GOOD[0][0], L1, GOOD[2][0]]
    acc = [GOOD[0][1], n1, GOOD[2][1]]
    idx = torch.tensor([GOOD[0][2], path1, GOOD[2][2]], dtype=torch.long)
    if paged:
        k, v, _, table = make_paged(2, 3, 5, 4, 2, 4, [6, 3, 0], [3, 3, 2], A_BAD, 8,
                                    torch.float32, seed=4)
        table[:, :] = torch.arange(15, dtype=torch.int32).view(3, 5)  # every block mapped
    else:
        k, v, _, table = make_dense(2, 3, 17, 2, 4, [0] * 3, [0] * 3, A_BAD, 8, torch.float32,
                                    seed=4)
    return k, v, lens, acc, idx.to(DEV), table


def _expected(k, v, lens, acc, idx, table, good):
    """The naive loop over the valid sequences only; the others keep cache and length."""
    keep = [a if b in good else 0 for b, a in enumerate(acc)]
    clamp = [max(0, min(x, 17)) for x in lens]  # unused for skipped sequences (0 rows)
    cpu_table = None if table is None else table.cpu()
    want_k = naive(k.cpu(), clamp, idx.cpu(), keep, cpu_table)
    want_v = naive(v.cpu(), clamp, idx.cpu(), keep, cpu_table)
    want_lens = [x + a if b in good else x for b, (x, a) in enumerate(zip(lens, acc, strict=True))]
    return want_k, want_v, want_lens


def _run_unchecked(monkeypatch, backend, k, v, lens, acc, idx, table):
    """The public op as it runs on CUDA without MEDUSA_KERNELS_CHECKS: no host value checks."""
    monkeypatch.setattr(compact_kv, "check_values", lambda device: False)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    acc_t = torch.tensor(acc, dtype=torch.int32, device=DEV)
    mk.compact_kv_cache(k, v, lens_t, idx, acc_t, block_table=table, backend=backend)
    return lens_t


@pytest.mark.parametrize("L1,n1,path1,match", BAD_SEQUENCES)
def test_invalid_values_are_refused_when_checked(L1, n1, path1, match):
    k, v, lens, acc, idx, table = _bad_case(L1, n1, path1)
    k, v, idx = k.cpu(), v.cpu(), idx.cpu()
    before = bits(k).clone(), bits(v).clone()
    lens_t = torch.tensor(lens, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        mk.compact_kv_cache(k, v, lens_t, idx, torch.tensor(acc, dtype=torch.int32))
    assert torch.equal(bits(k), before[0]) and torch.equal(bits(v), before[1])
    assert lens_t.tolist() == lens


@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
@pytest.mark.parametrize("L1,n1,path1,match", BAD_SEQUENCES)
def test_unchecked_kernels_skip_an_invalid_sequence(monkeypatch, backend, L1, n1, path1, match):
    """Issue 18: lengths [6, -2] changed sequence 0 (Triton) or wrapped round the row (torch).
    Now every backend leaves the broken sequence alone, cache and length, and moves the rest."""
    k, v, lens, acc, idx, table = _bad_case(L1, n1, path1)
    want_k, want_v, want_lens = _expected(k, v, lens, acc, idx, table, good=(0, 2))
    got_lens = _run_unchecked(monkeypatch, backend, k, v, lens, acc, idx, table)
    assert torch.equal(bits(k.cpu()), bits(want_k)) and torch.equal(bits(v.cpu()), bits(want_v))
    assert got_lens.tolist() == want_lens
    assert int(compact_kv._COUNTERS.get(k.device, torch.zeros(1)).abs().sum()) == 0


@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
@pytest.mark.parametrize("block", [-1, "NB", 2**31 - 1], ids=["minus1", "NB", "int32-max"])
@pytest.mark.parametrize("where", ["source", "destination"])
def test_unchecked_kernels_skip_a_sequence_with_a_bad_block(monkeypatch, backend, block, where):
    """Paged: a block outside [0, NB) under an accepted source or destination position."""
    k, v, lens, acc, idx, table = _bad_case(3, 3, [0, 1, 6, -1], paged=True)
    # sequence 1 (L = 3, bs = 4): destinations 3..5 (blocks 0, 1), sources 3, 4, 9 (0, 1, 2)
    table[1, 2 if where == "source" else 1] = k.shape[-4] if block == "NB" else block
    table = table.to(DEV)
    want_k, want_v, want_lens = _expected(k, v, lens, acc, idx, table, good=(0, 2))
    with pytest.raises(ValueError, match="block_table maps an accepted position of sequence 1"):
        mk.compact_kv_cache(k.cpu().clone(), v.cpu().clone(),
                            torch.tensor(lens, dtype=torch.int32), idx.cpu(),
                            torch.tensor(acc, dtype=torch.int32), block_table=table.cpu())
    got_lens = _run_unchecked(monkeypatch, backend, k, v, lens, acc, idx, table)
    assert torch.equal(bits(k.cpu()), bits(want_k)) and torch.equal(bits(v.cpu()), bits(want_v))
    assert got_lens.tolist() == want_lens


EDGE_CASES = [
    # NL, B, S, lens, acc, A
    pytest.param(2, 0, 9, [], [], 3, id="B0"),
    pytest.param(2, 2, 9, [3, 9], [0, 0], 0, id="A0"),
    pytest.param(2, 2, 9, [3, 8], [1, 1], 1, id="one-node-tree"),
    pytest.param(0, 2, 9, [3, 5], [2, 1], 2, id="NL0-lengths-advance"),
    pytest.param(2, 2, 0, [0, 0], [0, 0], 2, id="S0"),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("NL,B,S,lens,acc,A", EDGE_CASES)
def test_valid_edge_cases_agree_with_the_reference(backend, NL, B, S, lens, acc, A):
    k, v, _, _ = make_dense(NL, B, S, 2, 4, [0] * B, [0] * B, max(A, 1), 3, torch.float32,
                            seed=B + S)
    idx = torch.stack([torch.arange(A) for _ in range(B)]) if B else torch.zeros(0, A)
    run_and_compare(backend, k, v, idx.long().to(DEV), lens, acc)


def test_A0_with_a_positive_length_is_refused_or_skipped(monkeypatch):
    k, v, _, _ = make_dense(2, 2, 9, 2, 4, [0, 0], [0, 0], 1, 3, torch.float32, seed=1, device="cpu")
    idx, acc = torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"accept_lengths\[1\] = 1 must lie in \[0, A = 0\]"):
        mk.compact_kv_cache(k, v, torch.tensor([2, 2], dtype=torch.int32), idx, acc)
    for backend in ["torch"] + KERNELS:
        lens = _run_unchecked(monkeypatch, backend, k.to(DEV), v.to(DEV), [2, 2],
                              [0, 1], idx.to(DEV), None)
        assert lens.tolist() == [2, 2], backend


def test_cuda_backend_refuses_more_than_64_accepted_tokens():
    k, v, _, _ = make_dense(1, 1, 80, 1, 4, [0], [0], 1, 3, torch.float32, seed=1, device="cpu")
    with pytest.raises(ValueError, match="accept_indices has A = 65 columns"):
        compact_kv.compact_kv_cache_cuda(k, v, torch.zeros(1, dtype=torch.int32),
                                         torch.arange(65)[None], torch.ones(1, dtype=torch.int32))


# ----------------------------------------------------------------------------------- GPU only


def _gpu_backends():
    if not HAS_CUDA:
        return ["triton", "cuda"]
    return ["triton"] + (["cuda"] if cuda_extension() is not None else [])


@requires_cuda
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("H", [32, 8])
def test_gpu_llama_shapes(backend, H):
    """32 layers, D 128, B 3, a 64-node tree: every sequence at a different length."""
    NL, B, S, D, T, A = 32, 3, 1024, 128, 64, 6
    lens, acc = [100, 900, 511], [4, 6, 1]
    k, v, idx, _ = make_dense(NL, B, S, H, D, lens, acc, A, T, torch.float16, seed=H)
    run_and_compare(backend, k, v, idx, lens, acc, loop=False)


@requires_cuda
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_paged_and_no_host_sync_in_a_graph(backend):
    lens, acc = [3, 40], [5, 2]
    k, v, idx, table = make_paged(4, 2, 8, 16, 8, 128, lens, acc, 5, 30, torch.float16, seed=5)
    run_and_compare(backend, k, v, idx, lens, acc, table)  # also warms up (counters, compile)
    # fresh contents: a second compaction of the already compacted cache barely moves anything
    k.copy_(random_cache(k.shape, k.dtype, DEV, 50))
    v.copy_(random_cache(v.shape, v.dtype, DEV, 51))
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    acc_t = torch.tensor(acc, dtype=torch.int32, device=DEV)
    want_k, want_v, want_l = k.clone(), v.clone(), lens_t.clone()
    compact_kv_cache_ref(want_k, want_v, want_l, idx, acc_t, table)
    assert not torch.equal(bits(k), bits(want_k)), "the compaction must move rows"
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            mk.compact_kv_cache(k, v, lens_t, idx, acc_t, block_table=table, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    assert torch.equal(bits(k), bits(want_k)) and torch.equal(bits(v), bits(want_v))
    assert torch.equal(lens_t, want_l)


@requires_cuda
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_checks_on_request(monkeypatch, backend):
    """MEDUSA_KERNELS_CHECKS=1 validates values on the GPU too (one host sync)."""
    k, v, lens, acc, idx, _ = _bad_case(-2, 3, [0, 3, 5, -1])
    monkeypatch.setenv("MEDUSA_KERNELS_CHECKS", "1")
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = -2 must be >= 0"):
        mk.compact_kv_cache(k, v, torch.tensor(lens, dtype=torch.int32, device=DEV), idx,
                            torch.tensor(acc, dtype=torch.int32, device=DEV), backend=backend)


@requires_cuda
def test_gpu_auto_prefers_cuda_then_triton():
    want = "cuda" if cuda_extension() is not None else "triton"
    assert compact_kv.pick_backend(
        "compact_kv_cache", "auto", DEV, compact_kv._IMPLS, compact_kv.AUTO_ORDER
    ) == want


@requires_cuda
def test_gpu_cuda_backend_checks_name_the_argument():
    if cuda_extension() is None:
        pytest.skip("medusa_kernels._C is not built")
    k = torch.zeros(2, 8, 2, 4, device=DEV, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="counters must have dtype"):
        cuda_extension().compact_kv_cache(
            k, k.clone(), torch.zeros(2, dtype=torch.int32, device=DEV),
            torch.zeros(2, 1, dtype=torch.long, device=DEV),
            torch.zeros(2, dtype=torch.int32, device=DEV), None,
            torch.zeros(2, dtype=torch.long, device=DEV))
