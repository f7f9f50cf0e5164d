"""Tree attention: the Triton kernel (CPU interpreter at small shapes, GPU at large ones) against
a float64 reference; packed masks, paged caches, split-KV merges and argument checks."""

import importlib
import math
import random

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda

import medusa_kernels as mk
from medusa_kernels.ops import _backend
from medusa_kernels.ops.tree_attention import (
    pack_tree_mask,
    tree_attention,
    tree_attention_ref,
    tree_attention_triton,
    unpack_tree_mask,
)

ta = importlib.import_module("medusa_kernels.ops.tree_attention")  # the module, not the op
DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


def random_tree(n_paths: int, seed: int) -> torch.Tensor:
    """Tree mask of a random prefix-closed choices list with ``n_paths`` non-root nodes."""
    rng = random.Random(seed)
    paths: list[tuple[int, ...]] = [()]
    children: dict[tuple[int, ...], int] = {(): 0}
    for _ in range(n_paths):
        parent = rng.choice(paths)
        child = (*parent, children[parent])
        children[parent] += 1
        children[child] = 0
        paths.append(child)
    return mk.build_tree([list(p) for p in paths[1:]]).tree_mask


def chain(T):
    return torch.tril(torch.ones(T, T, dtype=torch.bool))


def wide(T):
    mask = torch.eye(T, dtype=torch.bool)
    mask[:, 0] = True
    return mask


def make_inputs(lens, T, Hq, Hkv, D, dtype, page=None, extra=3, seed=0):
    """q [B, T, Hq, D] and caches (contiguous [B, S, Hkv, D] or paged with a shuffled table)."""
    g = torch.Generator().manual_seed(seed)
    B, S = len(lens), max(lens) + T + extra
    q = torch.randn(B, T, Hq, D, generator=g)
    k, v = torch.randn(2, B, S, Hkv, D, generator=g)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    to = dict(dtype=dtype, device=DEV)
    if page is None:
        return q.to(**to), k.to(**to), v.to(**to), seqlens.to(DEV), None
    max_pages = -(-S // page)
    num_pages = B * max_pages + 2
    order = torch.randperm(num_pages, generator=g)[: B * max_pages].view(B, max_pages)
    kp = torch.randn(num_pages, page, Hkv, D, generator=g)  # pages nobody uses stay random
    vp = torch.randn(num_pages, page, Hkv, D, generator=g)
    pad = max_pages * page - S
    kp[order] = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(B, max_pages, page, Hkv, D)
    vp[order] = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(B, max_pages, page, Hkv, D)
    bt = order.to(torch.int32)
    return q.to(**to), kp.to(**to), vp.to(**to), seqlens.to(DEV), bt.to(DEV)


@pytest.fixture
def nan_empty(monkeypatch):
    """Every float torch.empty (the output and the split partials) starts as NaN."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", poisoned)


def check(lens, T, Hq, Hkv, D, dtype, mask, page=None, scale=None, **launch):
    q, k, v, seqlens, bt = make_inputs(lens, T, Hq, Hkv, D, dtype, page)
    want = tree_attention_ref(q.double(), k.double(), v.double(), seqlens, mask.to(DEV), scale,
                              block_table=bt)
    got = tree_attention_triton(q, k, v, seqlens, mask.to(DEV), scale, block_table=bt, **launch)
    assert got.shape == q.shape and got.dtype == dtype
    assert torch.isfinite(got).all()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    if dtype != torch.float32:  # at most 2x the error of the same-dtype torch reference
        same = tree_attention_ref(q, k, v, seqlens, mask.to(DEV), scale, upcast=False,
                                  block_table=bt)
        err, err_torch = ((x.double() - want).abs().max().item() for x in (got, same))
        assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    return got


# --- the kernel in the interpreter (CPU) or on the GPU, small shapes --------------------------

SMALL = [  # lens, T, mask, Hq, Hkv, D, dtype, launch overrides
    pytest.param([0, 1, 37, 15, 16, 17], 1, chain(1), 4, 1, 64, torch.float32,
                 dict(block_n=16, num_splits=3), id="decode-L0,1,37,bn-1,bn,bn+1-gqa4-split3"),
    pytest.param([0, 1, 37, 15, 16, 17], 5, chain(5), 2, 2, 64, torch.float32,
                 dict(block_n=16, block_m=16), id="chain5-mha-lens-mix-1split"),
    pytest.param([37, 16], 9, wide(9), 8, 1, 64, torch.float32,
                 dict(block_n=16, block_m=16, num_splits=2), id="wide9-gqa8-rowblocks5"),
    pytest.param([63, 64, 65], 15, random_tree(14, 1), 4, 1, 64, torch.float32, {},
                 id="rand15-gqa4-L63,64,65-auto-config"),
    pytest.param([17, 0], 40, random_tree(39, 2), 2, 2, 64, torch.float32,
                 dict(block_n=16, block_m=32, num_splits=4), id="rand40-two-words-empty-splits"),
    pytest.param([5, 33], 9, random_tree(8, 3), 8, 8, 80, torch.float32,
                 dict(block_n=16, num_splits=2), id="rand9-D80"),
    pytest.param([21], 7, random_tree(6, 4), 4, 2, 96, torch.float32, dict(block_n=16),
                 id="rand7-D96-gqa2"),
    pytest.param([50, 3], 4, random_tree(3, 5), 2, 1, 128, torch.float16,
                 dict(block_n=16, num_splits=2), id="rand4-D128-fp16"),
    pytest.param([1, 37, 17], 15, random_tree(14, 6), 4, 1, 64, torch.float16,
                 dict(block_n=16, num_splits=3), id="rand15-gqa4-fp16"),
    pytest.param([5, 40], 100, random_tree(99, 10), 1, 1, 64, torch.float32,
                 dict(block_n=32, block_m=32, num_splits=2), id="rand100-four-mask-words"),
]


@pytest.mark.parametrize("lens,T,mask,Hq,Hkv,D,dtype,launch", SMALL)
def test_kernel_matches_reference(nan_empty, lens, T, mask, Hq, Hkv, D, dtype, launch):
    check(lens, T, Hq, Hkv, D, dtype, mask, **launch)


@pytest.mark.parametrize(
    "page,lens,launch",
    [
        pytest.param(16, [0, 37, 16], dict(block_n=16, num_splits=2), id="page16=bn"),
        pytest.param(5, [1, 17, 40], dict(block_n=16, num_splits=3), id="page5-odd"),
        pytest.param(32, [15, 65], dict(block_n=16), id="page32-1split"),
    ],
)
def test_paged_cache(nan_empty, page, lens, launch):
    mask = random_tree(8, 7)
    check(lens, 9, 4, 1, 64, torch.float32, mask, page=page, **launch)


def test_packed_mask_equals_bool_mask():
    mask = random_tree(39, 8)
    assert torch.equal(unpack_tree_mask(pack_tree_mask(mask), 40), mask)
    q, k, v, seqlens, _ = make_inputs([20, 3], 40, 2, 1, 64, torch.float32)
    launch = dict(block_n=16, block_m=32, num_splits=2)
    a = tree_attention_triton(q, k, v, seqlens, mask.to(DEV), **launch)
    b = tree_attention_triton(q, k, v, seqlens, pack_tree_mask(mask.to(DEV)), **launch)
    assert torch.equal(a, b)
    ref_b = tree_attention_ref(q, k, v, seqlens, mask.to(DEV))
    ref_p = tree_attention_ref(q, k, v, seqlens, pack_tree_mask(mask.to(DEV)))
    assert torch.equal(ref_b, ref_p)


def test_pack_tree_mask_bit_order():
    mask = torch.zeros(33, 33, dtype=torch.bool)
    mask[0, 0] = mask[1, 31] = mask[2, 32] = mask[3, 1] = True
    packed = pack_tree_mask(mask)
    assert packed.dtype == torch.int32 and packed.shape == (33, 2)
    assert packed[0].tolist() == [1, 0] and packed[1].tolist() == [-(2**31), 0]
    assert packed[2].tolist() == [0, 1] and packed[3].tolist() == [2, 0]


@pytest.mark.parametrize("T,Hq", [(3, 2), (1, 1), (5, 4)], ids=["R6", "R1", "R20"])
def test_split_counts_agree_and_scale_is_used(T, Hq):
    """The merge at split counts below and past one chunk of 8 (BLOCK_S 16, 32), with
    empty splits (the cache has 11 blocks) and rows that do not fill BLOCK_R."""
    q, k, v, seqlens, _ = make_inputs([170, 9], T, Hq, 1, 64, torch.float32)
    mask = chain(T).to(DEV)
    outs = [tree_attention_triton(q, k, v, seqlens, mask, 0.3, block_n=16, num_splits=s)
            for s in (1, 2, 9, 17)]  # fmt: skip
    want = tree_attention_ref(q.double(), k.double(), v.double(), seqlens, mask, 0.3)
    for out in outs:
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_split_count_uses_static_shapes_only(monkeypatch):
    monkeypatch.setattr(ta, "sm_count", lambda device: 132)
    h100 = torch.device("cuda", 0)

    def splits(B, T, Hkv, G, S, D=128):
        R = T * G
        cfg = ta._config(R, D, torch.float16)
        programs = B * Hkv * -(-R // cfg.block_m)
        return ta._num_splits(programs, S, cfg, R, h100)

    assert splits(1, 64, 32, 1, 65600) == 8  # 32 programs x 8 = 256 = 2 per SM
    assert splits(1, 64, 8, 4, 65600) == 8  # 2 row blocks of 128 rows: 16 x 8 = 128 = 1 per SM
    assert splits(8, 64, 32, 1, 65600) == 1  # the batch fills the GPU
    assert splits(1, 1, 8, 4, 4160) == 32  # decode: capped at 2 blocks of 64 keys per split
    assert splits(1, 1, 1, 8, 1 << 20) == 128
    assert splits(1, 64, 32, 1, 300) == 1  # a short cache: 4 blocks per split at least


def test_register_budget_pins_the_occupancy():
    assert ta._Config(16, 64, 4, 3, 3).max_regs == 168  # 3 x 4 warps x 32 x 168 <= 65536
    assert ta._Config(128, 64, 8, 3, 2).max_regs == 128
    assert ta._Config(64, 64, 4, 2, 2).max_regs is None  # 256 > 255: any kernel fits twice
    assert ta._Config(128, 64, 8, 3, 1).max_regs is None


def test_split_count_follows_the_compiled_occupancy(monkeypatch):
    """On CUDA the split count uses the CTAs/SM that ops._backend.ctas_per_sm derives from the
    kernel as compiled there (tested in test_triton_compile.py); fewer CTAs, fewer splits."""
    asked = []

    def fake_ctas_per_sm(kernel, args, kwargs, static, device):
        asked.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, static))
        return 1

    q, k, v, seqlens, _ = make_inputs([3000], 1, 4, 4, 64, torch.float32)
    mask = chain(1).to(DEV)
    with_static = ta.tree_attention_triton(q, k, v, seqlens, mask)
    monkeypatch.setattr(ta, "ctas_per_sm", fake_ctas_per_sm)
    split_plans = []
    real = ta._num_splits
    monkeypatch.setattr(ta, "_num_splits", lambda *a: split_plans.append(real(*a)) or real(*a))
    torch.testing.assert_close(ta.tree_attention_triton(q, k, v, seqlens, mask), with_static)
    cfg = ta._config(4, 64, torch.float32, ta.PLAN_ARCH)
    assert asked == [("_tree_attention_kernel", cfg.ctas_per_sm)]
    assert len(split_plans) == 2 and split_plans[1] < split_plans[0]


def test_strided_q_and_public_entry_point():
    q, k, v, seqlens, bt = make_inputs([12, 30], 5, 4, 2, 64, torch.float32, page=8)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, head-major strides
    mask = pack_tree_mask(random_tree(4, 9).to(DEV))
    got = tree_attention(q, k, v, seqlens, mask, block_table=bt, backend="triton")
    want = tree_attention(q, k, v, seqlens, mask, block_table=bt, backend="torch")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_auto_takes_the_reference_on_cpu(monkeypatch):
    q, k, v, seqlens = (t.cpu() for t in make_inputs([4], 2, 2, 1, 64, torch.float32)[:4])
    monkeypatch.setitem(ta._IMPLS, "triton", None)  # would fail if called
    out = tree_attention(q, k, v, seqlens, chain(2))
    assert torch.equal(out, tree_attention_ref(q, k, v, seqlens, chain(2)))


def test_opcheck_with_block_table():
    q, k, v, seqlens, bt = make_inputs([3, 9], 3, 4, 2, 8, torch.float32, page=4)
    args = (q, k, v, seqlens, chain(3).to(DEV), 0.3, "torch", bt)
    torch.library.opcheck(torch.ops.medusa_kernels.tree_attention.default, args)
    depths = torch.tensor([0, 1, 2], device=DEV)
    torch.library.opcheck(torch.ops.medusa_kernels.tree_attention.default,
                          (*args, 4, 2.0, depths))  # fmt: skip


# --- sliding window, soft-capping, tree depths --------------------------------------------


def brute_force(q, k, v, lens, mask, softmax_scale=None, block_table=None, sliding_window=None,
                softcap=None, tree_depths=None):
    """float64 loop over (b, t, h): the keys each query sees, by position (slot p holds position
    p; tree node u sits at L + depth[u]); transformers' window ``kv_pos > q_pos - W``."""
    if block_table is not None:
        k, v = ta._gather_pages(k, block_table), ta._gather_pages(v, block_table)
    q, k, v, mask = q.double().cpu(), k.double().cpu(), v.double().cpu(), mask.cpu()
    B, T, Hq, D = q.shape
    mask = mask if mask.dtype == torch.bool else unpack_tree_mask(mask, T)
    group = Hq // k.shape[2]
    depth = mask.sum(1) - 1 if tree_depths is None else tree_depths.cpu()
    scale = 1 / math.sqrt(D) if softmax_scale is None else softmax_scale
    out = torch.empty(B, T, Hq, D, dtype=torch.float64)
    W = math.inf if sliding_window is None else sliding_window
    for b in range(B):
        L = int(lens[b])
        for t in range(T):
            pos = L + int(depth[t])
            slots = [j for j in range(L) if j > pos - W]
            slots += [L + u for u in range(T) if mask[t, u] and L + int(depth[u]) > pos - W]
            for h in range(Hq):
                s = k[b, slots, h // group] @ q[b, t, h] * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                out[b, t, h] = torch.softmax(s, 0) @ v[b, slots, h // group]
    return out


def check_options(lens, T, Hq, Hkv, D, dtype, mask, page=None, extra=3, nan_outside=False,
                  **opts):
    """Reference and Triton kernel (interpreter) against the float64 loop; with ``nan_outside``
    every slot no query sees (before the earliest window, past L + T) holds NaN."""
    launch = {n: opts.pop(n) for n in ("num_splits", "block_m", "block_n") if n in opts}
    q, k, v, seqlens, bt = make_inputs(lens, T, Hq, Hkv, D, dtype, page, extra=extra)
    mask = mask.to(DEV)
    want = brute_force(q, k, v, seqlens, mask, block_table=bt, **opts)
    if nan_outside:
        k, v = poison_unseen(k, v, seqlens, T, mask, bt, opts.get("sliding_window"),
                             opts.get("tree_depths"))
    atol, rtol = TOL[dtype]
    ref = tree_attention_ref(q, k, v, seqlens, mask, block_table=bt, **opts)
    torch.testing.assert_close(ref.double().cpu(), want, atol=atol, rtol=rtol)
    same = tree_attention_ref(q, k, v, seqlens, mask, upcast=False, block_table=bt, **opts)
    got = tree_attention_triton(q, k, v, seqlens, mask, block_table=bt, **opts, **launch)
    assert got.shape == q.shape and got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol)
    if dtype != torch.float32:  # at most 2x the error of the same-dtype torch reference
        err, err_torch = ((x.double().cpu() - want).abs().max().item() for x in (got, same))
        assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    return got


def poison_unseen(k, v, seqlens, T, mask, bt, window, depths):
    """Copies of the caches with NaN in every slot that no query of its sequence sees."""
    k, v = k.clone(), v.clone()
    if mask.dtype != torch.bool:
        mask = unpack_tree_mask(mask, T)
    depth = (mask.sum(1) - 1) if depths is None else depths
    for b, L in enumerate(seqlens.tolist()):
        first = 0 if window is None else max(0, L + int(depth.min()) - window + 1)
        S = k.shape[1] if bt is None else bt.shape[1] * k.shape[1]
        for p in [*range(first), *range(L + T, S)]:
            if bt is None:
                k[b, p] = v[b, p] = float("nan")
            else:
                page = int(bt[b, p // k.shape[1]])
                k[page, p % k.shape[1]] = v[page, p % k.shape[1]] = float("nan")
    return k, v


WINDOWED = [  # lens, T, mask, Hq, Hkv, D, dtype, options (incl. launch overrides)
    pytest.param([130, 77, 0, 16], 9, random_tree(8, 11), 4, 1, 64, torch.float32,
                 dict(sliding_window=16, block_n=16, num_splits=3),
                 id="W16-L130-several-windows-ragged-gqa4-split3"),
    pytest.param([100, 41], 6, chain(6), 2, 2, 64, torch.float32,
                 dict(sliding_window=3, block_n=16, num_splits=2),
                 id="W3-chain6-edge-inside-the-tree-mha"),
    pytest.param([60, 33], 15, random_tree(14, 12), 8, 1, 64, torch.float32,
                 dict(sliding_window=20, block_n=16, block_m=16, num_splits=4),
                 id="W20-straddles-prefix-and-tree-gqa8-rowblocks"),
    pytest.param([45, 2], 1, chain(1), 4, 1, 64, torch.float32,
                 dict(sliding_window=8, block_n=16, num_splits=2), id="T1-decode-W8"),
    pytest.param([45, 16], 5, random_tree(4, 13), 4, 4, 64, torch.float32,
                 dict(sliding_window=1, block_n=16), id="W1-only-itself"),
    pytest.param([20, 7], 5, random_tree(4, 14), 4, 1, 64, torch.float32,
                 dict(sliding_window=500, block_n=16, num_splits=2), id="W-larger-than-cache"),
    pytest.param([40, 39], 5, random_tree(4, 14), 4, 1, 64, torch.float32,
                 dict(sliding_window=43, block_n=16, num_splits=2),
                 id="W-just-below-the-capacity"),
    pytest.param([70, 25], 7, random_tree(6, 15), 4, 2, 64, torch.float32,
                 dict(softcap=2.5, block_n=16, num_splits=2), id="softcap-alone"),
    pytest.param([90, 11], 7, random_tree(6, 16), 8, 1, 64, torch.float32,
                 dict(softcap=1.5, sliding_window=24, scale=0.5, block_n=16, num_splits=3),
                 id="softcap-and-W24-scale0.5-gqa8"),
    pytest.param([150, 64, 5], 15, random_tree(14, 17), 4, 1, 128, torch.float16,
                 dict(sliding_window=32, softcap=3.0, block_n=16, num_splits=2),
                 id="fp16-W32-softcap-D128"),
    pytest.param([80, 3], 9, wide(9), 4, 1, 64, torch.float16,
                 dict(sliding_window=10, block_n=16), id="fp16-W10-wide-1split"),
    pytest.param([50, 20], 40, random_tree(39, 18), 2, 1, 64, torch.float32,
                 dict(sliding_window=6, block_n=16, block_m=32, num_splits=2),
                 id="W6-T40-two-mask-words-deep-tree"),
]


@pytest.mark.parametrize("lens,T,mask,Hq,Hkv,D,dtype,opts", WINDOWED)
def test_window_and_softcap(nan_empty, lens, T, mask, Hq, Hkv, D, dtype, opts):
    opts = dict(opts)
    if "scale" in opts:
        opts["softmax_scale"] = opts.pop("scale")
    check_options(lens, T, Hq, Hkv, D, dtype, mask, nan_outside=True, **opts)


@pytest.mark.parametrize("page", [pytest.param(16, id="page16"), pytest.param(7, id="page7")])
def test_window_paged_cache(nan_empty, page):
    mask = pack_tree_mask(random_tree(8, 19))
    check_options([120, 33, 70], 9, 4, 1, 64, torch.float32, mask, page=page, nan_outside=True,
                  sliding_window=20, softcap=4.0, block_n=16, num_splits=3)


def test_window_uses_given_depths():
    """Depths that differ from the mask's (a node placed deeper) move the window."""
    mask = random_tree(6, 20)
    depths = (mask.sum(1) - 1) * 2  # every node twice as deep
    got = check_options([60, 30], 7, 4, 1, 64, torch.float32, mask, sliding_window=9,
                        tree_depths=depths.to(torch.int32), block_n=16, num_splits=2)
    plain = tree_attention_ref(*make_inputs([60, 30], 7, 4, 1, 64, torch.float32)[:4],
                               mask.to(DEV), sliding_window=9)
    assert not torch.allclose(got, plain)


def test_window_reads_only_the_window(monkeypatch):
    """A long context costs O(window): count the key blocks each program folds in."""
    calls = []
    fold = ta._online_softmax

    def counting(*args, **kwargs):
        calls.append(1)
        return fold(*args, **kwargs)

    monkeypatch.setattr(ta, "_online_softmax", counting)
    q, k, v, seqlens, _ = make_inputs([1000], 3, 1, 1, 64, torch.float32)
    mask = chain(3).to(DEV)
    tree_attention_triton(q, k, v, seqlens, mask, sliding_window=20, block_n=16, num_splits=1)
    assert len(calls) <= 20 // 16 + 2 + 1, len(calls)  # window blocks (+ edge) + the tree
    calls.clear()
    tree_attention_triton(q, k, v, seqlens, mask, block_n=16, num_splits=1)
    assert len(calls) == 1000 // 16 + 1 + 1  # no window: every prefix block and the tree


def test_tree_chunks_spread_over_the_last_splits(monkeypatch):
    """No split walks a whole tree block on top of an equal prefix share: 4 chunks of 16 tree
    keys go to the last 4 of 8 splits, one each (issue 19 item 6)."""
    from triton.runtime.interpreter import interpreter_builder

    walked = {}
    fold = ta._online_softmax

    def counting(b_acc, b_m, b_l, b_s, b_v, prec):
        key = (interpreter_builder.grid_idx[2], int(b_s.shape[1].value))  # (split, tile keys)
        walked[key] = walked.get(key, 0) + 1
        return fold(b_acc, b_m, b_l, b_s, b_v, prec)

    monkeypatch.setattr(ta, "_online_softmax", counting)
    q, k, v, seqlens, _ = make_inputs([64 * 8], 64, 1, 1, 64, torch.float32)
    mask = random_tree(63, 24).to(DEV)
    assert ta._tree_chunk(64, 8, 64) == 16
    got = tree_attention_triton(q, k, v, seqlens, mask, block_n=64, block_m=64, num_splits=8)
    assert walked == {(s, 64): 1 for s in range(8)} | {(s, 16): 1 for s in range(4, 8)}
    want = tree_attention_ref(q.double(), k.double(), v.double(), seqlens, mask)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_window_torch_and_triton_agree_through_the_public_op():
    q, k, v, seqlens, bt = make_inputs([50, 9], 5, 4, 2, 64, torch.float32, page=8)
    mask = random_tree(4, 21).to(DEV)
    opts = dict(block_table=bt, sliding_window=7, softcap=2.0)
    got = tree_attention(q, k, v, seqlens, mask, **opts, backend="triton")
    want = tree_attention(q, k, v, seqlens, mask, **opts, backend="torch")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# --- edge and bad values: empty shapes, unused slots, unchecked lengths ---------------------


@pytest.mark.parametrize("B,T", [(0, 3), (2, 0), (0, 0)])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_empty_batch_or_tree_gives_empty_output_on_every_backend(B, T, paged):
    q = torch.randn(B, T, 4, 64, device=DEV)
    if paged:
        k = torch.randn(3, 8, 2, 64, device=DEV)
        bt = torch.zeros(B, 2, dtype=torch.int32, device=DEV)
    else:
        k, bt = torch.randn(B, 16, 2, 64, device=DEV), None
    lens = torch.full((B,), 5, dtype=torch.int32, device=DEV)
    mask = torch.ones(T, T, dtype=torch.bool, device=DEV)
    outs = [tree_attention(q, k, k.clone(), lens, m, block_table=bt, sliding_window=w,
                           backend=name)
            for name in ("torch", "triton") for m in (mask, pack_tree_mask(mask))
            for w in (None, 4)]  # fmt: skip
    for out in outs:
        assert out.shape == (B, T, 4, 64) and out.dtype == q.dtype and out.is_contiguous()
        assert torch.equal(out, outs[0])


def test_zero_head_dim_or_heads_is_refused():
    for shape in ((1, 2, 4, 0), (1, 2, 0, 8)):
        q = torch.randn(shape)
        k = torch.randn(1, 8, 2, shape[3])
        with pytest.raises(ValueError, match=r"needs Hq >= 1 heads of D >= 1"):
            tree_attention(q, k, k, torch.tensor([2], dtype=torch.int32), chain(2))


def test_length_near_int32_max_is_refused():
    """seqlens + T is computed in int64: 2**31 - 1 + 3 must not wrap into range."""
    with pytest.raises(ValueError, match=r"cache_seqlens \+ T must lie in \[T, S = 15\]"):
        tree_attention(**_args(cache_seqlens=torch.tensor([2**31 - 1, 3], dtype=torch.int32)))


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("page", [None, 8])
def test_nan_in_unused_slots_never_leaks(window, page):
    """Slots past L + T (a torch.empty cache, stale memory) and before every window hold NaN
    and inf: every backend's output stays finite and equal to the clean one."""
    lens, T = [30, 3, 17], 5
    mask = random_tree(4, 22)
    q, k, v, seqlens, bt = make_inputs(lens, T, 4, 2, 64, torch.float32, page, extra=20)
    clean = tree_attention_ref(q, k, v, seqlens, mask.to(DEV), block_table=bt,
                               sliding_window=window)  # fmt: skip
    k, v = poison_unseen(k, v, seqlens, T, mask, bt, window, None)
    v[torch.isnan(v)] = float("inf")
    for name in ("torch", "triton"):
        got = tree_attention(q, k, v, seqlens, mask.to(DEV), block_table=bt,
                             sliding_window=window, backend=name)  # fmt: skip
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, clean, atol=2e-5, rtol=2e-5)


def _bad_values():
    q, k, v, _, bt = make_inputs([10, 10, 10, 10], 4, 4, 2, 64, torch.float32, page=8)
    lens = torch.tensor([-5, 10, 9 + 7 * 8, 2**31 - 1], dtype=torch.int32, device=DEV)
    bt = bt.clone()
    bt[1, 0], bt[1, 1] = -3, 10**6  # page indices outside [0, num_pages)
    return q, k, v, lens, bt


def test_unchecked_bad_values_are_clamped_in_the_kernel():
    """What CUDA does without MEDUSA_KERNELS_CHECKS: lengths clamped to [0, S - T], page indices
    to [0, num_pages); the result equals the reference on the clamped values, nothing is read
    outside the cache (the interpreter would fault or return garbage)."""
    q, k, v, lens, bt = _bad_values()
    mask = random_tree(3, 23).to(DEV)
    S = bt.shape[1] * k.shape[1]
    clamped_lens = lens.long().clamp(0, S - 4).to(torch.int32)
    clamped_bt = bt.clamp(0, k.shape[0] - 1)
    for window in (None, 5):
        got = tree_attention_triton(q, k, v, lens, mask, block_table=bt, sliding_window=window,
                                    block_n=16, num_splits=2)  # fmt: skip
        ref = tree_attention_ref(q, k, v, lens, mask, block_table=bt, sliding_window=window)
        want = tree_attention_ref(q, k, v, clamped_lens, mask, block_table=clamped_bt,
                                  sliding_window=window)  # fmt: skip
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(ref, want, atol=0, rtol=0)


def test_values_are_checked_where_check_values_says(monkeypatch):
    """On CPU (and on CUDA with MEDUSA_KERNELS_CHECKS=1) bad values raise; where values are not
    checked the call returns the clamped answer instead of failing."""
    q, k, v, lens, bt = _bad_values()
    mask = random_tree(3, 23).to(DEV)
    if DEV == "cpu":
        with pytest.raises(ValueError, match="cache_seqlens \\+ T must lie in"):
            tree_attention(q, k, v, lens, mask, block_table=bt)
        with pytest.raises(ValueError, match=r"tree_depths must lie in \[0, T = 4\)"):
            tree_attention(q, k, v, lens.clamp(0, 10), mask, block_table=bt.clamp(0, 3),
                           tree_depths=torch.tensor([0, 1, 4, 1]))  # fmt: skip
    monkeypatch.setattr(ta, "check_values", lambda device: False)
    for name in ("torch", "triton"):
        out = tree_attention(q, k, v, lens, mask, block_table=bt, backend=name)
        assert torch.isfinite(out).all()


@requires_cuda
def test_gpu_value_checks_follow_the_environment(monkeypatch):
    q, k, v, lens, bt = _bad_values()
    mask = random_tree(3, 23).to(DEV)
    monkeypatch.setenv("MEDUSA_KERNELS_CHECKS", "1")
    with pytest.raises(ValueError, match="cache_seqlens \\+ T must lie in"):
        tree_attention(q, k, v, lens, mask, block_table=bt)
    monkeypatch.setenv("MEDUSA_KERNELS_CHECKS", "0")
    assert torch.isfinite(tree_attention(q, k, v, lens, mask, block_table=bt)).all()


def _blind_inputs():
    """Row 2 of the mask sees nothing, not even itself; sequence 0 has an empty prefix."""
    q, k, v, lens, _ = make_inputs([0, 6], 4, 4, 2, 64, torch.float32)
    mask = chain(4)
    mask[2] = False
    return q, k, v, lens, mask.to(DEV)


@pytest.mark.parametrize("packed", [False, True], ids=["bool", "packed"])
def test_a_query_that_sees_no_key_is_refused(packed, monkeypatch):
    """A softmax over no key is NaN: refused where values are checked (CPU; CUDA with
    MEDUSA_KERNELS_CHECKS=1), naming the row and the sequence. With a prefix the row is well
    defined (it attends to the prefix only) and goes through."""
    monkeypatch.setenv("MEDUSA_KERNELS_CHECKS", "1")
    q, k, v, lens, mask = _blind_inputs()
    m = pack_tree_mask(mask) if packed else mask
    with pytest.raises(ValueError, match=r"tree_mask row 2 sees no tree node \(not even itself\) "
                       r"and no prefix key \(cache_seqlens\[0\] = 0\): query 2 of sequence 0"):
        tree_attention(q, k, v, lens, m)
    lens1 = lens.clamp(min=1)
    out = tree_attention(q, k, v, lens1, m)
    want = tree_attention_ref(q.double(), k.double(), v.double(), lens1, mask)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    # a window can leave a row without itself blind over a prefix too: node 3 at depth 3, W = 1
    full = chain(4).to(DEV)
    full[3, 3] = False
    depths = torch.arange(4, device=DEV)
    with pytest.raises(ValueError, match=r"row 3 .* sliding_window = 1 \(depth 3\)"):
        tree_attention(q, k, v, lens1, full, sliding_window=1, tree_depths=depths)
    out = tree_attention(q, k, v, lens1, full, sliding_window=2, tree_depths=depths)
    assert torch.isfinite(out).all()


def test_unchecked_query_that_sees_no_key_gives_zero(monkeypatch):
    """Without the value checks (CUDA's default) the kernel writes 0 for a query that sees no
    key, never NaN, at one split and with the split merge; every other row as the reference."""
    q, k, v, lens, mask = _blind_inputs()
    seen = torch.ones(2, 4, dtype=torch.bool, device=DEV)
    seen[0, 2] = False
    want = tree_attention_ref(q.double(), k.double(), v.double(), lens, mask)
    for splits in (1, 3):
        out = tree_attention_triton(q, k, v, lens, pack_tree_mask(mask), block_n=16,
                                    num_splits=splits)  # fmt: skip
        assert torch.isfinite(out).all() and (out[0, 2] == 0).all(), splits
        torch.testing.assert_close(out.double()[seen], want[seen], atol=2e-5, rtol=2e-5)
    if DEV == "cuda":
        monkeypatch.setenv("MEDUSA_KERNELS_CHECKS", "0")
        for backend in ("torch", "triton"):
            out = tree_attention(q, k, v, lens, mask, backend=backend)
            assert torch.isfinite(out).all() and (out[0, 2] == 0).all(), backend


# --- argument checks -------------------------------------------------------------------------


def _args(**change):
    """CPU tensors: the value checks (lengths, page indices) run only where they cost no sync."""
    q, k, v, seqlens = (t.cpu() for t in make_inputs([3, 9], 3, 4, 2, 64, torch.float32)[:4])
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=seqlens, tree_mask=chain(3))
    args.update(change)
    return args


def _paged(slots, block_table, pages=1):
    """A paged cache of ``pages`` pages x ``slots`` slots with ``block_table`` (int list or tensor)."""
    cache = torch.randn(pages, slots, 2, 64)
    bt = block_table if isinstance(block_table, torch.Tensor) else torch.tensor(block_table)
    return dict(k_cache=cache, v_cache=cache.clone(), block_table=bt)


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(tree_mask=torch.ones(3, 2, dtype=torch.int32)), ValueError,
         r"tree_mask must be \[T, T\] = \[3, 3\] \(bool\) or \[T, ceil\(T/32\)\] = \[3, 1\]"),
        (dict(tree_mask=torch.ones(3, 3)), TypeError, "tree_mask must have dtype"),
        (_paged(15, torch.zeros(2, 4, dtype=torch.int64)), TypeError,
         "block_table must have dtype"),
        (_paged(15, torch.zeros(3, 4, dtype=torch.int32)), ValueError,
         "block_table has shape .* batch B of q"),
        (_paged(15, torch.zeros(4, dtype=torch.int32)), ValueError,
         "block_table must have 2 dims"),
        (_paged(2, torch.zeros(2, 1, dtype=torch.int32)), ValueError,
         "T = 3 tree tokens do not fit max_pages"),
        (_paged(15, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)), ValueError,
         r"block_table\[1, 0\] = 1 is not a page index in \[0, 1\)"),
        (dict(k_cache=torch.randn(3, 15, 2, 64), v_cache=torch.randn(3, 15, 2, 64)), ValueError,
         "k_cache has shape .* batch B of q"),
    ],
)
def test_bad_arguments(change, err, match):
    with pytest.raises(err, match=match):
        tree_attention(**_args(**change), backend="torch")


def test_paged_page_index_error_names_the_entry():
    args = _args(**_paged(8, torch.tensor([[0, 2], [1, 7]], dtype=torch.int32), pages=3))
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 7"):
        tree_attention(**args)
    args["block_table"][1, 1] = 2  # sequence 0 needs 1 page (3 + 3 <= 8): its page 1 is free
    args["block_table"][0, 1] = -1
    tree_attention(**args)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(D=32), "head dims .* got D = 32"),
        (dict(dtype=torch.float64), "supports q dtypes"),
        (dict(T=129), "T <= 128"),
    ],
)
def test_triton_refuses_unsupported_shapes(change, match):
    shape = dict(T=3, D=64, dtype=torch.float32) | change
    q, k, v, seqlens, _ = make_inputs([1], shape["T"], 2, 1, shape["D"], shape["dtype"])
    with pytest.raises(ValueError, match=match):
        tree_attention(q, k, v, seqlens, chain(shape["T"]).to(DEV), backend="triton")


# --- GPU: larger shapes, fp16 / bf16, error at most 2x the same-dtype torch reference ---------


def _gpu_case(lens, T, Hq, Hkv, D, dtype, mask, page=None, **opts):
    q, k, v, seqlens, bt = make_inputs(lens, T, Hq, Hkv, D, dtype, page)
    mask = mask.to(DEV)
    ref32 = tree_attention_ref(q.float(), k.float(), v.float(), seqlens, mask, block_table=bt,
                               **opts)  # fmt: skip
    same = tree_attention_ref(q, k, v, seqlens, mask, upcast=False, block_table=bt, **opts)
    got = tree_attention(q, k, v, seqlens, mask, block_table=bt, **opts)  # "auto": triton
    err = (got.float() - ref32).abs().max().item()
    err_torch = (same.float() - ref32).abs().max().item()
    assert err <= 2 * err_torch + 1e-4, (err, err_torch)


GPU_TREE = mk.build_tree(mk.TREES["mc_sim_7b_63"]).tree_mask


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "lens,Hkv,D,page",
    [
        pytest.param([4000], 32, 128, None, id="B1-L4000-mha"),
        pytest.param([4097, 1, 0, 2500], 8, 128, None, id="B4-unequal-gqa4"),
        pytest.param([3000, 777], 4, 80, None, id="B2-D80-gqa8"),
        pytest.param([1500, 333], 8, 96, 256, id="B2-D96-paged256"),
        pytest.param([2049, 64], 8, 128, 16, id="B2-paged16"),
        pytest.param([5000, 120, 7], 8, 64, None, id="B3-D64"),
    ],
)
def test_gpu_tree(dtype, lens, Hkv, D, page):
    _gpu_case(lens, 64, 32, Hkv, D, dtype, GPU_TREE, page)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("lens,T,Hkv", [([8191, 5], 1, 8), ([3, 17000], 1, 32),
                                        ([1000, 2000], 128, 8), ([6000], 31, 1)])
def test_gpu_decode_and_big_trees(dtype, lens, T, Hkv):
    mask = torch.ones(1, 1, dtype=torch.bool) if T == 1 else random_tree(T - 1, T)
    _gpu_case(lens, T, 32, Hkv, 128, dtype, mask)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "lens,Hkv,page,opts",
    [
        pytest.param([9000, 100, 4500], 8, None, dict(sliding_window=4096), id="W4096-ragged"),
        pytest.param([3000, 17], 8, 16, dict(sliding_window=512, softcap=50.0),
                     id="W512-softcap50-paged16"),
        pytest.param([2000], 32, None, dict(softcap=30.0), id="softcap30-mha"),
        pytest.param([5000, 40], 4, 256, dict(sliding_window=40), id="W40-inside-the-tree"),
    ],
)
def test_gpu_window_softcap(dtype, lens, Hkv, page, opts):
    _gpu_case(lens, 64, 32, Hkv, 128, dtype, GPU_TREE, page, **opts)


@requires_cuda
def test_gpu_compiled_occupancy_equals_the_static_config():
    """The CTAs/SM measured from the compiled kernel equal the config's (on sm_90, where the
    static values come from); elsewhere the measured one is what the split count uses."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the static ctas_per_sm values are sm_90's")
    for T, Hkv in ((1, 8), (64, 32), (64, 8)):
        _backend._DERIVED_OCCUPANCY.clear()
        q, k, v, seqlens, _ = make_inputs([3000], T, 32, Hkv, 128, torch.float16)
        mask = GPU_TREE if T == 64 else chain(1)
        tree_attention(q, k, v, seqlens, mask.to(DEV))
        cfg = ta._config(T * 32 // Hkv, 128, torch.float16, 90)
        derived = _backend._DERIVED_OCCUPANCY
        assert derived and set(derived.values()) <= {cfg.ctas_per_sm}, (T, Hkv, derived)


@requires_cuda
def test_gpu_auto_picks_triton_and_falls_back_for_small_heads(monkeypatch):
    calls = []
    monkeypatch.setitem(ta._IMPLS, "triton",
                        lambda *a, **kw: calls.append(1) or tree_attention_triton(*a, **kw))
    q, k, v, seqlens, _ = make_inputs([10], 4, 4, 2, 128, torch.float16)
    tree_attention(q, k, v, seqlens, chain(4).cuda())
    assert calls == [1]
    q, k, v, seqlens, _ = make_inputs([10], 4, 4, 2, 16, torch.float16)
    tree_attention(q, k, v, seqlens, chain(4).cuda())
    assert calls == [1]


@requires_cuda
def test_gpu_cuda_graph_capture_reads_lengths_on_the_device():
    q, k, v, seqlens, _ = make_inputs([300, 1000], 64, 32, 8, 128, torch.float16, extra=2000)
    mask = GPU_TREE.cuda()
    tree_attention(q, k, v, seqlens, mask)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_attention(q, k, v, seqlens, mask)
    for lens in ([300, 1000], [2900, 0], [1, 2500]):
        seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        want = tree_attention_ref(q, k, v, seqlens, mask)
        torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)


def test_reference_scale_default():
    q, k, v, seqlens, _ = make_inputs([5], 2, 2, 1, 64, torch.float64)
    a = tree_attention_ref(q, k, v, seqlens, chain(2).to(DEV))
    b = tree_attention_ref(q, k, v, seqlens, chain(2).to(DEV), 1 / math.sqrt(64))
    assert torch.equal(a, b)
