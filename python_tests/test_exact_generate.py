"""Exact sampling end to end through ``generate``, on a tiny random Llama with V = 12 tokens.

The law of the first 3 new tokens after a prompt is computed exactly by enumeration: one
transformers forward (float64) of the prompt followed by every pair (y1, y2) gives
q1(y1) q2(y2 | y1) q3(y3 | y1, y2), each after transformers' own warpers (temperature, top-k,
top-p). ``generate`` then decodes N = 20000 copies of the prompt in one call (each sequence with
its own seed) and Pearson's chi-square test compares the empirical frequencies of every 2- and
3-token continuation with that law (fixed seeds, p > 1e-3 required): Medusa with exact
acceptance, plain sampling, both with top-k and top-p; typical acceptance fails it (the test
has power); a ragged batch (two prompts of different lengths interleaved) matches each prompt's
law.

The Medusa heads are a ``propose`` function of the context only (never of the draws): head 0
ranks the base model's next-token logits plus noise (right often, not always), head 1 the logits
one step along the greedy continuation plus noise, head 2 guesses at random. The tree verifies
up to 3 guessed tokens, so runs accept 1 to 4 tokens per step.

"Batched and ragged runs match single runs" is checked two ways: distributionally (above), and
token for token: the token at position t of sequence b is drawn with u(seed_b, t) (seed_b: the
sequence's own seed, ``sequence_seeds``), so row b of a ragged batch equals a run of its prompt
alone with seed_b, and Medusa's exact output equals plain sampling's for the same seed (up to a
float rounding moving a CDF boundary across a draw).
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from sampling_stats import chi_square_p, hf_filter
from tiny_models import make_hf_model

from medusa_kernels import generate, load_model
from medusa_kernels.ops.sampling import sequence_seeds

V = 12
N = 20000
TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]]  # 9 nodes, 3 deep, top-3
PROMPTS = ([3, 7, 1], [5])  # ragged: 3 tokens and 1
SAMPLING = [
    pytest.param(dict(temperature=0.8), id="t0.8"),
    pytest.param(dict(temperature=1.0, top_k=3), id="t1-k3"),
    pytest.param(dict(temperature=0.7, top_p=0.8), id="t0.7-p0.8"),
    pytest.param(dict(temperature=1.2, top_k=5, top_p=0.9), id="t1.2-k5-p0.9"),
]


class World:
    """The model, and per prompt the exact logits after it and after every 1- and 2-token
    continuation (float64, from transformers' forward), for the law and for the heads."""

    def __init__(self, path):
        hf = make_hf_model("llama-mha", seed=4, layers=1, hidden=32, vocab_size=V)
        with torch.no_grad():
            hf.lm_head.weight.mul_(4.0)  # sharper distributions: guesses often right
        hf.save_pretrained(path)
        self.model = load_model(path, dtype=torch.float32)
        hf = hf.double()
        self.logits = {}
        g = torch.Generator().manual_seed(9)
        self.noise = torch.randn(2, V, V, V, dtype=torch.float64, generator=g)
        self.random_ranks = torch.rand(V, V, 2, V, generator=g).argsort(-1)[..., :3]
        for prompt in PROMPTS:
            P = len(prompt)
            pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V * V, 2]
            ids = torch.cat([torch.tensor(prompt).expand(V * V, P), pairs], 1)
            with torch.no_grad():
                out = hf(ids).logits  # [V * V, P + 2, V]
            self.logits[tuple(prompt)] = (out[0, P - 1], out[::V, P], out[:, P + 1].view(V, V, V))

    def law(self, prompt, temperature, top_k=None, top_p=None):
        """[V, V, V] float64: P(y1, y2, y3) of sequential sampling after ``prompt``."""
        l1, l2, l3 = self.logits[tuple(prompt)]

        def q(x):
            return hf_filter(x.reshape(-1, V), temperature, top_k, top_p).double().softmax(-1)

        q1, q2, q3 = q(l1)[0], q(l2), q(l3).view(V, V, V)
        return q1[:, None, None] * q2[:, :, None] * q3

    def propose(self, holder, prompt_of):
        """Heads as a function of each sequence's context (prompt, tokens so far): [B, 3, 3]."""

        def heads(last_hidden, root, num_generated):
            B = root.shape[0]
            guesses = torch.zeros(B, 3, 3, dtype=torch.long)
            made = torch.tensor([(t + [0, 0])[:2] for t in holder["stream"].result.tokens])
            n = torch.tensor(num_generated)
            for prompt in PROMPTS:
                _, l2, l3 = self.logits[tuple(prompt)]
                mine = torch.tensor([p == prompt for p in prompt_of])
                y1, y2 = made[:, 0], made[:, 1]
                one, two = mine & (n == 1), mine & (n == 2)
                # one token so far (y1): head 0 guesses y2, head 1 y3 after the likeliest y2
                ahead = l2[y1] + 0.7 * self.noise[0, 0, y1]  # [B, V]
                z = l2[y1].argmax(-1)
                ahead1 = l3[y1, z] + 1.5 * self.noise[1, y1, z]
                g1 = torch.stack([ahead.argsort(-1, True)[:, :3], ahead1.argsort(-1, True)[:, :3],
                                  self.random_ranks[y1, 0, 0]], 1)
                # two tokens so far (y1, y2): head 0 guesses y3; heads 1, 2 at random
                ahead = l3[y1, y2] + 0.7 * self.noise[0, y1, y2]
                g2 = torch.stack([ahead.argsort(-1, True)[:, :3], self.random_ranks[y1, y2, 0],
                                  self.random_ranks[y1, y2, 1]], 1)
                guesses[one] = g1[one]
                guesses[two] = g2[two]
            return guesses

        return heads


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("v12"))


def run(world, prompts, medusa, seed, **sampling):
    """Decode ``prompts`` (one row each) to 3 new tokens: ([N, 3] tokens, the result)."""
    prompts = [list(p) for p in prompts]
    holder = {}  # the heads read the tokens the stream has produced so far
    propose = world.propose(holder, prompts) if medusa else None
    ids = torch.tensor(prompts) if len({len(p) for p in prompts}) == 1 else prompts  # faster
    stream = generate(world.model, ids, max_new_tokens=3, medusa=medusa, tree=TREE,
                      eos_token_id=[], seed=seed, stream=True, propose=propose, **sampling)
    holder["stream"] = stream
    for _ in stream:
        pass
    return torch.tensor(stream.result.tokens), stream.result


def p_values(tokens, law):
    """(p of the 2-token continuations, p of the 3-token continuations)."""
    return chi_square_p(tokens[:, :2], law.sum(-1)), chi_square_p(tokens, law)


@pytest.mark.parametrize("sampling", SAMPLING)
def test_medusa_exact_and_plain_sampling_follow_the_law(world, sampling):
    law = world.law(PROMPTS[0], **sampling)
    medusa, result = run(world, [PROMPTS[0]] * N, True, 1, **sampling)
    p2, p3 = p_values(medusa, law)
    assert p2 > 1e-3 and p3 > 1e-3, (p2, p3)
    # the heads are often right and often wrong: the first step accepts 2 or 3 tokens (1 or
    # 2 guesses) in at least 10% of the rows each, so the walks follow and leave the tree
    counts = torch.bincount(torch.tensor(result.accepted_per_step[0]), minlength=5)[1:] / N
    assert counts[1] > 0.1 and counts[2] > 0.1, counts
    plain, _ = run(world, [PROMPTS[0]] * N, False, 2, **sampling)  # unrelated draws
    p2, p3 = p_values(plain, law)
    assert p2 > 1e-3 and p3 > 1e-3, (p2, p3)
    # the same draws (seed 1): plain sampling gives Medusa's tokens, row for row
    same_draws, _ = run(world, [PROMPTS[0]] * 2000, False, 1, **sampling)
    assert torch.equal(same_draws, medusa[:2000])


def test_typical_acceptance_fails_the_same_test(world):
    """The power of the test: the paper's typical acceptance changes the distribution."""
    law = world.law(PROMPTS[0], 0.8)
    typical, _ = run(world, [PROMPTS[0]] * N, True, 1, temperature=0.8, acceptance="typical")
    p2, p3 = p_values(typical, law)
    assert p2 < 1e-6 and p3 < 1e-6, (p2, p3)


def test_ragged_batch_matches_each_prompts_law_and_single_runs(world):
    sampling = dict(temperature=0.8, top_k=6)
    prompts = [PROMPTS[b % 2] for b in range(N)]  # 3 tokens and 1, interleaved
    tokens, _ = run(world, prompts, True, 5, **sampling)
    for i, prompt in enumerate(PROMPTS):
        p2, p3 = p_values(tokens[i::2], world.law(prompt, **sampling))
        assert p2 > 1e-3 and p3 > 1e-3, (prompt, p2, p3)
    seeds = sequence_seeds(5, N)
    for b in (0, 1, 2, 7):  # row b alone, with its own seed: the same tokens
        alone, _ = run(world, [prompts[b]], True, seeds[b], **sampling)
        assert alone[0].tolist() == tokens[b].tolist(), b
    listed, _ = run(world, prompts[:8], True, seeds[:8], **sampling)  # one seed per sequence
    assert torch.equal(listed, tokens[:8])
    plain, _ = run(world, prompts[:500], False, 5, **sampling)
    assert torch.equal(plain, tokens[:500])


def test_seeds_give_unrelated_streams(world):
    """Seeds 1 and 2 share no rows, shifted or not (sequence b's seed is a hash of (seed, b)),
    and agree on the first token about as often as independent draws do."""
    a, _ = run(world, [PROMPTS[0]] * 4000, False, 1, temperature=1.0)
    b, _ = run(world, [PROMPTS[0]] * 4000, False, 2, temperature=1.0)
    q1 = world.law(PROMPTS[0], 1.0).sum((1, 2))
    chance = float((q1**2).sum())  # P(two independent first tokens agree)
    for shift in (0, 1, 2):
        same = (a[shift:, 0] == b[: 4000 - shift, 0]).double().mean()
        assert abs(float(same) - chance) < 0.05, (shift, float(same), chance)
    with pytest.raises(ValueError, match="seed lists 2 seeds for 3 sequences"):
        run(world, [PROMPTS[0]] * 3, False, [1, 2], temperature=1.0)
    with pytest.raises(TypeError, match=r"seed\[1\] must be an int"):
        run(world, [PROMPTS[0]] * 2, False, [1, 2.5], temperature=1.0)


def test_seeded_runs_repeat_and_exact_is_the_default(world):
    ids = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    a = generate(world.model, ids, max_new_tokens=12, tree=TREE, temperature=0.9, seed=3,
                 propose=lambda h, r, n: torch.randint(0, V, (len(n), 3, 3)))
    b = generate(world.model, ids, max_new_tokens=12, tree=TREE, temperature=0.9, seed=3,
                 acceptance="exact", propose=lambda h, r, n: torch.zeros(len(n), 3, 3).long())
    assert a.tokens == b.tokens == generate(world.model, ids, max_new_tokens=12, medusa=False,
                                            temperature=0.9, seed=3).tokens
    assert a.tokens != generate(world.model, ids, max_new_tokens=12, medusa=False,
                                temperature=0.9, seed=4).tokens


# --------------------------------------------------------------------------- on the GPU

@requires_cuda
@pytest.mark.parametrize("sampling", [dict(temperature=0.8), dict(temperature=1.0, top_k=20,
                                                                    top_p=0.9)],
                         ids=["t0.8", "k20-p0.9"])
def test_exact_sampling_in_cuda_graphs_is_plain_sampling(tmp_path, sampling):
    """Plain and exact Medusa sampling, eager and replayed from CUDA graphs (fp32, no TF32):
    the same tokens for a seed; a tree policy switching trees (and graphs) mid-run too, and the
    online policy (timed by CUDA events)."""
    from tiny_models import save_random_heads

    from medusa_kernels.policy import TreePolicy

    torch.backends.cuda.matmul.allow_tf32 = False
    make_hf_model("llama-gqa-llama3rope", seed=3, path=tmp_path / "base")
    save_random_heads(tmp_path / "heads", seed=3)
    model = load_model(tmp_path / "base", medusa=tmp_path / "heads", dtype=torch.float32,
                       device="cuda")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (5, 17, 2, 9)]
    kw = dict(max_new_tokens=24, seed=7, **sampling)
    plain = generate(model, ids, medusa=False, cuda_graph=False, **kw).tokens
    assert generate(model, ids, medusa=False, cuda_graph=True, **kw).tokens == plain
    for graph in (False, True):
        assert generate(model, ids, tree="mc_sim_7b_63", cuda_graph=graph, **kw).tokens == plain
    policy = TreePolicy([{"batch": 1, "tree": [[0], [1], [0, 0]]}, {"batch": 2, "tree": [[0]]},
                         {"batch": 4, "tree": []}])
    eos = plain[0][3:5]  # some sequences end early: the rows shrink, the trees change
    ref = generate(model, ids, medusa=False, eos_token_id=eos, **kw)
    got = generate(model, ids, tree=policy, eos_token_id=eos, cuda_graph=True, **kw)
    assert got.tokens == ref.tokens
    # the online policy (the default): it switches between captured steps as it measures
    for graph in (True, False):
        got = generate(model, ids, eos_token_id=eos, cuda_graph=graph, **kw)
        assert got.tokens == ref.tokens and got.tree == "online"


def online(world):
    """An online policy over plain, one guess and ``TREE``, with a cost model (deterministic):
    each step's tree follows the acceptance of the steps before it and the rows still running."""
    from medusa_kernels.policy import OnlinePolicy

    def cost(tree, rows):  # the 2-node tree at 20000 rows, the 9-node one at ~5000 rows
        return 1.0 + (0.5 if tree else 0.0) + 0.05 * (len(tree) + 1) * rows / 17500

    class Known(OnlinePolicy):  # the cost model is also its prior: no rows make steps dear
        def prior_cost(self, tree, rows):
            return cost(tree, rows)

    return Known(3, trees=[[[0]], TREE], sizes=(), step_cost=cost, vocab_size=V, explore=0.5,
                 accuracies=[[0.9, 0.05, 0.05], [0.1, 0.05, 0.05], [0.1, 0.05, 0.05]])


@pytest.mark.parametrize("sampling", SAMPLING[:2])
def test_online_policy_sampling_follows_the_law_and_is_plain_sampling(world, sampling):
    """The online policy picks each step's tree from earlier steps only, so exact sampling
    through its switching trees keeps the law, and the tokens of plain sampling for a seed."""
    law = world.law(PROMPTS[0], **sampling)
    policy = online(world)
    prompts = [list(PROMPTS[0])] * N
    holder = {}
    stream = generate(world.model, torch.tensor(prompts), max_new_tokens=3, tree=policy,
                      eos_token_id=[], seed=1, stream=True,
                      propose=world.propose(holder, prompts), **sampling)
    holder["stream"] = stream
    for _ in stream:
        pass
    tokens, result = torch.tensor(stream.result.tokens), stream.result
    assert len(set(result.step_trees)) >= 2, result.tree_steps  # it switched trees
    p2, p3 = p_values(tokens, law)
    assert p2 > 1e-3 and p3 > 1e-3, (p2, p3)
    same_draws, _ = run(world, prompts[:2000], False, 1, **sampling)
    assert torch.equal(same_draws, tokens[:2000])
