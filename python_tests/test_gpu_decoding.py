"""On the GPU: CUDA-graph steps give the same tokens as eager steps and as plain greedy, with at
most one host sync per step (plus one upload of the running mask when a sequence ends)."""

import importlib
import warnings

import pytest
import torch
from conftest import requires_cuda
from tiny_models import VOCAB, make_hf_model, save_random_heads

from medusa_kernels import generate, load_model

ta = importlib.import_module("medusa_kernels.ops.tree_attention")  # the module, not the op
pytestmark = requires_cuda


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base, heads = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("heads")
    make_hf_model("llama-gqa-llama3rope", path=base)
    save_random_heads(heads)
    return base, heads


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 2)]


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "chain_4", "root_only"])
def test_graphs_on_equal_graphs_off_equal_plain_fp32(dirs, tree):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(*dirs, dtype=torch.float32, device="cuda")
    plain = generate(model, prompts(), 24, medusa=False, cuda_graph=False)
    plain_graph = generate(model, prompts(), 24, medusa=False, cuda_graph=True)
    eager = generate(model, prompts(), 24, tree=tree, cuda_graph=False)
    graph = generate(model, prompts(), 24, tree=tree, cuda_graph=True)
    assert plain.tokens == plain_graph.tokens == eager.tokens == graph.tokens


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graphs_on_equal_graphs_off_half(dirs, dtype):
    model = load_model(*dirs, dtype=dtype, device="cuda")
    eager = generate(model, prompts(), 24, cuda_graph=False)
    graph = generate(model, prompts(), 24, cuda_graph=True)
    assert eager.tokens == graph.tokens


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_at_most_one_host_sync_per_step(dirs, cuda_graph, temperature):
    model = load_model(*dirs, dtype=torch.bfloat16, device="cuda")
    kw = dict(cuda_graph=cuda_graph, temperature=temperature, seed=1)
    generate(model, prompts(), 8, **kw)  # warm up the kernels
    stream = generate(model, prompts(), 32, stream=True, **kw)
    steps_iter = iter(stream)
    next(steps_iter)  # prefill (its syncs are outside the steps)
    next(steps_iter)  # the first step; with cuda_graph it also captures the graph
    first = stream.result.steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in steps_iter:
                pass
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    steps = stream.result.steps - first
    # one per step (the new tokens), plus one upload of the running mask before each step where
    # the set of finished sequences has changed (count 0: finished before that step)
    rows = stream.result.accepted_per_step[first - 1 :]
    uploads = len({tuple(n == 0 for n in row) for row in rows}) - 1
    assert steps > 0 and len(syncs) <= steps + uploads, (len(syncs), steps, uploads)


@pytest.fixture(scope="module")
def dirs_d64(tmp_path_factory):
    """hidden 256, 4 heads: head dim 64, which "auto" runs with the Triton tree attention."""
    base, heads = tmp_path_factory.mktemp("base_d64"), tmp_path_factory.mktemp("heads_d64")
    make_hf_model("llama-gqa-llama3rope", path=base, hidden=256)
    save_random_heads(heads, d=256)
    return base, heads


def test_triton_tree_attention_in_graphs(dirs_d64, monkeypatch):
    """The Triton tree attention inside captured decode steps (bf16, the default on CUDA)."""
    calls = []
    triton_impl = ta._IMPLS["triton"]
    monkeypatch.setitem(
        ta._IMPLS, "triton", lambda *a, **kw: calls.append(1) or triton_impl(*a, **kw)
    )
    model = load_model(*dirs_d64, dtype=torch.bfloat16, device="cuda")
    eager = generate(model, prompts(), 24, cuda_graph=False)
    assert calls, "auto did not take the Triton tree attention"
    graph = generate(model, prompts(), 24, cuda_graph=True)
    plain_eager = generate(model, prompts(), 24, medusa=False, cuda_graph=False)
    plain_graph = generate(model, prompts(), 24, medusa=False, cuda_graph=True)
    assert eager.tokens == graph.tokens
    assert plain_eager.tokens == plain_graph.tokens


@pytest.mark.parametrize("medusa", [False, True])
def test_sampling_in_graphs_reproducible_and_fresh_each_step(dirs, medusa):
    """Sampling steps (plain, and Medusa with typical acceptance) replayed from CUDA graphs: a
    seed reproduces the run, another seed changes it, and every replay draws fresh random
    numbers (numbers baked into the graph at capture would pick the same few tokens)."""
    model = load_model(*dirs, dtype=torch.bfloat16, device="cuda")
    kw = dict(max_new_tokens=32, medusa=medusa, temperature=1.0, cuda_graph=True)
    a = generate(model, prompts(), seed=5, **kw)
    assert a.tokens == generate(model, prompts(), seed=5, **kw).tokens
    assert a.tokens != generate(model, prompts(), seed=6, **kw).tokens
    unseeded = generate(model, prompts(), seed=None, **kw)  # the default generator
    for run in (a, unseeded):
        for toks in run.tokens:
            assert len(toks) == 32 and all(0 <= t < VOCAB for t in toks)
            if not medusa:  # random weights, 101 tokens: ~27 distinct in 32 fresh draws
                assert len(set(toks)) >= 16, toks
    assert all(max(step) >= 1 for step in a.accepted_per_step)  # 0: a finished sequence
