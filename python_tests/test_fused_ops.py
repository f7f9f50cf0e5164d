"""The fused decoder ops (ops/rms_norm.py, ops/rotary.py, ops/activation.py): the Triton kernels
(interpreter on the CPU) against float64 references over awkward shapes, outputs poisoned; the
torch backends bit for bit against the decoder's own modules; bad inputs; torch.compile."""

import pytest
import torch

from medusa_kernels import model
from medusa_kernels.ops import ACTIVATIONS, gated_act, rms_norm, rope_kv_write
from medusa_kernels.ops import activation as activation_mod
from medusa_kernels.ops import rotary as rotary_mod
from medusa_kernels.ops.activation import TRITON_ACTIVATIONS, gated_act_ref
from medusa_kernels.ops.rms_norm import rms_norm_ref
from medusa_kernels.ops.rotary import rope_kv_write_ref, write_slots_ref

DTYPES = [torch.float32, torch.float16]
# the kernel's max error against float64 may be at most 2x the same-dtype reference's, plus:
ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch, request):
    """Every ``torch.empty`` (the launchers' outputs) returns NaN (or -1): unwritten outputs
    fail (not under torch.compile, whose tracing allocates fake tensors)."""
    if "compile" in request.node.name:
        return
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.device.type != "meta":
            t.fill_(float("nan") if t.dtype.is_floating_point else -1)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    assert rotary_mod.torch.empty is poisoned


def assert_near(out, ref64, same_dtype, what=""):
    """out against the float64 reference: no NaN, error <= 2x the same-dtype torch reference's
    error (relative to the values' scale) + ATOL."""
    assert out.dtype == same_dtype.dtype and out.shape == ref64.shape, what
    assert not out.isnan().any(), f"{what}: NaN in the output"
    scale = max(1.0, ref64.abs().max().item())
    err = (out.double() - ref64).abs().max().item() / scale
    base = (same_dtype.double() - ref64).abs().max().item() / scale
    assert err <= 2 * base + ATOL[out.dtype], f"{what}: error {err:.3g} vs reference {base:.3g}"


def f64(*ts):
    return [None if t is None else t.double() for t in ts]


# ---------------------------------------------------------------------------------------- rms_norm

NORM_SHAPES = [
    pytest.param((3, 5), 67, id="B3-T5-N67"),
    pytest.param((1, 1), 4096, id="B1-T1-N4096"),
    pytest.param((7,), 1, id="N1"),
    pytest.param((), 33, id="1d-N33"),
    pytest.param((2, 1, 3, 2), 24, id="5d-N24"),
]


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, N", NORM_SHAPES)
def test_rms_norm_triton_matches_float64(lead, N, dtype, residual, unit_offset):
    torch.manual_seed(N)
    x = torch.randn(*lead, N, dtype=dtype) * 3
    r = torch.randn(*lead, N, dtype=dtype) if residual else None
    w = (torch.randn(N) * 0.5 + (0 if unit_offset else 1)).to(dtype)
    got = rms_norm(x, w, 1e-5, residual=r, unit_offset=unit_offset, backend="triton")
    want = rms_norm_ref(*f64(x, w), 1e-5, *f64(r), unit_offset=unit_offset)
    same = rms_norm_ref(x, w, 1e-5, r, unit_offset=unit_offset)
    if residual:
        out, h = got
        assert torch.equal(h, x + r) and h.is_contiguous()  # the add rounds once, as torch's
    else:
        out = got
    assert out.is_contiguous() and out.shape == x.shape
    assert_near(out, want[0], same[0], "out")


def test_rms_norm_reads_strided_views_in_place():
    """q heads inside a fused q|k|v row (not viewable as [rows, D]) and a transposed residual."""
    torch.manual_seed(1)
    qkv = torch.randn(3, 5, 12 * 80, dtype=torch.float16).view(3, 5, 12, 80)
    q = qkv[:, :, :8]
    res = torch.randn(5, 3, 8, 80, dtype=torch.float16).transpose(0, 1)
    w = torch.randn(80, dtype=torch.float16)
    for backend in ("torch", "triton"):
        out, h = rms_norm(q, w, 1e-6, residual=res, backend=backend)
        want, want_h = rms_norm_ref(q.contiguous(), w, 1e-6, res.contiguous())
        assert torch.equal(h, want_h)
        assert_near(out, rms_norm_ref(*f64(q, w), 1e-6, res.double())[0], want, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_rms_norm_torch_backend_is_the_decoders_rmsnorm_bit_for_bit(dtype, unit_offset):
    torch.manual_seed(2)
    norm = model.RMSNorm(67, 1e-6, unit_offset).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(2, 3, 67, dtype=dtype), torch.randn(2, 3, 67, dtype=dtype)
    w = norm.weight.detach()
    with torch.no_grad():
        assert torch.equal(rms_norm(x, w, 1e-6, unit_offset=unit_offset, backend="torch"), norm(x))
        out, h = rms_norm(x, w, 1e-6, residual=r, unit_offset=unit_offset, backend="torch")
        assert torch.equal(h, x + r) and torch.equal(out, norm(x + r))
        if dtype != torch.bfloat16:  # the kernel: the same roundings, the sum in another order
            tri = rms_norm(x, w, 1e-6, unit_offset=unit_offset, backend="triton")
            assert_near(tri, rms_norm_ref(*f64(x, w), 1e-6, unit_offset=unit_offset)[0],
                        norm(x), "triton")  # fmt: skip


def test_rms_norm_llama_weight_dtype_promotes_as_transformers():
    """fp32 weight on an fp16 x: the Llama product is fp32 (``weight * normed.to(fp16)``)."""
    x, w = torch.randn(4, 40, dtype=torch.float16), torch.randn(40)
    for backend in ("torch", "triton"):
        out = rms_norm(x, w, 1e-6, backend=backend)
        assert out.dtype == torch.float32
        assert torch.allclose(out, rms_norm_ref(x, w, 1e-6)[0], atol=1e-6, rtol=1e-6)
        assert rms_norm(x, w, 1e-6, unit_offset=True, backend=backend).dtype == torch.float16


# ------------------------------------------------------------------------------------ rope_kv_write

ROPE_CASES = [  # B, T, Hq, Hkv, D, R
    pytest.param(1, 1, 4, 4, 64, 64, id="B1-T1-gqa1-D64"),
    pytest.param(3, 5, 8, 2, 80, 80, id="B3-T5-gqa4-D80"),
    pytest.param(1, 5, 8, 1, 64, 32, id="B1-T5-gqa8-D64-R32"),
    pytest.param(3, 1, 4, 1, 80, 24, id="B3-T1-gqa4-D80-R24"),
    pytest.param(2, 5, 16, 2, 64, 64, id="B2-T5-gqa8-D64"),
]


def _rope_inputs(B, T, Hq, Hkv, D, R, dtype, S=13, NL=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).to(dtype)
    q, k, v = qkv.view(B, T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], dim=2)
    angles = torch.rand(B, T, R // 2, generator=g) * 50
    cos, sin = angles.cos() * 1.1, angles.sin() * 1.1  # an attention factor
    # ragged, not in order, and non-contiguous: [T, B] transposed
    starts = torch.randint(0, S - T + 1, (B,), generator=g)
    order = torch.stack([torch.randperm(T, generator=g) for _ in range(B)])
    write_pos = (starts[:, None] + order).t().contiguous().t()
    assert not write_pos.is_contiguous() or B == 1 or T == 1
    k_cache = torch.full((NL, B, S, Hkv, D), float("nan"), dtype=dtype)
    return q, k, v, cos, sin, k_cache, k_cache.clone(), write_pos


@pytest.mark.parametrize("norm", [None, "llama", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, T, Hq, Hkv, D, R", ROPE_CASES)
def test_rope_kv_write_triton_matches_float64(B, T, Hq, Hkv, D, R, dtype, norm):
    q, k, v, cos, sin, kc, vc, pos = _rope_inputs(B, T, Hq, Hkv, D, R, dtype, seed=D + T)
    qw = kw = None
    if norm is not None:
        qw = (torch.randn(D) * 0.3 + (1 if norm == "llama" else 0)).to(dtype)
        kw = (torch.randn(D) * 0.3 + (1 if norm == "llama" else 0)).to(dtype)
    extra = dict(q_norm_weight=qw, k_norm_weight=kw, eps=1e-5, unit_offset=norm == "gemma")
    layer = 1
    q_out = rope_kv_write(q, k, v, cos, sin, kc, vc, layer, pos, **extra, backend="triton")
    kc64, vc64 = kc.double().fill_(float("nan")), vc.double().fill_(float("nan"))
    extra64 = dict(extra, q_norm_weight=None if qw is None else qw.double(),
                   k_norm_weight=None if kw is None else kw.double())  # fmt: skip
    q64 = rope_kv_write_ref(*f64(q, k, v), cos, sin, kc64, vc64, layer, pos, **extra64)
    kcs, vcs = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    q_same = rope_kv_write_ref(q, k, v, cos, sin, kcs, vcs, layer, pos, **extra)
    assert q_out.is_contiguous() and q_out.shape == (B, T, Hq, D)
    assert_near(q_out, q64, q_same, "q")
    written = ~kc64.isnan()
    assert int(written.sum()) == B * T * Hkv * D  # every token its own slot
    assert torch.equal(kc.isnan(), ~written) and torch.equal(vc.isnan(), ~written)  # nothing else
    assert_near(kc[written], kc64[written], kcs[written], "k_cache")
    assert torch.equal(vc[written], vcs[written])  # v: copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_rope_kv_write_torch_backend_is_the_decoders_path_bit_for_bit(dtype, qk_norm,
                                                                      unit_offset):
    """The decoder's q/k norm, ``apply_rope`` (cos, sin [B, T, R] built as Transformer.rope
    builds them) and ``index_put_`` write, partial rotary included."""
    B, T, Hq, Hkv, D, R = 2, 3, 4, 2, 40, 24
    q, k, v, cos, sin, kc, vc, pos = _rope_inputs(B, T, Hq, Hkv, D, R, dtype)
    norm_q, norm_k = (model.RMSNorm(D, 1e-6, unit_offset).to(dtype) for _ in range(2))
    with torch.no_grad():
        norm_q.weight.normal_(), norm_k.weight.normal_()
    extra = {}
    if qk_norm:
        extra = dict(q_norm_weight=norm_q.weight.detach(), k_norm_weight=norm_k.weight.detach(),
                     eps=1e-6, unit_offset=unit_offset)  # fmt: skip
    q_out = rope_kv_write(q, k, v, cos, sin, kc, vc, 2, pos, **extra, backend="torch")
    with torch.no_grad():
        qn, kn = (norm_q(q), norm_k(k)) if qk_norm else (q, k)
    c = torch.cat([cos, cos], -1).to(dtype)
    s = torch.cat([sin, sin], -1).to(dtype)
    assert torch.equal(q_out, model.apply_rope(qn, c, s))
    kc_want, vc_want = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    batch = torch.arange(B)[:, None]
    kc_want[2][batch, pos], vc_want[2][batch, pos] = model.apply_rope(kn, c, s), v
    assert torch.equal(kc.nan_to_num(7.0), kc_want.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vc_want.nan_to_num(7.0))


def test_rope_kv_write_out_of_range_slots_are_skipped_unchecked():
    """Without the host check (CUDA) the kernel and the reference skip slots outside [0, S):
    the valid tokens are written, nothing else (no out-of-bounds write: the cache's neighbours
    in one buffer stay NaN)."""
    B, T, Hq, Hkv, D, R, S = 2, 3, 4, 2, 64, 64, 6
    q, k, v, cos, sin, _, _, _ = _rope_inputs(B, T, Hq, Hkv, D, R, torch.float32, S=S)
    pos = torch.tensor([[-1, 2, S], [1, 10**12, -(2**40)]])  # clamped: no valid slot's
    ok = (pos >= 0) & (pos < S)
    for impl in ("triton", "ref"):
        buf = torch.full((4, B, S, Hkv, D), float("nan"))  # layers 0 and 3 guard the cache
        kc, vc = buf[1:2], buf[2:3]
        if impl == "triton":
            rotary_mod.rope_kv_write_triton(q, k, v, cos, sin, kc, vc, 0, pos)
        else:
            write_slots_ref(kc[0], vc[0], k, v, pos, checked=False)
        written = ~buf.isnan()
        assert int(written.sum()) == 2 * int(ok.sum()) * Hkv * D, impl
        assert torch.equal(buf[2, 0, 2], v[0, 1]) and torch.equal(buf[2, 1, 1], v[1, 0]), impl
        assert not written[0].any() and not written[3].any(), impl


def test_rope_kv_write_cpu_checks_slots_and_names_write_pos():
    q, k, v, cos, sin, kc, vc, _ = _rope_inputs(1, 2, 4, 2, 64, 64, torch.float32, S=5)
    for bad in ([[0, 5]], [[-1, 0]]):
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match="write_pos"):
                rope_kv_write(q, k, v, cos, sin, kc, vc, 0, torch.tensor(bad), backend=backend)
    with pytest.raises(ValueError, match="write_pos"):  # the reference itself, inside compile
        rope_kv_write_ref(q, k, v, cos, sin, kc, vc, 0, torch.tensor([[0, 9]]))
    assert kc.isnan().all()


# -------------------------------------------------------------------------------------- gated_act

ACT_SHAPES = [
    pytest.param((3, 5), 67, id="B3-T5-I67"),
    pytest.param((1, 1), 1100, id="B1-T1-I1100"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", sorted(TRITON_ACTIVATIONS))
@pytest.mark.parametrize("lead, inter", ACT_SHAPES)
def test_gated_act_triton_matches_float64(lead, inter, act, dtype):
    torch.manual_seed(inter)
    gate_up = (torch.randn(*lead, 2 * inter) * 3).to(dtype)
    out = gated_act(gate_up, act, backend="triton")
    assert out.shape == (*lead, inter) and out.is_contiguous()
    assert_near(out, gated_act_ref(gate_up.double(), act), gated_act_ref(gate_up, act), act)


def test_gated_act_reads_strided_rows_and_extreme_values():
    """Rows of a wider buffer (a view), gates at +-80 (where a naive sigmoid's exp overflows),
    and a 1-d gate_up of one gate and one up."""
    buf = torch.randn(4, 3, 2 * 50 + 7)
    buf[..., :8] = torch.tensor([-80.0, 80.0, -20.0, 20.0, 0.0, -0.0, 1e-30, -1e-30])
    gate_up = buf[..., :100]
    tiny = torch.randn(2)  # 1-d, I = 1
    for act in TRITON_ACTIVATIONS:
        for g in (gate_up, tiny):
            out = gated_act(g, act, backend="triton")
            assert_near(out, gated_act_ref(g.double(), act), gated_act_ref(g, act), act)


def test_gated_act_torch_backend_is_transformers_formula_for_every_activation():
    torch.manual_seed(3)
    gate_up = torch.randn(2, 3, 46, dtype=torch.float16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert set(ACTIVATIONS) == set(model.ACTIVATIONS)
    for name, fn in ACTIVATIONS.items():
        assert torch.equal(gated_act(gate_up, name, backend="torch"), fn(gate) * up), name
        assert torch.equal(fn(gate), model.ACTIVATIONS[name](gate)), name  # the same table


def test_gated_act_triton_refuses_other_activations_and_auto_falls_back():
    gate_up = torch.randn(2, 8)
    others = sorted(set(ACTIVATIONS) - set(TRITON_ACTIVATIONS))
    assert others
    for name in others:
        with pytest.raises(ValueError, match="act"):
            gated_act(gate_up, name, backend="triton")
        assert not activation_mod.triton_supports(gate_up, name)
        assert torch.equal(gated_act(gate_up, name), gated_act_ref(gate_up, name))


# ------------------------------------------------------------------------------------- bad inputs


def _call_norm(**kw):
    args = dict(x=torch.randn(2, 8), weight=torch.randn(8), eps=1e-6)
    args.update(kw)
    return rms_norm(**args)


def _call_rope(**kw):
    q, k, v, cos, sin, kc, vc, pos = _rope_inputs(1, 2, 4, 2, 16, 16, torch.float32, S=5)
    args = dict(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=kc, v_cache=vc, layer=0,
                write_pos=pos)  # fmt: skip
    args.update(kw)
    return rope_kv_write(**args)


META = dict(device="meta")
BAD = [
    (_call_norm, dict(x=torch.randn(2, 8, dtype=torch.float64)[..., ::2]), "x"),
    (_call_norm, dict(x=torch.randn(2, 8).to(torch.int32)), "x"),
    (_call_norm, dict(weight=torch.randn(7)), "weight"),
    (_call_norm, dict(weight=torch.randn(8, **META)), "weight"),
    (_call_norm, dict(residual=torch.randn(2, 8, dtype=torch.float16)), "residual"),
    (_call_norm, dict(residual=torch.randn(3, 8)), "residual"),
    (_call_norm, dict(eps=float("nan")), "eps"),
    (_call_norm, dict(eps=-1.0), "eps"),
    (_call_rope, dict(q=torch.randn(1, 2, 4, 16, dtype=torch.float16)), "k"),
    (_call_rope, dict(k=torch.randn(1, 3, 2, 16)), "k"),
    (_call_rope, dict(v=torch.randn(1, 2, 3, 16)), "v"),
    (_call_rope, dict(q=torch.randn(1, 2, 4, 32)[..., ::2]), "q"),
    (_call_rope, dict(cos=torch.randn(1, 2, 8, dtype=torch.float16)), "cos"),
    (_call_rope, dict(cos=torch.randn(1, 2, 9), sin=torch.randn(1, 2, 9)), "cos"),
    (_call_rope, dict(sin=torch.randn(1, 2, 4)), "sin"),
    (_call_rope, dict(k_cache=torch.randn(3, 1, 5, 4, 16)), "k_cache"),
    (_call_rope, dict(v_cache=torch.randn(3, 1, 6, 2, 16)), "v_cache"),
    (_call_rope, dict(k_cache=torch.randn(3, 1, 5, 2, 16, **META)), "k_cache"),
    (_call_rope, dict(k_cache=torch.randn(3, 1, 2, 5, 16).transpose(2, 3),
                      v_cache=torch.randn(3, 1, 2, 5, 16).transpose(2, 3)), "k_cache"),
    (_call_rope, dict(layer=3), "layer"),
    (_call_rope, dict(layer=-1), "layer"),
    (_call_rope, dict(layer=True), "layer"),
    (_call_rope, dict(write_pos=torch.zeros(1, 2)), "write_pos"),
    (_call_rope, dict(write_pos=torch.zeros(2, 1, dtype=torch.long)), "write_pos"),
    (_call_rope, dict(write_pos=torch.zeros(1, 2, dtype=torch.long, **META)), "write_pos"),
    (_call_rope, dict(q_norm_weight=torch.randn(15)), "q_norm_weight"),
    (_call_rope, dict(k_norm_weight=torch.randn(16).to(torch.int64)), "k_norm_weight"),
    (gated_act, dict(gate_up=torch.randn(2, 7), act="silu"), "gate_up"),
    (gated_act, dict(gate_up=torch.randn(2, 8)[:, ::2], act="silu"), "gate_up"),
    (gated_act, dict(gate_up=torch.randn(2, 8).long(), act="silu"), "gate_up"),
    (gated_act, dict(gate_up=torch.randn(2, 8), act="swiglu"), "act"),
    (gated_act, dict(gate_up=torch.randn(2, 8), act="silu", backend="cuda"), "cuda"),
]


@pytest.mark.parametrize("fn, kwargs, name", BAD, ids=[f"{f.__name__}-{n}" for f, _, n in BAD])
def test_bad_inputs_name_the_argument(fn, kwargs, name):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
        fn(**kwargs)


# ---------------------------------------------------------------------------------- torch.compile


def test_a_layer_of_fused_ops_compiles_fullgraph_and_writes_the_cache_in_place():
    """Inductor (CPU), fullgraph: the same values as eager, and the cache mutation is done on
    the graph inputs themselves: no copy of a cache in the generated code."""
    from torch._inductor.utils import run_and_get_code

    B, T, Hq, Hkv, D, d, inter = 2, 3, 4, 2, 16, 40, 24
    torch.manual_seed(4)
    wqkv = torch.randn((Hq + 2 * Hkv) * D, d) * 0.2
    w13, w_norm = torch.randn(2 * inter, d) * 0.2, torch.randn(d)

    def layer(x, h, cos, sin, kc, vc, pos):
        normed, x = rms_norm(h, w_norm, 1e-6, residual=x)
        q, k, v = (normed @ wqkv.t()).view(B, T, -1, D).split([Hq, Hkv, Hkv], dim=2)
        q = rope_kv_write(q, k, v, cos, sin, kc, vc, 1, pos)
        q = rope_kv_write(q, k, v, cos, sin, kc, vc, 2, pos + 1)
        return q, x, gated_act(normed @ w13.t(), "gelu_pytorch_tanh")

    x, h = torch.randn(B, T, d), torch.randn(B, T, d)
    angles = torch.rand(B, T, D // 2) * 9
    pos = torch.tensor([[4, 1, 2], [0, 5, 6]])
    caches = [torch.full((4, B, 8, Hkv, D), float("nan")) for _ in range(4)]
    eager = layer(x, h, angles.cos(), angles.sin(), caches[0], caches[1], pos)
    compiled = torch.compile(layer, fullgraph=True)
    got, codes = run_and_get_code(compiled, x, h, angles.cos(), angles.sin(), caches[2], caches[3],
                                  pos)  # fmt: skip
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(caches[2:], caches[:2], strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=1e-5, rtol=1e-5)
    code = "\n".join(codes)
    assert code.count("torch.ops.medusa_kernels.rope_kv_write.default(") == 2
    assert "copy_" not in code and "clone" not in code, code
    assert f"empty_strided_cpu((4, {B}, 8, {Hkv}, {D})" not in code, code  # no cache-sized buffer


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_captures_the_fused_ops_and_they_match_the_reference():
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, T, Hq, Hkv, D, d, inter = 2, 5, 32, 8, 128, 4096, 11008
    torch.manual_seed(5)
    q, k, v, cos, sin, kc, vc, pos = (
        t.to(dev) for t in _rope_inputs(B, T, Hq, Hkv, D, D, dt, S=64, NL=2))
    x, r = torch.randn(B, T, d, device=dev, dtype=dt), torch.randn(B, T, d, device=dev, dtype=dt)
    w, gate_up = torch.randn(d, device=dev, dtype=dt), torch.randn(B, T, 2 * inter, device=dev,
                                                                    dtype=dt)  # fmt: skip

    def step():
        return (rms_norm(x, w, 1e-6, residual=r), rope_kv_write(q, k, v, cos, sin, kc, vc, 1, pos),
                gated_act(gate_up, "silu"))  # fmt: skip

    step()  # compile and load the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (out, h), q_out, act = step()
    kc.fill_(float("nan")), vc.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    kcs, vcs = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    same = rms_norm_ref(x, w, 1e-6, r)
    assert_near(out.cpu(), rms_norm_ref(*f64(x, w), 1e-6, r.double())[0].cpu(), same[0].cpu())
    assert torch.equal(h, same[1])
    q_same = rope_kv_write_ref(q, k, v, cos, sin, kcs, vcs, 1, pos)
    kc64, vc64 = kc.double().fill_(float("nan")), vc.double().fill_(float("nan"))
    q64 = rope_kv_write_ref(*f64(q, k, v), cos, sin, kc64, vc64, 1, pos)
    assert_near(q_out.cpu(), q64.cpu(), q_same.cpu(), "q")
    assert torch.equal(kc.isnan(), kc64.isnan()) and torch.equal(vc.nan_to_num(), vcs.nan_to_num())
    m = ~kc64.isnan()
    assert_near(kc[m].cpu(), kc64[m].cpu(), kcs[m].cpu(), "k_cache")
    assert_near(act.cpu(), gated_act_ref(gate_up.double(), "silu").cpu(),
                gated_act_ref(gate_up, "silu").cpu(), "act")  # fmt: skip


# ------------------------------------------------------------------------- custom ops and autograd


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ops_pass_opcheck(backend):
    """The registered ops (what torch.compile traces): schema with the declared mutations
    (k_cache, v_cache and nothing else), fake tensors, AOT dispatch; the same values as eager."""
    torch.manual_seed(6)
    x, r, w = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)
    q, k, v, cos, sin, kc, vc, pos = _rope_inputs(2, 3, 4, 2, 16, 8, torch.float32, S=6)
    kc.normal_(), vc.normal_()  # opcheck compares caches across runs: no NaN
    gate_up = torch.randn(2, 3, 10)
    ops = torch.ops.medusa_kernels
    cases = [
        (ops.rms_norm, (x, w, 1e-6, True, backend), rms_norm(x, w, 1e-6, unit_offset=True)),
        (ops.add_rms_norm, (x, w, r, 1e-6, False, backend), rms_norm(x, w, 1e-6, residual=r)),
        (ops.gated_act, (gate_up, "gelu", backend), gated_act(gate_up, "gelu")),
        (ops.rope_kv_write, (q, k, v, cos, sin, kc, vc, 1, pos, w[:16], None, 1e-6, False,
                             backend), None),  # fmt: skip
    ]
    # AOT dispatch traces the fake implementation, the same for both backends: once
    utils = ("test_schema", "test_faketensor") + (("test_aot_dispatch_dynamic",)
                                                  if backend == "torch" else ())  # fmt: skip
    for op, args, want in cases:
        torch.library.opcheck(op, args, test_utils=utils)
        if want is not None:
            got = op(*args)
            for a, b in zip(got if isinstance(got, tuple) else (got,),
                            want if isinstance(want, tuple) else (want,), strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    kc2, vc2 = kc.clone(), vc.clone()
    want = rope_kv_write(q, k, v, cos, sin, kc2, vc2, 1, pos, q_norm_weight=w[:16])
    torch.testing.assert_close(ops.rope_kv_write(*cases[3][1]), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kc2, atol=1e-5, rtol=1e-5)


def test_autograd_flows_through_the_reference_and_triton_refuses_it():
    """Medusa-2 trains the backbone: with inputs that require grad "auto" takes the reference
    (which differentiates); "triton" (no backward) raises."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    out, h = rms_norm(x, w, 1e-6, residual=x.detach() * 2)
    gated_act(torch.cat([out, h], -1), "silu").sum().backward()
    assert x.grad is not None and w.grad is not None and x.grad.abs().sum() > 0
    q, k, v, cos, sin, kc, vc, pos = _rope_inputs(1, 2, 4, 2, 16, 16, torch.float32, S=5)
    q = q.detach().requires_grad_()
    rope_kv_write(q, k, v, cos, sin, kc, vc, 0, pos).square().sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="backward"):
        rms_norm(x, w, 1e-6, backend="triton")
    with pytest.raises(RuntimeError, match="backward"):
        gated_act(x, "silu", backend="triton")
    with torch.no_grad():
        assert rms_norm(x, w, 1e-6, backend="triton").shape == x.shape
