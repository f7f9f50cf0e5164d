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
