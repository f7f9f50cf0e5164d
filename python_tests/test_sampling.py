"""Exact sampling: the warpers against transformers', accept_exact against the base model's own
sequential sampling (exactly, by enumerating the uniforms' cells, and statistically, chi-square
over 20000 seeded runs; typical acceptance fails the same test), and the Triton walk against
the torch reference given the same uniforms."""

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda
from sampling_stats import chi2_sf, chi_square_p, hf_filter

from medusa_kernels import build_tree
from medusa_kernels.ops import accept_greedy_ids, accept_typical
from medusa_kernels.ops.sampling import (
    _tree_samples,
    accept_exact,
    accept_exact_ids,
    filter_logits,
    sample_logits,
    sampling_probs,
)
from medusa_kernels.tree import TREES

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
NEG = float("-inf")


def test_chi2_sf_against_known_values():
    assert abs(chi2_sf(3.841458820694124, 1) - 0.05) < 1e-9  # the 95% quantile of chi2(1)
    assert abs(chi2_sf(23.209251158954356, 10) - 0.01) < 1e-9  # the 99% quantile of chi2(10)
    for x in (0.5, 4.0, 30.0):  # chi2(2) is Exp(1/2): P(X > x) = exp(-x / 2)
        assert abs(chi2_sf(x, 2) - torch.exp(torch.tensor(-x / 2, dtype=torch.float64))) < 1e-12


# ---------------------------------------------------------------------------------------------
# A toy base model over V tokens whose next-token logits depend on the last two tokens, and toy
# Medusa heads: head d ranks the tokens by the base model's log-probabilities d + 1 steps along
# its greedy continuation, plus noise (head 0 often right, head 2 often wrong).

V = 10
TREE = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]])  # T 9, A 4
PARENT = [-1, 0, 0, 0, 1, 1, 2, 4, 5]
assert all(TREE.tree_mask[u, PARENT[u]] and TREE.depths[u] == TREE.depths[PARENT[u]] + 1
           for u in range(1, TREE.num_nodes))
A = TREE.retrieve_indices.shape[1]


class ToyWorld:
    def __init__(self, seed=0, noise=(0.3, 0.6, 1.5)):
        g = torch.Generator().manual_seed(seed)
        self.base = 2.0 * torch.randn(V, V, V, generator=g)  # logits after (..., a, c)
        a, c = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
        state, ranks = (a, c), []
        for sigma in noise:
            logp = self.base[state].log_softmax(-1)  # [V, V, V]
            ranks.append((logp + sigma * torch.randn(V, V, V, generator=g)).argsort(-1, True))
            state = (state[1], logp.argmax(-1))  # one step along the greedy continuation
        self.ranks = torch.stack(ranks, 2)  # [V, V, K, V]: head d's ranking at state (a, c)
        assert TREE.depth <= len(noise) and TREE.topk <= V

    def tree(self, a, c, duplicate=False):
        """Tree tokens [B, T] and tree logits [B, T, V] for states (a, c) [B] (c is the root)."""
        tokens = TREE.candidates(c, self.ranks[a, c])
        if duplicate:  # node 2 (rank 1 of head 0) repeats node 1's token
            tokens[:, 2] = tokens[:, 1]
        parent_tok = torch.cat([a[:, None], tokens[:, PARENT[1:]]], 1)
        return tokens, self.base[parent_tok, tokens]

    def law(self, temperature, top_k=None, top_p=None):
        """Q [V, V, V] float64: transformers' sampling distribution after (a, c)."""
        scores = hf_filter(self.base.reshape(-1, V), temperature, top_k, top_p)
        return scores.double().softmax(-1).reshape(V, V, V)

    def continuation_law(self, a, c, q):
        """P[y1, y2, y3] of sequential sampling after (a, c), by enumeration."""
        return torch.einsum("i,ij,ijk->ijk", q[a, c], q[c], q)


def append(out, count, new, length):
    """Write new[b, :length[b]] at out[b, count[b]:]."""
    cols = count[:, None] + torch.arange(new.shape[1])
    ok = (torch.arange(new.shape[1]) < length[:, None]) & (cols < out.shape[1])
    rows = torch.arange(out.shape[0])[:, None].expand_as(cols)
    out[rows[ok], cols[ok]] = new[ok]
    return count + length


def run_speculative(world, a0, c0, n, accept, duplicate=False):
    """n sequences from state (a0, c0), decoding until each has >= 3 new tokens -> [n, 3]."""
    a, c = torch.full((n,), a0), torch.full((n,), c0)
    out, count = torch.full((n, 3 + A), -1), torch.zeros(n, dtype=torch.long)
    while int(count.min()) < 3:
        tokens, logits = world.tree(a, c, duplicate)
        lengths, path, nxt = accept(logits, tokens, TREE.retrieve_indices)
        lengths = lengths.long()
        path_tok = tokens.gather(1, path.clamp(min=0))  # [n, A]
        new = torch.cat([path_tok[:, 1:], nxt[:, None]], 1)
        new.scatter_(1, (lengths - 1)[:, None], nxt[:, None])  # accepted children, then next
        count = append(out, count, new, lengths)
        a, c = path_tok.gather(1, (lengths - 1)[:, None]).squeeze(1), nxt
    return out[:, :3]


def run_plain(world, a0, c0, n, temperature, top_k, top_p, generator):
    seq = [torch.full((n,), a0), torch.full((n,), c0)]
    for _ in range(3):
        logits = world.base[seq[-2], seq[-1]]
        seq.append(sample_logits(logits, temperature, top_k, top_p, generator))
    return torch.stack(seq[2:], 1)


PARAMS = [
    pytest.param(0.8, None, None, id="t0.8"),
    pytest.param(1.0, 3, None, id="t1-k3"),
    pytest.param(0.7, None, 0.8, id="t0.7-p0.8"),
    pytest.param(1.2, 5, 0.9, id="t1.2-k5-p0.9"),
]
N = 20000


@pytest.mark.parametrize("temperature,top_k,top_p", PARAMS)
def test_exact_law_by_enumerating_uniform_cells(temperature, top_k, top_p):
    """accept_exact is a function of the uniforms, constant on the cells cut by every node's
    CDF breakpoints at each depth: evaluating it at each cell's midpoint, weighting by the
    cell's volume, and finishing short outputs with the base model's own sampling gives the
    exact law of the first 3 tokens; it is sequential sampling's law, to fp32 rounding."""
    world, (a0, c0) = ToyWorld(1), (3, 7)
    tokens, logits = world.tree(torch.tensor([a0]), torch.tensor([c0]))
    probs = sampling_probs(logits[0], temperature, top_k, top_p).double()  # [T, V]
    axes, widths = [], []
    for d in range(3):  # the draws that decide y1, y2, y3
        rows = probs[TREE.depths == d]
        cdf = rows.cumsum(-1) / rows.sum(-1, keepdim=True)
        cuts = torch.unique(torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64),
                                       cdf.flatten().clamp(0, 1)]))
        axes.append((cuts[1:] + cuts[:-1]) / 2)
        widths.append(cuts[1:] - cuts[:-1])
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    vol = torch.stack(torch.meshgrid(*widths, indexing="ij"), -1).reshape(-1, 3).prod(-1)
    n = grid.shape[0]
    uniforms = torch.cat([grid, torch.full((n, A - 3), 0.5, dtype=torch.float64)], 1)
    lengths, path, nxt = accept_exact(logits.expand(n, -1, -1), tokens.expand(n, -1),
                                      TREE.retrieve_indices, temperature, top_k, top_p,
                                      uniforms=uniforms.float())
    q = world.law(temperature, top_k, top_p)
    seq = tokens[0][path.clamp(min=0)]
    seq = torch.cat([seq[:, 1:], nxt[:, None]], 1).scatter(1, (lengths.long() - 1)[:, None],
                                                           nxt[:, None])
    law = torch.zeros(V, V, V, dtype=torch.float64)
    for length in (1, 2, 3, 4):
        m = lengths == length
        y = seq[m]
        if length == 1:  # y2, y3 come from the next steps: sequential sampling
            rest = q[c0, y[:, 0]][:, :, None] * q[y[:, 0]]
            law.index_put_((y[:, 0],), vol[m][:, None, None] * rest, accumulate=True)
        elif length == 2:
            rest = q[y[:, 0], y[:, 1]]
            law.index_put_((y[:, 0], y[:, 1]), vol[m][:, None] * rest, accumulate=True)
        else:
            law.index_put_((y[:, 0], y[:, 1], y[:, 2]), vol[m], accumulate=True)
    want = world.continuation_law(a0, c0, q)
    assert abs(float(law.sum()) - 1) < 1e-9
    assert (law - want).abs().max() < 2e-6, (law - want).abs().max()
    assert bool((lengths >= 3).any()), "the tree never accepts 2 children: the test is weak"


@pytest.mark.parametrize("temperature,top_k,top_p", PARAMS)
def test_exact_sampling_matches_sequential_sampling_statistically(temperature, top_k, top_p):
    world, (a0, c0) = ToyWorld(2), (4, 1)
    want = world.continuation_law(a0, c0, world.law(temperature, top_k, top_p))
    g = torch.Generator().manual_seed(11)
    accept = lambda lg, tok, ri: accept_exact(lg, tok, ri, temperature, top_k, top_p, g)
    got = run_speculative(world, a0, c0, N, accept)
    assert chi_square_p(got[:, :2], want.sum(-1)) > 1e-3
    assert chi_square_p(got, want) > 1e-3
    plain = run_plain(world, a0, c0, N, temperature, top_k, top_p, g)
    assert chi_square_p(plain[:, :2], want.sum(-1)) > 1e-3
    assert chi_square_p(plain, want) > 1e-3


def test_exact_sampling_with_duplicate_children_statistically():
    world, (a0, c0) = ToyWorld(3), (2, 5)
    want = world.continuation_law(a0, c0, world.law(0.9))
    g = torch.Generator().manual_seed(12)
    accept = lambda lg, tok, ri: accept_exact(lg, tok, ri, 0.9, generator=g)
    got = run_speculative(world, a0, c0, N, accept, duplicate=True)
    assert chi_square_p(got, want) > 1e-3


def test_typical_acceptance_fails_the_same_test():
    """The power of the test: typical acceptance (the paper's rule) changes the law."""
    world, (a0, c0) = ToyWorld(2), (4, 1)
    want = world.continuation_law(a0, c0, world.law(0.8))
    g = torch.Generator().manual_seed(11)
    accept = lambda lg, tok, ri: accept_typical(lg, tok, ri, 0.8, generator=g)
    got = run_speculative(world, a0, c0, N, accept)
    assert chi_square_p(got, want) < 1e-6
    assert chi_square_p(got[:, :2], want.sum(-1)) < 1e-6


def test_acceptance_rate_is_substantial():
    """The statistical tests exercise long walks: the heads are often right."""
    world = ToyWorld(2)
    states = torch.arange(V * V).repeat(40)  # every (a, c), 40 times
    tokens, logits = world.tree(states // V, states % V)
    lengths, _, _ = accept_exact(logits, tokens, TREE.retrieve_indices, 0.8,
                                 generator=torch.Generator().manual_seed(0))
    hist = torch.bincount(lengths.long(), minlength=A + 1)[1:] / len(states)
    assert hist[0] < 0.5 and hist[2:].sum() > 0.2 and hist[3] > 0.05, hist  # lengths 1..4


# ---------------------------------------------------------------------------------------------
# The warpers against transformers


@pytest.mark.parametrize("temperature,top_k,top_p,min_keep", [
    (0.7, None, None, 1), (1.0, 5, None, 1), (1.3, 5, None, 3), (0.5, None, 0.9, 1),
    (0.9, 7, 0.6, 2), (2.0, 3, 0.3, 1), (1.0, 40, 0.05, 3), (0.8, 1, None, 1),
    (1.1, None, 1e-6, 1), (0.6, 100, 0.999, 1), (1.0, None, 1.0, 1),
])  # fmt: skip
def test_filter_logits_is_transformers(temperature, top_k, top_p, min_keep):
    g = torch.Generator().manual_seed(int(temperature * 10) + (top_k or 0))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (3 * torch.randn(41, 37, generator=g)).to(dtype)
        x[0, :5] = NEG
        x[1, 3:] = NEG  # three finite logits
        got = filter_logits(x, temperature, top_k, top_p, min_tokens_to_keep=min_keep)
        want = hf_filter(x, temperature, top_k, top_p, min_keep)
        assert got.dtype == torch.float32
        # the same kept scores; the same tokens too unless scores tie at the top-p boundary
        # (fp16/bf16 logits tie; transformers' unstable sort picks among them, ours the lowest)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), dtype
        if dtype == torch.float32:
            assert torch.equal(got, want)
    probs = sampling_probs(x.reshape(1, 41, 37), temperature, top_k, top_p,
                           min_tokens_to_keep=min_keep)
    assert probs.shape == (1, 41, 37) and torch.allclose(probs.sum(-1), torch.ones(1, 41))


def test_top_k_keeps_every_tie_at_the_boundary():
    x = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5, 2.0]])
    got = filter_logits(x, 1.0, top_k=2)
    assert torch.equal(got, hf_filter(x, 1.0, 2))
    assert (got > NEG).tolist() == [[False, True, True, True, False, True]]


def test_top_p_ties_at_the_boundary_keep_the_lower_indices():
    # sorted: 3.0 (p .47), three tokens at 2.0 (p .17 each); top_p 0.7 keeps 3.0 and two of them
    x = torch.tensor([[2.0, 2.0, 3.0, 2.0]])
    got = filter_logits(x, 1.0, top_p=0.7)
    want = hf_filter(x, 1.0, top_p=0.7)
    assert int((got > NEG).sum()) == int((want > NEG).sum()) == 3
    assert (got > NEG).tolist() == [[True, True, True, False]]


def test_top_p_keeps_at_least_min_tokens():
    x = torch.tensor([[10.0, 0.0, -1.0, -2.0]])
    assert int((filter_logits(x, 1.0, top_p=0.01) > NEG).sum()) == 1
    assert int((filter_logits(x, 1.0, top_p=0.01, min_tokens_to_keep=3) > NEG).sum()) == 3


# ---------------------------------------------------------------------------------------------
# Inverse-CDF draws: the edges of [0, 1], zero-probability tokens, one-node trees


def test_uniform_edges_never_draw_a_zero_probability_token():
    x = torch.tensor([[NEG, 1.0, NEG, 2.0, 0.5, NEG, NEG]] * 4)
    u = torch.tensor([0.0, 1.0, 1 - 2**-24, 0.5])
    got = sample_logits(x, 1.0, uniforms=u)
    assert got.tolist()[:3] == [1, 4, 4] and got.tolist()[3] in (1, 3, 4)
    got = sample_logits(x, 0.5, top_k=2, uniforms=u)
    assert got.tolist()[:3] == [1, 3, 3]
    u64 = torch.tensor([1 - 2**-30] * 4, dtype=torch.float64)  # rounds to 1.0 in fp32
    assert sample_logits(x, 1.0, uniforms=u64).tolist() == [4] * 4


def test_sample_logits_follows_the_probabilities():
    logits = torch.log(torch.tensor([0.5, 0.0, 0.2, 0.3]))
    g = torch.Generator().manual_seed(0)
    got = sample_logits(logits.expand(N, 4), 1.0, generator=g)
    p = chi_square_p(got[:, None], torch.tensor([0.5, 0.0, 0.2, 0.3], dtype=torch.float64))
    assert p > 1e-3
    counts = torch.bincount(got, minlength=4)
    assert counts[1] == 0
    # shapes [...]: one draw per row, the same draws give the same tokens
    x = torch.randn(2, 3, 5)
    u = torch.rand(2, 3)
    assert torch.equal(sample_logits(x, 0.7, uniforms=u),
                       sample_logits(x.reshape(6, 5), 0.7, uniforms=u.reshape(6)).reshape(2, 3))
    assert sample_logits(x[:0], 0.7).shape == (0, 3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_node_tree_is_plain_sampling(backend):
    g = torch.Generator().manual_seed(3)
    logits, tokens = torch.randn(5, 1, 11, generator=g), torch.randint(0, 11, (5, 1), generator=g)
    u = torch.rand(5, 1, generator=g)
    logits, tokens, u = logits.to(DEV), tokens.to(DEV), u.to(DEV)
    lengths, path, nxt = accept_exact(logits, tokens, torch.tensor([[0]], device=DEV), 0.9,
                                      top_k=4, uniforms=u, backend=backend)
    assert lengths.tolist() == [1] * 5 and path.tolist() == [[0]] * 5
    assert torch.equal(nxt, sample_logits(logits[:, 0], 0.9, top_k=4, uniforms=u[:, 0]))


CHAIN_WIDE = build_tree([[0], [1], [0, 0], [1, 0]])  # 0 -> {1, 2}; 1 -> 3; 2 -> 4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_duplicate_children_follow_the_first(backend):
    logits = torch.full((1, 5, 4), -3.0)
    logits[0, :, 2] = 5.0  # every node's distribution is (almost) all on token 2
    tokens = torch.tensor([[0, 2, 2, 1, 2]])  # nodes 1 and 2 both carry 2; only 2's child too
    got = accept_exact(logits.to(DEV), tokens.to(DEV), CHAIN_WIDE.retrieve_indices.to(DEV), 1.0,
                       top_k=1, uniforms=torch.rand(1, 3, device=DEV), backend=backend)
    assert got[0].tolist() == [2] and got[1].tolist() == [[0, 1, 3]] and got[2].tolist() == [2]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_probability_children_are_never_entered(backend):
    g = torch.Generator().manual_seed(4)
    n = 64
    logits = torch.randn(n, 5, 6, generator=g)
    logits[:, 0, 1] = NEG  # token 1 impossible at the root: node 1 can never be entered
    tokens = torch.tensor([[0, 1, 4, 0, 0]]).expand(n, -1)
    top2 = logits[:, 0].topk(2).indices  # with top_k = 2 only these are possible at the root
    filtered_out = torch.ones(n, 6, dtype=torch.bool).scatter(1, top2, False)
    filtered_out[:, 1] = False
    tokens = tokens.clone()
    tokens[:, 2] = filtered_out.to(torch.int8).argmax(1)  # node 2: a token top-k drops
    u = torch.rand(n, 3, generator=g)
    lengths, path, nxt = accept_exact(logits.to(DEV), tokens.to(DEV),
                                      CHAIN_WIDE.retrieve_indices.to(DEV), 1.0, top_k=2,
                                      uniforms=u.to(DEV), backend=backend)
    assert lengths.tolist() == [1] * n
    assert bool((nxt.cpu()[:, None] == top2).any(1).all())  # the drawn token is one of the top 2


def test_minus_inf_logits_and_empty_batch():
    logits = torch.randn(3, 5, 6, device=DEV)
    logits[..., :3] = NEG
    tokens = torch.randint(0, 6, (3, 5), device=DEV)
    ri = CHAIN_WIDE.retrieve_indices.to(DEV)
    for backend in ("torch", "triton"):
        _, _, nxt = accept_exact(logits, tokens, ri, 1.0,
                                 generator=torch.Generator(device=DEV).manual_seed(0),
                                 backend=backend)
        assert bool((nxt >= 3).all())
        out = accept_exact(logits[:0], tokens[:0], ri, 1.0, backend=backend)
        assert [tuple(t.shape) for t in out] == [(0,), (0, 3), (0,)]
        assert [t.dtype for t in out] == [torch.int32, torch.int64, torch.int64]


# ---------------------------------------------------------------------------------------------
# The Triton walk against the torch reference and a literal Python walk


def python_walk(logits, tokens, ri, uniforms, temperature, top_k, top_p):
    """One row at a time, one node at a time: the module doc's pseudocode."""
    out = ([], [], [])
    ri = ri.long().tolist()
    for b in range(logits.shape[0]):
        node, depth = ri[0][0], 0
        while True:
            x = int(sample_logits(logits[b, node].float()[None], temperature, top_k, top_p,
                                  uniforms=uniforms[b, depth][None]))
            children = sorted({row[depth + 1] for row in ri if depth + 1 < len(row)
                               and row[depth] == node and row[depth + 1] >= 0
                               and int(tokens[b, row[depth + 1]]) == x})
            if not children:
                break
            node, depth = children[0], depth + 1
        best = next(row for row in ri if row[depth] == node)
        out[0].append(depth + 1)
        out[1].append(best)
        out[2].append(x)
    return (torch.tensor(out[0], dtype=torch.int32), torch.tensor(out[1]).view(-1, len(ri[0])),
            torch.tensor(out[2]))


def random_tree_case(tree, B, V, seed, dtype, index_dtype, p_follow=0.7):
    """Node tokens that are often a likely token of the parent's distribution, often duplicated
    among siblings; some -inf logits; uniforms including 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    ri = tree.retrieve_indices
    T = tree.num_nodes
    par = [-1] * T
    for row in ri.tolist():
        for a, b in zip(row, row[1:], strict=False):
            if b >= 0:
                par[b] = a
    logits = 2 * torch.randn(B, T, V, generator=g)
    logits[torch.rand(B, T, V, generator=g) < 0.1] = NEG
    logits[..., 0] = 1.0  # every row has a finite logit
    likely = logits.topk(2, dim=-1).indices  # [B, T, 2]
    tokens = torch.randint(0, V, (B, T), generator=g)
    pick = torch.randint(0, 2, (B, T), generator=g)
    follow = torch.rand(B, T, generator=g) < p_follow
    for u in range(1, T):
        tokens[:, u] = torch.where(follow[:, u], likely[:, par[u]].gather(1, pick[:, u:u + 1])[:, 0],
                                   tokens[:, u])
    uniforms = torch.rand(B, ri.shape[1], generator=g)
    uniforms[0, 0], uniforms[-1, -1] = 0.0, 1.0
    return (logits.to(dtype).to(DEV), tokens.to(index_dtype).to(DEV),
            ri.to(index_dtype).to(DEV), uniforms.to(DEV))


def assert_same(got, want):
    for name, a, b in zip(("accept_lengths", "accept_indices", "next_tokens"), got, want,
                          strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: {a.tolist()} != {b.tolist()}"


@pytest.mark.parametrize("tree_name,dtype,index_dtype,sampling", [
    ("mc_sim_7b_63", torch.float32, torch.int64, (0.8, None, None)),
    ("mc_sim_7b_63", torch.float16, torch.int32, (1.0, 5, 0.9)),
    ("small_15", torch.float16, torch.int64, (0.6, None, 0.8)),
    ("chain_4", torch.float32, torch.int32, (1.5, 3, None)),
    ("wide_8", torch.float32, torch.int64, (0.9, None, None)),
    ("root_only", torch.float16, torch.int64, (0.7, 2, None)),
])  # fmt: skip
def test_triton_walk_matches_reference(tree_name, dtype, index_dtype, sampling):
    tree = build_tree(TREES[tree_name])
    logits, tokens, ri, u = random_tree_case(tree, 6, 23, len(tree_name), dtype, index_dtype)
    want = accept_exact(logits, tokens, ri, *sampling, uniforms=u, backend="torch")
    assert_same(accept_exact(logits, tokens, ri, *sampling, uniforms=u, backend="triton"), want)
    assert_same(python_walk(logits.cpu(), tokens.cpu(), ri.cpu(), u.cpu(), *sampling),
                [t.cpu() for t in want])
    samples = _tree_samples(logits, ri, u, *sampling, 1)
    for backend in ("torch", "triton"):
        assert_same(accept_exact_ids(samples, tokens, ri, backend=backend), want)
    if tree_name != "mc_sim_7b_63":  # the walks go somewhere
        return
    assert int(want[0].max()) >= 3, want[0].tolist()


def test_distinct_siblings_walk_is_the_greedy_rule_on_the_samples():
    tree = build_tree(TREES["mc_sim_7b_63"])
    g = torch.Generator().manual_seed(5)
    B, T, V = 16, tree.num_nodes, 12
    logits = torch.randn(B, T, V, generator=g)
    # each head's top-10 of 12 tokens: distinct siblings, and most draws have a child
    ranks = torch.randn(B, 4, V, generator=g).argsort(-1)[..., :10]
    tokens = tree.candidates(logits[:, 0].argmax(-1), ranks)
    u = torch.rand(B, tree.retrieve_indices.shape[1], generator=g)
    samples = _tree_samples(logits, tree.retrieve_indices, u, 0.7, None, None, 1)
    got = accept_exact(logits, tokens, tree.retrieve_indices, 0.7, uniforms=u)
    assert_same(got, accept_greedy_ids(samples, tokens, tree.retrieve_indices))
    assert int(got[0].max()) >= 4, got[0].tolist()


def test_batched_rows_are_independent_and_seeded_runs_repeat():
    tree = build_tree(TREES["small_15"])
    logits, tokens, ri, u = random_tree_case(tree, 7, 19, 9, torch.float32, torch.int64)
    batched = accept_exact(logits, tokens, ri, 0.8, top_p=0.9, uniforms=u)
    for b in range(7):
        single = accept_exact(logits[b:b + 1], tokens[b:b + 1], ri, 0.8, top_p=0.9,
                              uniforms=u[b:b + 1])
        assert_same(single, [t[b:b + 1] for t in batched])
    runs = [accept_exact(logits, tokens, ri, 0.8, generator=torch.Generator(DEV).manual_seed(7))
            for _ in range(2)]
    assert_same(runs[0], runs[1])


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accept_exact_has_no_host_sync_and_captures_in_a_cuda_graph(backend):
    tree = build_tree(TREES["mc_sim_7b_63"])
    logits, tokens, ri, u = random_tree_case(tree, 4, 1000, 1, torch.float16, torch.int64)
    args = (logits, tokens, ri, 0.8, 20, 0.9)
    want = accept_exact(*args, uniforms=u, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        accept_exact(*args, uniforms=u, backend=backend)
        accept_exact(*args, backend=backend)  # draws from the default generator
        sample_logits(logits[:, 0], 0.8, 20, 0.9)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        accept_exact(*args, uniforms=u, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = accept_exact(*args, uniforms=u, backend=backend)
        drawn = accept_exact(*args, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert_same(got, want)
    assert bool((drawn[0] >= 1).all())


# ---------------------------------------------------------------------------------------------
# Bad arguments


def test_bad_sampling_arguments():
    x = torch.randn(2, 5)
    cases = [
        (dict(temperature=0.0), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=True), TypeError, "temperature must be a float"),
        (dict(temperature=1.0, top_k=0), ValueError, "top_k must be an int >= 1"),
        (dict(temperature=1.0, top_k=2.0), TypeError, "top_k must be an int"),
        (dict(temperature=1.0, top_p=0.0), ValueError, r"top_p must lie in \(0, 1\]"),
        (dict(temperature=1.0, top_p=1.5), ValueError, r"top_p must lie in \(0, 1\]"),
        (dict(temperature=1.0, top_p=float("nan")), ValueError, r"top_p must lie in \(0, 1\]"),
        (dict(temperature=1.0, min_tokens_to_keep=0), ValueError, "min_tokens_to_keep"),
    ]
    for kwargs, error, match in cases:
        for fn in (filter_logits, sample_logits):
            with pytest.raises(error, match=match):
                fn(x, **kwargs)
        with pytest.raises(error, match=match):
            accept_exact(x[:, None], torch.zeros(2, 1, dtype=torch.long), torch.tensor([[0]]),
                         **kwargs)
    with pytest.raises(TypeError, match="logits must have dtype"):
        sample_logits(torch.zeros(2, 5, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="uniforms must have shape"):
        sample_logits(x, 1.0, uniforms=torch.rand(3))
    with pytest.raises(TypeError, match="uniforms must have dtype"):
        sample_logits(x, 1.0, uniforms=torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\]"):
        sample_logits(x, 1.0, uniforms=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="either generator or uniforms"):
        sample_logits(x, 1.0, generator=torch.Generator(), uniforms=torch.rand(2))
    with pytest.raises(ValueError, match="backend must be one of"):
        sample_logits(x, 1.0, backend="fast")
    bad = x.clone()
    bad[1] = NEG
    with pytest.raises(ValueError, match=r"logits at \(1,\) give no distribution"):
        sample_logits(bad, 1.0)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="give no distribution"):
        sample_logits(bad, 1.0)


def test_bad_tree_arguments():
    tree = build_tree(TREES["small_15"])
    logits, tokens, ri, u = random_tree_case(tree, 2, 13, 1, torch.float32, torch.int64)
    logits, tokens, ri, u = logits.cpu(), tokens.cpu(), ri.cpu(), u.cpu()
    run = lambda **kw: accept_exact(**dict(dict(tree_logits=logits, tree_tokens=tokens,
                                                retrieve_indices=ri, temperature=1.0), **kw))
    with pytest.raises(ValueError, match="tree_tokens must be"):
        run(tree_tokens=tokens[:, :3])
    with pytest.raises(ValueError, match=r"uniforms must have shape \[2, 4\]"):
        run(uniforms=u[:, :2])
    bad = tokens.clone()
    bad[0, 3] = 13
    with pytest.raises(ValueError, match=r"tree_tokens\[0, 3\] = 13 must be a token id in \[0, V = 13\)"):
        run(tree_tokens=bad)
    bad_ri = ri.clone()
    bad_ri[0, 1] = tree.num_nodes
    with pytest.raises(ValueError, match=rf"retrieve_indices\[0, 1\] = {tree.num_nodes} must be a node index in \[0, T = {tree.num_nodes}\)"):
        run(retrieve_indices=bad_ri)
    bad_ri = ri.clone()
    bad_ri[1, 0] = 1
    with pytest.raises(ValueError, match=r"retrieve_indices\[1, 0\] = 1 must be 0"):
        run(retrieve_indices=bad_ri)
    bad_ri = build_tree([[0], [0, 0]]).retrieve_indices.clone()
    bad_ri[0, 1] = -1
    with pytest.raises(ValueError, match=r"follows -1 padding"):
        run(retrieve_indices=bad_ri)
    bad_logits = logits.clone()
    bad_logits[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"logits at \(1, 4\) give no distribution"):
        run(tree_logits=bad_logits)
    with pytest.raises(RuntimeError, match="accept_exact: backend 'cuda' is not implemented"):
        run(backend="cuda")
    with pytest.raises(ValueError, match="tree_tokens must be"):
        accept_exact_ids(tokens, tokens[:1], ri)


def test_custom_ops_pass_opcheck():
    tree = build_tree(TREES["chain_4"])
    logits, tokens, ri, u = random_tree_case(tree, 3, 13, 2, torch.float32, torch.int64)
    torch.library.opcheck(torch.ops.medusa_kernels.accept_exact.default,
                          (logits, tokens, ri, u, 0.8, 3, 0.9, 1, "torch"))
    torch.library.opcheck(torch.ops.medusa_kernels.sample_logits.default,
                          (logits, u[:, :1].expand(3, 5).contiguous(), 0.8, None, None, 1))


# ---------------------------------------------------------------------------------------------
# Draws keyed by (sequence seed, position)


def test_position_uniforms_are_uniform_independent_and_stateless():
    from medusa_kernels.ops.sampling import position_uniforms, seed_keys, sequence_seeds

    seeds = sequence_seeds(12345, 4000)
    assert seeds[0] == 12345 and len(set(seeds)) == 4000
    assert sequence_seeds(12345, 3) == seeds[:3]  # a sequence's seed ignores the batch size
    keys = seed_keys(seeds)
    pos = torch.arange(5, 13).expand(4000, 8)
    u = position_uniforms(keys, pos)
    assert u.dtype == torch.float32 and u.shape == (4000, 8)
    assert float(u.min()) >= 0 and float(u.max()) <= 1 - 2**-24
    assert torch.equal(u, position_uniforms(keys, pos))  # a function of (key, position)
    assert torch.equal(u[7:9, 3], position_uniforms(keys[7:9], pos[7:9, 3]))
    assert torch.equal(u[:, 2:4], position_uniforms(keys, pos[:, 2:4].to(torch.int32)))
    ten = (u * 10).long()
    flat = torch.full((10,), 0.1, dtype=torch.float64)
    p = chi_square_p(ten.reshape(-1, 1), flat)
    pairs_pos = chi_square_p(ten[:, 3:5], flat[:, None] * flat)  # positions t, t + 1
    pairs_row = chi_square_p(torch.stack([ten[:-1, 0], ten[1:, 0]], 1), flat[:, None] * flat)
    assert p > 1e-3 and pairs_pos > 1e-3 and pairs_row > 1e-3, (p, pairs_pos, pairs_row)
    other = position_uniforms(seed_keys(sequence_seeds(12346, 4000)), pos)
    assert not bool((other[1:] == u[:-1]).all(1).any())  # seeds s and s + 1: no shifted rows
    with pytest.raises(ValueError, match=r"seeds\[1\] must be an int in \[0, 2\*\*64\)"):
        seed_keys([1, -1])
    with pytest.raises(ValueError, match="keys must be \\[B, 2\\]"):
        position_uniforms(keys[:3], pos[:2])
    with pytest.raises(TypeError, match="positions must have dtype"):
        position_uniforms(keys, pos.float())
