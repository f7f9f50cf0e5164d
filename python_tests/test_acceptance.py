"""Greedy acceptance: the Triton kernel (CPU interpreter here) against the torch reference,
exactly, on random trees/logits built without argmax ties and on hand-made cases."""

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda

from medusa_kernels import accept_greedy, accept_greedy_ids, accept_typical, build_tree
from medusa_kernels.ops import acceptance
from medusa_kernels.ops.acceptance import accept_greedy_ids_ref, accept_greedy_ids_triton
from medusa_kernels.tree import TREES

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def parents(retrieve_indices: torch.Tensor, T: int) -> list[int]:
    par = [-1] * T
    for row in retrieve_indices.tolist():
        for a, b in zip(row, row[1:], strict=False):
            if b >= 0:
                par[b] = a
    return par


def random_case(tree, B, V, p_agree, seed, device=DEV, index_dtype=torch.long):
    """Tree tokens that agree with the base model's (unique) argmax with probability p_agree."""
    g = torch.Generator().manual_seed(seed)
    ri = tree.retrieve_indices
    T = int(tree.tree_mask.shape[0])
    par = parents(ri, T)
    pred = torch.randint(0, V, (B, T), generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    agree = torch.rand(B, T, generator=g) < p_agree
    for u in range(1, T):
        tokens[:, u] = torch.where(agree[:, u], pred[:, par[u]], tokens[:, u])
    logits = torch.randn(B, T, V, generator=g)
    logits.scatter_(2, pred[..., None], 10.0)  # a unique argmax at pred
    return (logits.to(device), tokens.to(index_dtype).to(device), ri.to(index_dtype).to(device),
            pred.to(device))


def assert_same(got, want):
    for name, a, b in zip(("accept_lengths", "accept_indices", "next_tokens"), got, want,
                          strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"


@pytest.mark.parametrize("tree_name", ["mc_sim_7b_63", "small_15", "chain_4", "wide_8",
                                       "root_only"])
@pytest.mark.parametrize("p_agree", [0.0, 0.6, 0.95, 1.0])
def test_kernel_matches_torch_on_random_trees(tree_name, p_agree):
    tree = build_tree(TREES[tree_name])
    logits, tokens, ri, pred = random_case(tree, 5, 37, p_agree, seed=len(tree_name))
    want = accept_greedy(logits, tokens, ri, backend="torch")
    assert_same(accept_greedy_ids_triton(pred, tokens, ri), want)
    if DEV.type == "cuda" or p_agree == 0.6:
        assert_same(accept_greedy(logits, tokens, ri, backend="triton"), want)
    for backend in ("torch", "triton"):
        assert_same(accept_greedy_ids(pred, tokens, ri, backend=backend), want)
    if p_agree == 1.0:  # every path fully accepted: the first longest one wins
        depth = int((ri >= 0).sum(1).max())
        assert want[0].tolist() == [depth] * 5


def test_int32_indices_and_odd_path_count():
    tree = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])  # P = 4, A = 4
    logits, tokens, ri, pred = random_case(tree, 3, 11, 0.8, seed=5, index_dtype=torch.int32)
    assert_same(accept_greedy_ids_triton(pred, tokens, ri), accept_greedy_ids_ref(pred, tokens, ri))


CHAIN = build_tree([[0], [0, 0]])  # nodes 0 -> 1 -> 2


@pytest.mark.parametrize(
    "tokens,length,nxt",
    [([0, 3, 1], 3, 2), ([0, 3, 2], 2, 1), ([0, 2, 1], 1, 3), ([0, 0, 0], 1, 3)],
)
def test_hand_made_chain(tokens, length, nxt):
    # argmax after node 0 is 3, after node 1 is 1, after node 2 is 2
    logits = torch.full((1, 3, 4), -1.0)
    logits[0, 0, 3] = logits[0, 1, 1] = logits[0, 2, 2] = 5.0
    args = (logits.to(DEV), torch.tensor([tokens], device=DEV), CHAIN.retrieve_indices.to(DEV))
    got = accept_greedy(*args, backend="triton")
    assert_same(got, accept_greedy(*args, backend="torch"))
    assert got[0].tolist() == [length] and got[2].tolist() == [nxt]
    assert got[1].tolist() == [[0, 1, 2]]


def test_first_of_equally_long_paths_and_short_path_padding():
    wide = build_tree([[0], [1], [1, 0]])  # paths [0, 1, -1] and [0, 2, 3]
    logits = torch.full((2, 4, 5), -1.0)
    logits[:, 0, 4] = 5.0  # both depth-1 children must be token 4
    logits[:, 2, 0] = logits[:, 1, 0] = logits[:, 3, 0] = 5.0
    tokens = torch.tensor([[0, 4, 4, 1], [0, 4, 4, 0]])
    args = (logits.to(DEV), tokens.to(DEV), wide.retrieve_indices.to(DEV))
    got = accept_greedy(*args, backend="triton")
    assert_same(got, accept_greedy(*args, backend="torch"))
    assert got[0].tolist() == [2, 3]
    assert got[1].tolist() == [[0, 1, -1], [0, 2, 3]]  # the first longest path, -1 padded


def test_typical_backends():
    tree = build_tree(TREES["small_15"])
    logits, tokens, ri, _ = random_case(tree, 2, 13, 0.7, seed=2)
    assert_same(accept_typical(logits, tokens, ri, 0.0, backend="triton"),
                accept_greedy(logits, tokens, ri, backend="torch"))
    with pytest.raises(RuntimeError, match="accept_typical: backend 'triton' is not implemented"):
        accept_typical(logits, tokens, ri, 0.7, backend="triton")
    accept_typical(logits, tokens, ri, 0.7, backend="auto")


def test_bad_input():
    tree = build_tree(TREES["chain_4"])
    logits, tokens, ri, _ = random_case(tree, 2, 13, 0.7, seed=2, device="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        accept_greedy(logits, tokens, ri, backend="fast")
    with pytest.raises(ValueError, match="tree_tokens must be"):
        accept_greedy(logits, tokens[:, :2], ri, backend="triton")
    with pytest.raises(ValueError, match="retrieve_indices must have at least one row"):
        accept_greedy(logits, tokens, ri[:0], backend="triton")


@requires_cuda
def test_gpu_auto_is_triton_and_graph_capturable(monkeypatch):
    calls = []
    greedy = lambda *a: calls.append(1) or accept_greedy_ids_triton(*a)
    monkeypatch.setitem(acceptance._GREEDY_IMPLS, "triton", greedy)
    tree = build_tree(TREES["mc_sim_7b_63"])
    logits, tokens, ri, _ = random_case(tree, 4, 32000, 0.7, seed=9)
    want = accept_greedy(logits, tokens, ri, backend="torch")
    accept_greedy(logits, tokens, ri)  # compile outside the capture
    assert calls == [1], "auto did not take the Triton kernel on CUDA"
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            got = accept_greedy(logits, tokens, ri, backend="auto")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    assert_same(got, want)


def test_accept_greedy_ids_checks_its_arguments():
    tree = build_tree(TREES["chain_4"])
    logits, tokens, ri, pred = random_case(tree, 2, 11, 0.5, seed=1)
    with pytest.raises(ValueError, match="tree_pred"):
        accept_greedy_ids(logits, tokens, ri)  # logits, not ids
    with pytest.raises(ValueError, match="tree_tokens"):
        accept_greedy_ids(pred, tokens[:1], ri)


# ------------------------------------- issue 18: output dtypes, tree checks, unchecked clamps

GREEDY_BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", GREEDY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_output_dtypes_whatever_the_input_ints(backend, dtype):
    """accept_greedy_ids returned an int32 next token for int32 predictions on torch."""
    tree = build_tree(TREES["small_15"])
    logits, tokens, ri, pred = random_case(tree, 3, 19, 0.7, seed=3, index_dtype=dtype)
    for got in (accept_greedy_ids(pred.to(dtype), tokens, ri, backend=backend),
                accept_greedy(logits, tokens, ri, backend=backend),
                accept_typical(logits, tokens, ri, 0.0, backend=backend)):
        assert [t.dtype for t in got] == [torch.int32, torch.int64, torch.int64]
    got = accept_typical(logits, tokens, ri, 0.8)
    assert [t.dtype for t in got] == [torch.int32, torch.int64, torch.int64]


CHAIN4 = build_tree(TREES["chain_4"]).retrieve_indices  # [[0, 1, 2, 3, 4]], T = 5
BAD_TREES = [
    pytest.param([[0, 1, 5, -1, -1]], r"retrieve_indices\[0, 2\] = 5 must be a node index in "
                 r"\[0, T = 5\)", id="node-past-T"),
    pytest.param([[0, 1, -2, -1, -1]], r"retrieve_indices\[0, 2\] = -2", id="node-below-minus1"),
    pytest.param([[0, 1, 2**40, -1, -1]], r"retrieve_indices\[0, 2\] = 1099511627776",
                 id="node-huge"),
    pytest.param([[1, 2, 3, -1, -1]], r"retrieve_indices\[0, 0\] = 1 must be 0", id="no-root"),
    pytest.param([[0, 1, 2, 3, 4], [-1] * 5], r"retrieve_indices\[1, 0\] = -1 must be 0",
                 id="row-of-minus1"),
    pytest.param([[0] * 5], r"retrieve_indices\[0, 1\] = 0 must be > retrieve_indices\[0, 0\]",
                 id="row-of-zeros"),
    pytest.param([[0, -1, 2, -1, -1]], r"retrieve_indices\[0, 2\] = 2 follows -1 padding",
                 id="inner-padding"),
    pytest.param([[0, 2, 1, -1, -1]], r"retrieve_indices\[0, 2\] = 1 must be > ", id="decreasing"),
]


def _chain_case(B=2, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, 5, V, generator=g)
    tokens = logits.argmax(-1).roll(1, dims=1)  # every chain step agrees: full acceptance
    return logits, tokens


@pytest.mark.parametrize("ri,match", BAD_TREES)
def test_retrieve_indices_are_checked(ri, match):
    logits, tokens = _chain_case()
    ri = torch.tensor(ri)
    calls = [
        lambda: accept_greedy(logits, tokens, ri, backend="torch"),
        lambda: accept_greedy_ids(logits.argmax(-1), tokens, ri, backend="triton"),
        lambda: accept_typical(logits, tokens, ri, 0.7),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


def test_tokens_are_checked():
    logits, tokens = _chain_case(V=7)
    for bad, match in ((7, r"tree_tokens\[1, 3\] = 7 must be a token id in \[0, V = 7\)"),
                       (-1, r"tree_tokens\[1, 3\] = -1 must be a token id")):
        t = tokens.clone()
        t[1, 3] = bad
        with pytest.raises(ValueError, match=match):
            accept_typical(logits, t, CHAIN4, 0.7)
        with pytest.raises(ValueError, match=match):
            accept_greedy(logits, t, CHAIN4)
    pred = logits.argmax(-1)
    pred[0, 2] = -3
    with pytest.raises(ValueError, match=r"tree_pred\[0, 2\] = -3 must be a token id >= 0"):
        accept_greedy_ids(pred, tokens, CHAIN4)


@pytest.mark.parametrize("ri,match", BAD_TREES)
def test_unchecked_backends_agree_and_stay_in_bounds(monkeypatch, ri, match):
    """Without value checks (CUDA without MEDUSA_KERNELS_CHECKS): a step to a node outside
    [0, T) is never taken, node indices are clamped where read, torch and Triton agree."""
    monkeypatch.setattr(acceptance, "check_values", lambda device: False)
    logits, tokens = _chain_case(B=3)
    ri = torch.tensor(ri).to(DEV)
    logits, tokens = logits.to(DEV), tokens.to(DEV)
    pred = logits.argmax(-1)
    want = accept_greedy_ids(pred, tokens, ri, backend="torch")
    assert_same(accept_greedy_ids(pred, tokens, ri, backend="triton"), want)
    if ri.abs().max() < 2**31:
        assert_same(accept_greedy_ids(pred, tokens, ri.int(), backend="triton"), want)
    lengths, path, nxt = want
    T = tokens.shape[1]
    for b in range(3):  # the accepted steps are nodes in [0, T) (garbage trees: any of them)
        taken = path[b, 1 : int(lengths[b])]
        assert ((taken >= 0) & (taken < T)).all(), path[b]
    assert ((nxt >= 0) & (nxt < logits.shape[-1])).all()
    lengths, _, nxt = accept_typical(logits, tokens, ri, 0.7)  # no IndexError, no NaN
    assert (lengths >= 1).all() and (nxt >= 0).all() and (nxt < logits.shape[-1]).all()


def test_unchecked_typical_rejects_out_of_vocabulary_tokens(monkeypatch):
    monkeypatch.setattr(acceptance, "check_values", lambda device: False)
    logits, tokens = _chain_case(B=2, V=7)
    want, _, _ = accept_typical(logits, tokens, CHAIN4, 0.5)
    tokens[:, 2] = torch.tensor([7, -5])  # step 2 of the chain leaves the vocabulary
    got, _, _ = accept_typical(logits, tokens, CHAIN4, 0.5)
    assert (got <= 2).all() and (got == torch.clamp(want, max=2)).all()


@pytest.mark.parametrize("backend", GREEDY_BACKENDS)
def test_empty_batch_and_one_node_tree(backend):
    root = build_tree(TREES["root_only"]).retrieve_indices
    for B, ri in ((0, CHAIN4), (3, root)):
        T = int(ri.max()) + 1
        logits = torch.randn(B, T, 6)
        tokens = torch.randint(0, 6, (B, T))
        got = accept_greedy(logits.to(DEV), tokens.to(DEV), ri.to(DEV), backend=backend)
        assert_same([t.cpu() for t in got], accept_greedy(logits, tokens, ri, backend="torch"))
        assert got[0].tolist() == [1] * B and got[2].cpu().tolist() == logits[:, 0].argmax(-1).tolist()
        typ = accept_typical(logits, tokens, ri, 0.9)
        assert typ[0].tolist() == [1] * B and typ[1].shape == (B, ri.shape[1])


@pytest.mark.parametrize("backend", GREEDY_BACKENDS)
def test_no_tree_columns_or_nodes_is_refused_on_every_backend(backend):
    logits, tokens = _chain_case()
    with pytest.raises(ValueError, match="retrieve_indices must have at least one column"):
        accept_greedy(logits, tokens, torch.zeros(1, 0, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="tree_pred must hold T >= 1"):
        accept_greedy_ids(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
                          CHAIN4, backend=backend)
    with pytest.raises(ValueError, match="tree_logits must be \\[B, T, V\\] with V >= 1"):
        accept_typical(torch.zeros(2, 5, 0), tokens, CHAIN4, 0.5, backend=backend)
