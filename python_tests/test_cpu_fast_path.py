"""The CPU's eager path of the decoder (``model.CPU_FAST_PATH``: plain PyTorch calls in place of
the fused ops' custom ops, SDPA for the tree attention), which ``generate`` takes on a CPU: the
family tests of test_families.py (logits at every position and greedy tokens against
transformers, Medusa equal to plain greedy) run again with it forced on (the interpreter the
suite runs under otherwise keeps it off), and it computes what the ops' path computes."""

import pytest
import torch
from test_families import (  # noqa: F401 (the fixture and the tests, rerun here)
    fam,
    test_greedy_equals_transformers_argmax_loop,
    test_logits_at_every_position,
    test_medusa_equals_plain_greedy,
)
from test_launch_budget import hf_family_model

from medusa_kernels import model as model_module
from medusa_kernels.decoding import medusa_step, plain_step
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


def test_column_major_layout_switches_and_restores(monkeypatch):
    """The fast path stores q|k|v, o, gate|up and the (tied) lm_head column-major (same values,
    the down projection untouched), the ops' path gets them row-major back, and so does a
    cast; the tokens do not change across the switches."""
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
