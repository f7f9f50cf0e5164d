"""The CPU's eager path of the decoder (``model.CPU_FAST_PATH``: plain PyTorch calls in place of
the fused ops' custom ops, SDPA for the tree attention), which ``generate`` takes on a CPU: the
family tests of test_families.py (logits at every position and greedy tokens against
transformers, Medusa equal to plain greedy) run again with it forced on (the interpreter the
suite runs under otherwise keeps it off), and it computes what the ops' path computes."""

import pytest
import torch
import torch.nn.functional as F
from test_families import (  # noqa: F401 (the fixture and the tests, rerun here)
    fam,
    test_greedy_equals_transformers_argmax_loop,
    test_logits_at_every_position,
    test_medusa_equals_plain_greedy,
)
from test_launch_budget import hf_family_model
from torch.utils._python_dispatch import TorchDispatchMode

from medusa_kernels import model as model_module
from medusa_kernels.decoding import generate, medusa_step, plain_step
from medusa_kernels.ops._linear import STREAM_FRACTION, linear, llc_bytes, skinny
from medusa_kernels.tree import TREES, build_tree


@pytest.fixture(autouse=True)
def fast_path(monkeypatch):
    monkeypatch.setattr(model_module, "CPU_FAST_PATH", "on")


@pytest.mark.parametrize("arch", ["llama-gqa-llama3rope", "qwen2-window", "qwen3", "phi3-longrope",
                                  "gemma2", "gemma3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_path_equals_ops_path(arch, batch, monkeypatch):
    """Prefill, a plain step and a Medusa step on the two paths: the same hidden states (up to
    rounding), tokens, counts and caches."""
    model = hf_family_model(arch, dtype=torch.float32)
    base = model.base
    g = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, base.cfg.vocab_size, (batch, 11), generator=g)
    lengths = torch.tensor([11, 7, 9][:batch], dtype=torch.int32)
    root = torch.randint(0, base.cfg.vocab_size, (batch,), generator=g)
    running = torch.ones(batch, dtype=torch.bool)
    tb = build_tree(TREES["small_15"], 3)
    plain_tb = build_tree([], None)
    out = {}
    for mode in ("on", "off"):
        monkeypatch.setattr(model_module, "CPU_FAST_PATH", mode)
        cache = base.new_cache(batch, 40)
        with torch.inference_mode():
            hidden = base.prefill(tokens, lengths, cache)
            last = hidden[torch.arange(batch), lengths.long() - 1]
            p = plain_step(model, plain_tb, cache, root, last, running)
            m = medusa_step(model, tb, cache, p[2], p[3], running)
        out[mode] = (hidden, p, m, cache)
    (h1, p1, m1, c1), (h0, p0, m0, c0) = out["on"], out["off"]
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
    for a, b in zip((*p1, *m1), (*p0, *m0), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(a, b)
    torch.testing.assert_close(c1.k, c0.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1.v, c0.v, atol=1e-5, rtol=1e-5)
    assert torch.equal(c1.seqlens, c0.seqlens)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("N,K", [(48, 32), (32, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_float64(rows, N, K, bias):
    """``ops._linear.linear`` (``w @ x.T`` at few rows on a CPU) is F.linear: against float64
    on fresh inputs, leading dims kept, contiguous; and it takes the fast call where the rule
    says (2 rows always, 3-4 where N >= K, one row sent as two)."""
    g = torch.Generator().manual_seed(rows * 100 + N)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    x = torch.randn(1, rows, K, generator=g)
    out = linear(x, w, b, stream=True)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == (1, rows, N) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert skinny(rows, w, stream=True) == (rows <= 2 or (rows <= 4 and N >= K))
    assert not skinny(rows, w, stream=False) and not skinny(rows, w)  # small: from the cache
    torch.testing.assert_close(linear(x, w, b), out, atol=1e-5, rtol=1e-5)


def test_linear_judges_streaming_by_size():
    """Without the caller's word, a matrix over 1/8 of the last-level cache streams."""
    K = 256
    N = int(STREAM_FRACTION * llc_bytes()) // (4 * K) + 1
    big = torch.randn(N, K)
    assert skinny(1, big) and not skinny(1, big[: N // 2])


def test_linear_falls_back_where_it_should():
    """fp16, autograd and a transposed weight get F.linear itself (same values; gradients)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    x = torch.randn(2, 24, generator=g)
    assert not skinny(2, w.t().contiguous().t(), True) and not skinny(2, w.half(), True)
    assert torch.equal(linear(x.half(), w.half(), stream=True), F.linear(x.half(), w.half()))
    wg = w.clone().requires_grad_()
    assert not skinny(2, wg, True)
    linear(x, wg, stream=True).sum().backward()
    torch.testing.assert_close(wg.grad, x.sum(0).expand(40, 24))
    with torch.inference_mode():
        assert skinny(2, wg, True)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("tree", [[], [[0]], [[0], [1], [0, 0]]])
def test_fast_path_reads_weights_in_place(tree, stream, monkeypatch):
    """A decode step on the fast path multiplies every weight matrix as stored (row-major: no
    copy, no layout switch) and, where ``ops._linear``'s rule says (1-2 tokens; 3-4 where
    N >= K), through ``w @ x.T`` (``aten.mm`` with the weight first), the call that reads it
    once at the machine's streaming rate; elsewhere, and for weights that fit in the cache
    (the tiny model's, unless the cache is said to be 0 bytes), through ``aten.linear``."""
    monkeypatch.setattr(model_module, "llc_bytes", lambda: 0 if stream else 1 << 40)
    model = hf_family_model("llama-gqa-llama3rope", dtype=torch.float32)
    base = model.base
    assert base.weights_stream() == stream
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, base.cfg.vocab_size, (1, 9), generator=g)
    lengths = torch.tensor([9], dtype=torch.int32)
    running = torch.ones(1, dtype=torch.bool)
    cache = base.new_cache(1, 24)
    with torch.inference_mode():
        hidden = base.prefill(tokens, lengths, cache)
        root, last = base.greedy(hidden[:, -1]), hidden[:, -1]
        params = [*base.named_parameters("base"), *model.heads.named_parameters("heads")]
        weights = {p.untyped_storage().data_ptr(): n for n, p in params if p.dim() >= 2}
        tb = build_tree(tree, 3)
        step = plain_step if not tree else medusa_step
        calls = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                names = [weights.get(a.untyped_storage().data_ptr()) for a in args
                         if isinstance(a, torch.Tensor)]
                if any(names):
                    calls.append((func, names, args))
                return func(*args, **(kwargs or {}))

        with Record():
            step(model, tb, cache, root, last, running)
    # the heads' and the lm_head's top-k are custom ops (their references call ``linear``)
    aten = torch.ops.aten
    products = [c for c in calls if c[0].overloadpacket in (
        aten.mm, aten.matmul, aten.linear, aten.addmm, aten.bmm, aten.einsum, aten.baddbmm)]
    for func, names, args in products:
        if func == aten.linear.default:  # the rule's other side: more rows, or N < K at 3-4
            x, w = args[:2]
            assert names[1] is not None and not skinny(x.numel() // x.shape[-1], w, stream), \
                names
        else:
            assert stream and func in (aten.mm.default, aten.matmul.default) and \
                names[0] is not None, (func, names)
    read = {n for _, names, _ in products for n in names if n}
    for i in range(base.cfg.num_layers):
        for name in ("attention.wqkv", "attention.wo", "mlp.w13", "mlp.w2"):
            assert f"base.layers.{i}.{name}.weight" in read, read
    assert all(p.is_contiguous() for _, p in params) or not stream  # streaming: row-major


def test_column_major_layout_switches_and_restores(monkeypatch):
    """For weights that fit in the cache (the tiny model's) the fast path stores q|k|v, o,
    gate|up and the (tied) lm_head column-major (same values, the down projection untouched),
    the ops' path gets them row-major back, and so does a cast; the tokens do not change
    across the switches."""
    model = hf_family_model("llama-gqa-llama3rope", dtype=torch.float32)
    base = model.base
    base.lm_head.weight = base.embed.weight  # tied, as SmolLM2's
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.cfg.vocab_size, (1, 9), generator=g)
    lengths = torch.tensor([9], dtype=torch.int32)

    def decode():
        cache = base.new_cache(1, 16)
        with torch.inference_mode():
            hidden = base.prefill(tokens, lengths, cache)
            root = base.greedy(hidden[:, -1])
            out = [int(root)]
            for _ in range(4):
                root = plain_step(model, build_tree([], None), cache, root, None,
                                  torch.ones(1, dtype=torch.bool))[2]
                out.append(int(root))
        return out

    def col_major(p):
        return p.stride() == (1, p.shape[0])

    fast = decode()
    layer = base.layers[0]
    for p in (layer.attention.wqkv.weight, layer.mlp.w13.weight, base.embed.weight):
        assert p.shape[0] >= p.shape[1] and col_major(p)
    assert layer.mlp.w2.weight.is_contiguous()  # fewer rows than columns: row-major reads faster
    assert base.lm_head.weight is base.embed.weight
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]), n
    monkeypatch.setattr(model_module, "CPU_FAST_PATH", "off")
    assert decode() == fast
    assert all(p.is_contiguous() for p in base.parameters())
    monkeypatch.setattr(model_module, "CPU_FAST_PATH", "on")
    assert decode() == fast and col_major(layer.mlp.w13.weight)
    base.double()  # a cast (or a move) gets the row-major layout
    assert all(p.is_contiguous() for p in base.parameters())


def test_separate_heads_streaming_from_memory_take_linear():
    """Separate heads whose projections stream (over 1/8 of the cache each) are projected head
    by head through ``linear``: the same top-k as the float64 reference."""
    from medusa_kernels.ops import medusa_heads_topk_ref

    g = torch.Generator().manual_seed(3)
    K, d = 2, 64
    V = int(STREAM_FRACTION * llc_bytes()) // (4 * d) + 7
    hidden, w1 = torch.randn(1, d, generator=g), torch.randn(K, d, d, generator=g) / d**0.5
    b1, w2 = torch.randn(K, d, generator=g), torch.randn(K, V, d, generator=g)
    assert skinny(1, w2[0])
    with torch.inference_mode():
        values, ids = medusa_heads_topk_ref(hidden, w1, b1, w2, 5)
        ref_values, ref_ids = medusa_heads_topk_ref(hidden.double(), w1.double(), b1.double(),
                                                    w2.double(), 5)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values, ref_values.float(), atol=1e-4, rtol=1e-5)


def test_a_model_loaded_under_inference_mode_decodes():
    """Weights made under torch.inference_mode are inference tensors: the cache-resident
    column-major switch leaves them as they are (it crashed: "Inference tensors do not track
    version counter"), and the tokens are those of a model loaded normally."""
    model = hf_family_model("llama-gqa-llama3rope", dtype=torch.float32)
    with torch.inference_mode():
        frozen = hf_family_model("llama-gqa-llama3rope", dtype=torch.float32)
        assert frozen.base.lm_head.weight.is_inference()
        got = generate(frozen, [[1, 2, 3, 4]], max_new_tokens=6, medusa=False).tokens
    assert got == generate(model, [[1, 2, 3, 4]], max_new_tokens=6, medusa=False).tokens
