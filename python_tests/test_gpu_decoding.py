"""On the GPU: CUDA-graph steps give the same tokens as eager steps and as plain greedy, with at
most one host sync per step."""

import warnings

import pytest
import torch
from conftest import requires_cuda
from tiny_models import VOCAB, make_hf_model, save_random_heads

from medusa_kernels import generate, load_model

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


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_at_most_one_host_sync_per_step(dirs, cuda_graph):
    model = load_model(*dirs, dtype=torch.bfloat16, device="cuda")
    generate(model, prompts(), 8, cuda_graph=cuda_graph)  # warm up the kernels
    stream = generate(model, prompts(), 32, stream=True, cuda_graph=cuda_graph)
    next(iter(stream))  # prefill (its sync is outside the steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in stream:
                pass
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    steps = stream.result.steps
    assert steps > 0 and len(syncs) <= steps + 1  # one per step; + one when a sequence ends
