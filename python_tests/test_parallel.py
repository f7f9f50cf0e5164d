"""Tensor parallelism's building blocks in one process (medusa_kernels.parallel): the group and
its checks, the sharding rules against transformers' head mapping and the layer math, slice
reads from safetensors, the exact top-k merge with ties, the fused top-k on vocabulary shards.
The same pieces on 2 and 4 gloo ranks, and the decoder built from them: test_parallel_ranks.py.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_worker import attention_heads, mlp_hidden
from safetensors import safe_open
from tp_checkpoints import MEDUSA_HEADS, TINY, tiny_tensors, write_checkpoint

from medusa_kernels.ops import lm_head_topk, medusa_heads_topk
from medusa_kernels.ops.heads_topk import topk_lower_index_first
from medusa_kernels.parallel import (
    SINGLE,
    ReadStats,
    TPGroup,
    TPLayout,
    gather_vocab,
    init_tp,
    keys_topk,
    lm_head_topk_parallel,
    merge_topk,
    merge_topk_keys,
    rank_device,
    read_shards,
    row_parallel_linear,
    shard_topk,
    tensor_rule,
    topk_keys,
    vocab_parallel_embedding,
    vocab_range,
)
from medusa_kernels.parallel import group as group_module
from medusa_kernels.parallel import load as load_module


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    tensors = tiny_tensors(TINY, MEDUSA_HEADS)
    files = write_checkpoint(str(tmp_path_factory.mktemp("tiny")), tensors, TINY)
    return TINY, files, tensors


# ----------------------------------------------------------------------------- one process


def test_single_group_costs_nothing(monkeypatch):
    """World 1: no process group, every collective hands back its input."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_tp() is SINGLE and not dist.is_initialized()
    x = torch.randn(3, 5)
    before = x.clone()
    assert SINGLE.all_reduce(x) is x and torch.equal(x, before)
    assert SINGLE.all_gather(x).shape == (1, 3, 5) and torch.equal(SINGLE.all_gather(x)[0], x)
    values, indices = torch.randn(4, 3), torch.randint(0, 9, (4, 3))
    merged = merge_topk(values, indices, SINGLE)
    assert merged[0] is values and merged[1] is indices
    assert gather_vocab(x, SINGLE, 5) is x
    table, tokens = torch.randn(7, 4), torch.tensor([[0, 6, 3]])
    assert torch.equal(vocab_parallel_embedding(tokens, table, SINGLE, 7), table[tokens])
    w, b = torch.randn(6, 5), torch.randn(6)
    assert torch.equal(row_parallel_linear(x, w, b, SINGLE), F.linear(x, w, b))
    assert not dist.is_initialized() and SINGLE.is_main and not SINGLE.parallel


def test_tp_group_checks():
    with pytest.raises(ValueError, match="rank"):
        TPGroup(rank=2, world=2, group=object())
    with pytest.raises(ValueError, match="process group"):
        TPGroup(rank=0, world=2)
    with pytest.raises(TypeError, match="world"):
        TPGroup(rank=0, world=2.0)


def test_close_meets_at_a_barrier_before_tearing_down(monkeypatch):
    """An owned group's close: a barrier, then destroy (gloo aborts a rank whose peer hangs up
    mid-shutdown); sync=False (an error path) skips the barrier; a failed barrier still
    destroys; an unowned group or no group at all is left alone."""
    calls = []
    fake = dict(is_initialized=lambda: True, get_world_size=lambda: 2,
                barrier=lambda: calls.append("barrier"),
                destroy_process_group=lambda: calls.append("destroy"))
    for name, fn in fake.items():
        monkeypatch.setattr(group_module.dist, name, fn)
    pg = object()
    TPGroup(0, 2, pg, owned=True).close()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    TPGroup(1, 2, pg, owned=True).close(sync=False)
    assert calls == ["destroy"]
    calls.clear()
    TPGroup(1, 2, pg).close()
    assert calls == []

    def broken():
        raise RuntimeError("peer hung up")

    monkeypatch.setattr(group_module.dist, "barrier", broken)
    with pytest.raises(RuntimeError, match="peer hung up"):
        TPGroup(0, 2, pg, owned=True).close()
    assert calls == ["destroy"]
    monkeypatch.setattr(group_module.dist, "is_initialized", lambda: False)
    calls.clear()
    TPGroup(0, 2, pg, owned=True).close()
    assert calls == []


def test_init_tp_names_missing_torchrun_variables(monkeypatch):
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT"):
        init_tp()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_tp()
    assert not dist.is_initialized()


def test_rank_device(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda") == torch.device("cuda", 3)
    assert rank_device("cuda:1") == torch.device("cuda", 1)
    assert rank_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 3) if torch.cuda.is_available() else torch.device("cpu")
    assert rank_device(None) == expected


def test_vocab_ranges_partition_the_vocabulary():
    for V in range(1, 41):
        for world in range(1, min(V, 8) + 1):
            ranges = [vocab_range(V, world, r) for r in range(world)]
            sizes = [stop - start for start, stop in ranges]
            assert ranges[0][0] == 0 and ranges[-1][1] == V
            assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
            assert sizes == [len(c) for c in torch.tensor_split(torch.arange(V), world)]


BASE = dict(num_heads=8, num_kv_heads=4, head_dim=2, intermediate_size=16, vocab_size=37)


@pytest.mark.parametrize("change, world, key", [
    pytest.param(dict(num_heads=6, num_kv_heads=3), 2, "num_key_value_heads = 3", id="kv3-w2"),
    pytest.param(dict(), 8, "num_key_value_heads = 4", id="kv4-w8"),
    pytest.param(dict(intermediate_size=18), 4, "intermediate_size = 18", id="ffn18-w4"),
    pytest.param(dict(num_heads=6), 2, "num_attention_heads = 6", id="heads6-kv4"),
    pytest.param(dict(vocab_size=3), 4, "vocab_size >= 4", id="vocab3-w4"),
    pytest.param(dict(head_dim=0), 1, "head_dim", id="head-dim0"),
])
def test_layout_refuses_sizes_that_do_not_split(change, world, key):
    with pytest.raises(ValueError, match=key):
        TPLayout(world, 0, **{**BASE, **change})


def test_layout_rank_and_config_keys():
    with pytest.raises(ValueError, match="rank"):
        TPLayout(2, 2, **BASE)
    cfg = {"vocab_size": 11, "hidden_size": 12, "num_attention_heads": 4,
           "intermediate_size": 8}  # no num_key_value_heads / head_dim: MHA, d / heads
    layout = TPLayout.from_hf_config({"text_config": cfg}, 2, 1)
    assert (layout.num_kv_heads, layout.head_dim, layout.vocab) == (4, 3, (6, 11))
    assert (layout.q_heads, layout.kv_heads, layout.ffn) == ((2, 4), (2, 4), (4, 8))


GQA = [pytest.param(4, 4, 4, id="mha-w4"), pytest.param(4, 4, 2, id="mha-w2"),
       pytest.param(8, 2, 2, id="gqa4-w2"), pytest.param(16, 2, 2, id="gqa8-w2"),
       pytest.param(16, 4, 4, id="gqa4-w4"), pytest.param(8, 2, 1, id="gqa4-w1")]


def _layer_tensors(Hq, Hkv, D, d, I, V, dtype=torch.float32):
    g = torch.Generator().manual_seed(Hq * 100 + Hkv)
    q, kv = Hq * D, Hkv * D
    shapes = {"self_attn.q_proj.weight": (q, d), "self_attn.q_proj.bias": (q,),
              "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,),
              "self_attn.v_proj.weight": (kv, d), "self_attn.v_proj.bias": (kv,),
              "self_attn.o_proj.weight": (d, q), "self_attn.o_proj.bias": (d,),
              "mlp.gate_proj.weight": (I, d), "mlp.up_proj.weight": (I, d),
              "mlp.down_proj.weight": (d, I), "mlp.down_proj.bias": (d,),
              "input_layernorm.weight": (d,), "self_attn.q_norm.weight": (D,)}
    t = {"model.layers.0." + n: torch.randn(s, generator=g, dtype=dtype)
         for n, s in shapes.items()}
    t["model.embed_tokens.weight"] = torch.randn(V, d, generator=g, dtype=dtype)
    t["medusa_head.2.1.weight"] = torch.randn(V, d, generator=g, dtype=dtype)
    t["2.0.linear.weight"] = torch.randn(d, d, generator=g, dtype=dtype)
    return t


@pytest.mark.parametrize("Hq, Hkv, world", GQA)
def test_shard_rules_follow_kv_head_groups(Hq, Hkv, world):
    """Each rank's slice against transformers' head mapping (query head h reads KV head
    h // (Hq / Hkv)); fused tensors give the separate ones' slices stacked; ranks partition
    every split tensor."""
    D, d, I, V = 3, 5, 12, 11
    t = _layer_tensors(Hq, Hkv, D, d, I, V)
    p = "model.layers.0."
    wq, wk, wv = (t[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
    fused_qkv = torch.cat([wq, wk, wv])
    fused_gate_up = torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])
    held_q = []
    for rank in range(world):
        lay = TPLayout(world, rank, Hq, Hkv, D, I, V)

        def take(name, full=None, lay=lay):
            full = t[name] if full is None else full
            return lay.shard(name, full.shape).take(full)

        kv_heads = [j for j in range(Hkv) if j * world // Hkv == rank]
        q_heads = [h for h in range(Hq) if h // (Hq // Hkv) in kv_heads]
        held_q += q_heads
        assert (lay.local_num_heads, lay.local_num_kv_heads) == (len(q_heads), len(kv_heads))
        exp_q = wq.view(Hq, D, d)[q_heads].reshape(-1, d)
        exp_k, exp_v = (w.view(Hkv, D, d)[kv_heads].reshape(-1, d) for w in (wk, wv))
        assert torch.equal(take(p + "self_attn.q_proj.weight"), exp_q)
        assert torch.equal(take(p + "self_attn.k_proj.weight"), exp_k)
        assert torch.equal(take(p + "self_attn.v_proj.weight"), exp_v)
        assert torch.equal(take(p + "self_attn.q_proj.bias"),
                           t[p + "self_attn.q_proj.bias"].view(Hq, D)[q_heads].reshape(-1))
        assert torch.equal(take(p + "self_attn.k_proj.bias"),
                           t[p + "self_attn.k_proj.bias"].view(Hkv, D)[kv_heads].reshape(-1))
        assert torch.equal(take(p + "self_attn.o_proj.weight"),
                           t[p + "self_attn.o_proj.weight"].view(d, Hq, D)[:, q_heads]
                           .reshape(d, -1))
        assert torch.equal(take(p + "self_attn.qkv_proj.weight", fused_qkv),
                           torch.cat([exp_q, exp_k, exp_v]))
        rows = [i for i in range(I) if i * world // I == rank]
        gate, up = t[p + "mlp.gate_proj.weight"][rows], t[p + "mlp.up_proj.weight"][rows]
        assert torch.equal(take(p + "mlp.gate_proj.weight"), gate)
        assert torch.equal(take(p + "mlp.up_proj.weight"), up)
        assert torch.equal(take(p + "mlp.gate_up_proj.weight", fused_gate_up),
                           torch.cat([gate, up]))
        assert torch.equal(take(p + "mlp.down_proj.weight"), t[p + "mlp.down_proj.weight"][:, rows])
        for name in ("model.embed_tokens.weight", "medusa_head.2.1.weight"):
            assert torch.equal(take(name), torch.tensor_split(t[name], world)[rank])
        for name in (p + "self_attn.o_proj.bias", p + "mlp.down_proj.bias",
                     p + "input_layernorm.weight", p + "self_attn.q_norm.weight",
                     "2.0.linear.weight"):
            assert lay.shard(name, t[name].shape).replicated
    assert sorted(held_q) == list(range(Hq))


@pytest.mark.parametrize("Hq, Hkv, world", GQA)
def test_split_layer_sums_to_the_full_layer(Hq, Hkv, world):
    """The math the rules serve: the ranks' attention and MLP outputs before the all-reduce,
    summed, plus the bias once, equal the full layer's (float64)."""
    D, d, I, V = 3, 5, 12, 11
    t = _layer_tensors(Hq, Hkv, D, d, I, V, torch.float64)
    p = "model.layers.0."
    x = torch.randn(2, 7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    full = TPLayout(1, 0, Hq, Hkv, D, I, V)
    wo, bo = t[p + "self_attn.o_proj.weight"], t[p + "self_attn.o_proj.bias"]
    wd, bd = t[p + "mlp.down_proj.weight"], t[p + "mlp.down_proj.bias"]
    attn = F.linear(attention_heads(x, t, p, full), wo, bo)
    mlp = F.linear(mlp_hidden(x, t, p), wd, bd)
    attn_sum, mlp_sum = bo.clone(), bd.clone()
    for rank in range(world):
        lay = TPLayout(world, rank, Hq, Hkv, D, I, V)
        w = {n: lay.shard(n, v.shape).take(v) for n, v in t.items()}
        attn_sum = attn_sum + F.linear(attention_heads(x, w, p, lay), w[p + "self_attn.o_proj.weight"])
        mlp_sum = mlp_sum + F.linear(mlp_hidden(x, w, p), w[p + "mlp.down_proj.weight"])
    torch.testing.assert_close(attn_sum, attn, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mlp_sum, mlp, atol=1e-12, rtol=1e-12)


def test_rules_refuse_unknown_tensors_and_wrong_shapes():
    lay = TPLayout(2, 0, **BASE)
    with pytest.raises(ValueError, match="model.vision_tower.patch.weight"):
        tensor_rule("model.vision_tower.patch.weight")
    with pytest.raises(ValueError, match=r"model.layers.3.self_attn.k_proj.weight.*\[6, 5\].*8"):
        lay.shard("model.layers.3.self_attn.k_proj.weight", (6, 5))
    with pytest.raises(ValueError, match="lm_head.weight.*vocab_size"):
        lay.shard("lm_head.weight", (36, 5))
    with pytest.raises(ValueError, match="o_proj.weight.*along dim 1"):
        lay.shard("model.layers.0.self_attn.o_proj.weight", (5, 8))
    assert lay.shard("model.layers.0.mlp.down_proj.weight", (5, 16)).local_shape((5, 16)) == (5, 8)


# ----------------------------------------------------------------------------- top-k merge


SPECIAL = [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45,
           3.4e38, -3.4e38, 1.0, 1.0, -1.0, 0.5, float("nan"), -0.0, 2.0, 2.0]


def test_topk_keys_order_and_round_trip():
    """Keys sort as (value descending, index ascending), the single-rank tie rule, on the
    awkward floats: NaN of both signs (first, as torch.sort puts it), +-inf, +-0.0 equal,
    subnormals; decoding gives the values back (-0.0 as +0.0, NaN as NaN) and the ids."""
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        values = torch.tensor(SPECIAL)[torch.randperm(len(SPECIAL), generator=g)]
        if trial % 2:
            values = values.half().float()  # subnormals flush: more ties
        ids = torch.arange(len(values))
        keys = topk_keys(values, ids)
        assert keys.unique().numel() == len(values)
        expected = topk_lower_index_first(values, len(values))[1]
        assert torch.equal(ids[keys.argsort(descending=True)], expected)
        back, back_ids = keys_topk(keys)
        assert torch.equal(back_ids, ids)
        torch.testing.assert_close(back, values, atol=0, rtol=0, equal_nan=True)
        assert not torch.signbit(back[values == 0]).any()


@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_merge_of_rank_lists_equals_single_rank_topk(world, k, seed):
    """Every rank's top-k of its slice, keyed and stacked as the all-gather returns them,
    merged: equal to one rank's ``topk_lower_index_first`` of the full logits, ties included
    (small integer logits: ties everywhere, across every shard boundary)."""
    V = 41
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 2, (5, 3, V), generator=g).float()
    logits[0] = 1.0
    logits[1, 0, 7] = float("nan")
    logits[1, 1] = torch.where(logits[1, 1] == 0, -0.0, logits[1, 1])
    lists = []
    for rank in range(world):
        start, stop = vocab_range(V, world, rank)
        values, ids = topk_lower_index_first(logits[..., start:stop], k)
        lists.append(topk_keys(values, ids + start))
    values, ids = keys_topk(merge_topk_keys(torch.stack(lists), k))
    exp_values, exp_ids = topk_lower_index_first(logits, k)
    assert torch.equal(ids, exp_ids)
    torch.testing.assert_close(values, exp_values, atol=0, rtol=0, equal_nan=True)


FUSED = [pytest.param("torch", 2, 1, id="torch-w2-N1"), pytest.param("torch", 4, 5, id="torch-w4-N5"),
         pytest.param("triton", 3, 3, id="triton-w3-N3")]


@pytest.mark.parametrize("backend, world, N", FUSED)
def test_fused_topk_on_vocab_shards_merges_to_the_full_result(backend, world, N):
    """What each rank runs: the fused heads / lm_head top-k on its contiguous vocabulary
    rows, local ids shifted to global; merged, equal to the same kernel on the full weights,
    ids and values (CPU: fp32, Triton in the interpreter; GPU: bf16 at a 32001 vocabulary)."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    d, V, K, k = (256, 32001, 4, 10) if cuda else (32, 203, 2, 5)
    g = torch.Generator().manual_seed(world * 10 + N)
    hidden = torch.randn(N, d, generator=g).to(device, dtype)
    w1 = (torch.randn(K, d, d, generator=g) * d**-0.5).to(device, dtype)
    b1 = (torch.randn(K, d, generator=g) * 0.1).to(device, dtype)
    w2 = torch.randn(K, V, d, generator=g).to(device, dtype)
    full = {"heads": medusa_heads_topk(hidden, w1, b1, w2, k, backend=backend),
            "lm_head": lm_head_topk(hidden, w2[0], k, backend=backend)}
    lists = {"heads": [], "lm_head": []}
    for rank in range(world):
        start, stop = vocab_range(V, world, rank)
        shard = w2[:, start:stop].contiguous()
        for name, (values, ids) in (
                ("heads", medusa_heads_topk(hidden, w1, b1, shard, k, backend=backend)),
                ("lm_head", lm_head_topk(hidden, shard[0], k, backend=backend))):
            lists[name].append(topk_keys(values, ids + start))
    for name, (exp_values, exp_ids) in full.items():
        values, ids = keys_topk(merge_topk_keys(torch.stack(lists[name]), k))
        assert torch.equal(ids, exp_ids), name
        tol = 1e-5 if cuda and backend == "torch" else 0  # cuBLAS may pick by shape
        torch.testing.assert_close(values, exp_values, atol=tol, rtol=tol)


def test_vocab_pieces_check_their_arguments():
    two = TPGroup(1, 2, group=object())  # rank 1 of 2 (no collective is reached)
    table = torch.randn(18, 4)  # rank 1 of V = 37 holds 18 rows
    with pytest.raises(ValueError, match="rank 1 of 2 holds \\[19, 37\\).*18 rows"):
        vocab_parallel_embedding(torch.tensor([1]), torch.randn(19, 4), two, 37)
    with pytest.raises(ValueError, match="tokens must lie in \\[0, vocab_size = 37\\)"):
        vocab_parallel_embedding(torch.tensor([3, 37]), table, two, 37)
    with pytest.raises(ValueError, match="tokens must lie"):
        vocab_parallel_embedding(torch.tensor([-1]), torch.randn(37, 4), SINGLE, 37)
    with pytest.raises(TypeError, match="tokens must be int64"):
        vocab_parallel_embedding(torch.tensor([1.0]), table, two, 37)
    with pytest.raises(ValueError, match="k must be an int in \\[1, vocab_size = 37\\]"):
        shard_topk(torch.randn(2, 18), 38, two, 37)
    with pytest.raises(ValueError, match="k must be"):
        lm_head_topk_parallel(torch.randn(2, 4), table, 0, two, 37)
    with pytest.raises(ValueError, match="one shape"):
        merge_topk(torch.randn(2, 3), torch.zeros(2, 4, dtype=torch.int64), two)
    with pytest.raises(TypeError, match="indices int64"):
        merge_topk(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int32), two)
    with pytest.raises(ValueError, match="global vocabulary ids"):
        merge_topk(torch.randn(2, 3), torch.full((2, 3), -1), two)
    with pytest.raises(ValueError, match="k must be an int in \\[3, world x 3\\]"):
        merge_topk(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int64), two, k=2)
    with pytest.raises(ValueError, match="k must be an int in \\[3, world x 3\\]"):
        merge_topk(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int64), two, k=7)
    with pytest.raises(ValueError, match="world 1: 3"):
        merge_topk(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.int64), SINGLE, k=4)
    with pytest.raises(ValueError, match="vocab_size must be"):
        gather_vocab(torch.randn(2, 1), two, 1)
    with pytest.raises(ValueError, match="contiguous"):
        two.all_reduce(torch.randn(4, 4).T)


# ----------------------------------------------------------------------------- slice reads


class _SpyOpen:
    """safe_open that records the tensors read whole (``get_tensor``)."""

    whole: list[str] = []

    def __init__(self, path, framework):
        self.f = safe_open(path, framework=framework)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_slice(self, name):
        return self.f.get_slice(name)

    def get_tensor(self, name):
        _SpyOpen.whole.append(name)
        return self.f.get_tensor(name)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_read_shards_reads_only_the_slices(tiny_ckpt, world, monkeypatch):
    """Each rank's tensors equal the rule applied to the full tensors; split tensors never
    come out whole (only get_slice), and the bytes read add up to one copy over the ranks."""
    cfg, files, full = tiny_ckpt
    monkeypatch.setattr(_SpyOpen, "whole", [])
    monkeypatch.setattr(load_module, "safe_open", _SpyOpen)
    split_read = 0
    for rank in range(world):
        layout = TPLayout.from_hf_config(cfg, world, rank)
        stats = ReadStats()
        got = read_shards(files, layout, stats=stats)
        assert set(got) == set(full)
        for name, tensor in got.items():
            shard = layout.shard(name, full[name].shape)
            assert torch.equal(tensor, shard.take(full[name])), name
            assert tensor.is_contiguous() and tensor.shape == shard.local_shape(full[name].shape)
        whole = {n for n in full if layout.shard(n, full[n].shape).replicated}
        assert set(_SpyOpen.whole) <= whole
        assert stats.read == sum(t.numel() * t.element_size() for t in got.values())
        assert stats.full == sum(t.numel() * t.element_size() for t in full.values())
        split_read += stats.split_read
    assert split_read == stats.split_full  # the ranks together read each split tensor once
    p = "model.layers.1."
    assert got[p + "self_attn.qkv_proj.weight"].shape == (8 // world * 6 + 2 * 4 // world * 6, 24)
    assert got[p + "mlp.down_proj.weight"].shape == (24, 40 // world)


def test_read_shards_keep_and_errors(tmp_path):
    t = {"model.norm.weight": torch.ones(4), "model.vision_tower.w": torch.ones(2, 2),
         "lm_head.weight": torch.randn(10, 4)}
    files = write_checkpoint(str(tmp_path / "a"), t, {}, files=1)
    layout = TPLayout(2, 1, num_heads=2, num_kv_heads=2, head_dim=2, intermediate_size=4,
                      vocab_size=10)
    with pytest.raises(ValueError, match="model.vision_tower.w"):
        read_shards(files, layout)
    got = read_shards(files, layout, keep=lambda n: "vision" not in n)
    assert torch.equal(got["lm_head.weight"], t["lm_head.weight"][5:])
    twice = write_checkpoint(str(tmp_path / "b"), {"model.norm.weight": torch.ones(4)}, {}, 1)
    with pytest.raises(ValueError, match="model.norm.weight is in both"):
        read_shards(files + twice, layout, keep=lambda n: "vision" not in n)
