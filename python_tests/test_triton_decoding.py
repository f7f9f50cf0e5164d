"""The whole Medusa loop with every Triton kernel in it (tree attention, heads top-k, lm_head
top-1, greedy acceptance, KV compaction) is still lossless: on the CPU the kernels run in the
interpreter, with "auto" steered to Triton (it picks the PyTorch references on the CPU)."""

import importlib

import pytest
import torch
from conftest import HAS_CUDA
from test_generate import oracle, prompts
from tiny_models import make_hf_model, save_random_heads

from medusa_kernels import generate, load_model
from medusa_kernels.ops import _backend

TABLES = {  # op: (its module, its backend table)
    "tree_attention": ("tree_attention", "_IMPLS"),
    "medusa_heads_topk": ("heads_topk", "_IMPLS"),
    "lm_head_topk": ("heads_topk", "_LM_IMPLS"),
    "accept_greedy": ("acceptance", "_GREEDY_IMPLS"),
    "compact_kv_cache": ("compact_kv", "_IMPLS"),
}

pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or _backend.triton_interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"
)


@pytest.fixture
def triton_calls(monkeypatch):
    """Route "auto" to Triton for every op and count each op's Triton calls."""
    pick = _backend.pick_backend

    def prefer_triton(op, backend, device, impls, auto_order=("triton", "torch"), **kwargs):
        if backend == "auto" and "triton" in impls and kwargs.get("triton_ok", True):
            return "triton"
        return pick(op, backend, device, impls, auto_order, **kwargs)

    calls = dict.fromkeys(TABLES, 0)
    for op, (module_name, table_name) in TABLES.items():
        module = importlib.import_module(f"medusa_kernels.ops.{module_name}")
        monkeypatch.setattr(module, "pick_backend", prefer_triton)
        table = getattr(module, table_name)

        def counted(*args, _launch=table["triton"], _op=op, **kwargs):
            calls[_op] += 1
            return _launch(*args, **kwargs)

        monkeypatch.setitem(table, "triton", counted)
    return calls


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base, heads = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("heads")
    make_hf_model("llama-gqa-llama3rope", seed=3, path=base, hidden=256)  # head dim 64
    save_random_heads(heads, d=256, seed=3)
    device = "cuda" if HAS_CUDA else "cpu"
    # fp16: "auto" sends fp32 attention to the reference (Triton fp32 is for tests only)
    return load_model(base, medusa=heads, dtype=torch.float16, device=device)


def test_medusa_with_triton_kernels_equals_plain_greedy(model, triton_calls):
    ids = prompts(2, seed=4)
    plain = generate(model, ids, max_new_tokens=10, medusa=False)
    assert triton_calls["tree_attention"] > 0 and triton_calls["lm_head_topk"] > 0
    heads = generate(model, ids, max_new_tokens=10, medusa=True, tree="small_15")
    assert heads.tokens == plain.tokens
    longer = generate(model, ids, max_new_tokens=16, medusa=False)
    forced = generate(model, ids, max_new_tokens=10, medusa=True, tree="small_15",
                      propose=oracle(longer.tokens))
    assert forced.tokens == plain.tokens
    assert max(max(step) for step in forced.accepted_per_step) > 2  # compaction moved paths
    assert all(n > 0 for n in triton_calls.values()), triton_calls
