"""The op boundary: references against naive loops, backend choice, custom-op registration."""

import math

import pytest
import torch

import medusa_kernels as mk
from medusa_kernels.ops._backend import pick_backend
from medusa_kernels.ops.compact_kv import compact_kv_cache_ref
from medusa_kernels.ops.heads_topk import medusa_heads_topk_ref
from medusa_kernels.ops.tree_attention import tree_attention_ref


def test_tree_attention_ref_equals_a_naive_loop():
    torch.manual_seed(0)
    B, T, Hq, Hkv, D, S = 3, 4, 4, 2, 8, 20
    tree = mk.build_tree([[0], [1], [0, 0]])
    q = torch.randn(B, T, Hq, D, dtype=torch.float64)
    k, v = torch.randn(2, B, S, Hkv, D, dtype=torch.float64)
    lens = torch.tensor([0, 5, 16], dtype=torch.int32)
    got = tree_attention_ref(q, k, v, lens, tree.tree_mask)
    for b in range(B):
        for t in range(T):
            keys = list(range(lens[b])) + [lens[b] + u for u in range(T) if tree.tree_mask[t, u]]
            for h in range(Hq):
                kk, vv = k[b, keys, h // 2], v[b, keys, h // 2]
                p = torch.softmax(kk @ q[b, t, h] / math.sqrt(D), 0)
                torch.testing.assert_close(got[b, t, h], p @ vv)


def test_heads_topk_ref_equals_a_naive_loop():
    torch.manual_seed(1)
    N, K, d, V = 3, 2, 6, 40
    h, b1 = torch.randn(N, d, dtype=torch.float64), torch.randn(K, d, dtype=torch.float64)
    w1, w2 = torch.randn(K, d, d, dtype=torch.float64), torch.randn(K, V, d, dtype=torch.float64)
    values, indices = medusa_heads_topk_ref(h, w1, b1, w2, 5)
    for n in range(N):
        for k in range(K):
            x = h[n] + torch.nn.functional.silu(w1[k] @ h[n] + b1[k])
            order = sorted(range(V), key=lambda j: -(w2[k] @ x)[j].item())[:5]
            assert indices[n, k].tolist() == order
            torch.testing.assert_close(values[n, k].double(), (w2[k] @ x)[order], atol=1e-5, rtol=0)


def test_compaction_ref_equals_a_naive_loop():
    torch.manual_seed(2)
    L, B, S, H, D = 2, 3, 16, 2, 4
    k, v = torch.randn(2, L, B, S, H, D)
    lens = torch.tensor([2, 5, 9], dtype=torch.int32)
    idx = torch.tensor([[0, 2, 5], [0, 1, 3], [0, 4, 6]])
    acc = torch.tensor([3, 0, 2], dtype=torch.int32)
    want_k, want_v = k.clone(), v.clone()
    for b in range(B):
        for i in range(acc[b]):
            want_k[:, b, lens[b] + i] = k[:, b, lens[b] + idx[b, i]]
            want_v[:, b, lens[b] + i] = v[:, b, lens[b] + idx[b, i]]
    compact_kv_cache_ref(k, v, lens, idx, acc)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert lens.tolist() == [5, 5, 11]


def test_backend_choice_and_errors():
    cpu, impls = torch.device("cpu"), {"torch": None, "triton": None}
    assert pick_backend("op", "auto", cpu, impls) == "torch"
    assert pick_backend("op", "torch", cpu, impls) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        pick_backend("op", "fast", cpu, impls)
    with pytest.raises(RuntimeError, match="op: backend 'cuda' is not implemented"):
        pick_backend("op", "cuda", cpu, impls)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        pick_backend("op", "cuda", cpu, {"cuda": None})


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pick_backend("op", "triton", torch.device("cpu"), {"triton": None})


@pytest.mark.parametrize("name", ["tree_attention", "medusa_heads_topk", "compact_kv_cache"])
def test_ops_are_registered_custom_ops(name):
    assert hasattr(torch.ops.medusa_kernels, name)


def test_opcheck_tree_attention():
    q = torch.randn(2, 3, 4, 8)
    k, v = torch.randn(2, 2, 16, 2, 8)
    args = (q, k, v, torch.tensor([3, 9], dtype=torch.int32),
            torch.tril(torch.ones(3, 3, dtype=torch.bool)), 0.3, "torch")
    torch.library.opcheck(torch.ops.medusa_kernels.tree_attention.default, args)


def test_opcheck_compaction():
    k, v = torch.randn(2, 2, 2, 16, 2, 8)
    args = (k, v, torch.tensor([3, 9], dtype=torch.int32), torch.tensor([[0, 2], [0, 1]]),
            torch.tensor([2, 1], dtype=torch.int32), "torch")
    torch.library.opcheck(torch.ops.medusa_kernels.compact_kv_cache.default, args)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.randn(2, 3, 4)), "q must have 4 dims"),
        (dict(k_cache=torch.randn(2, 16, 3, 8), v_cache=torch.randn(2, 16, 3, 8)),
         "not a multiple of the cache.s 3 KV heads"),
        (dict(k_cache=torch.randn(2, 16, 2, 8).half()), "k_cache must have dtype"),
        (dict(cache_seqlens=torch.tensor([3, 9])), "cache_seqlens must have dtype"),
        (dict(cache_seqlens=torch.tensor([3, 14], dtype=torch.int32)), "cache_seqlens \\+ T"),
        (dict(tree_mask=torch.ones(2, 2, dtype=torch.bool)), "tree_mask must be \\[T, T\\]"),
    ],
)
def test_tree_attention_bad_input(change, match):
    args = dict(q=torch.randn(2, 3, 4, 8), k_cache=torch.randn(2, 16, 2, 8),
                v_cache=torch.randn(2, 16, 2, 8), cache_seqlens=torch.tensor([3, 9], dtype=torch.int32),
                tree_mask=torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        mk.tree_attention(**args)


def test_compaction_refuses_an_overflow():
    k, v = torch.randn(2, 2, 8, 2, 4)
    with pytest.raises(ValueError, match="outside the cache"):
        mk.compact_kv_cache(k, v, torch.tensor([6, 0], dtype=torch.int32),
                            torch.tensor([[0, 3], [0, 1]]), torch.tensor([2, 2], dtype=torch.int32))


def test_inputs_on_another_device_are_refused():
    q = torch.randn(1, 1, 2, 8)
    k = torch.randn(1, 4, 2, 8, device="meta")
    with pytest.raises(ValueError, match="k_cache must be on cpu"):
        mk.tree_attention(q, k, k, torch.tensor([1], dtype=torch.int32),
                          torch.ones(1, 1, dtype=torch.bool))
    hidden = torch.randn(2, 8)
    with pytest.raises(ValueError, match="w2 must be on cpu"):
        mk.medusa_heads_topk(hidden, torch.randn(1, 8, 8), torch.randn(1, 8),
                             torch.randn(1, 16, 8, device="meta"), 2)
