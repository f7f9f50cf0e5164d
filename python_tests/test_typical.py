"""Acceptance rules on hand-made distributions (typical and greedy), and sampling."""

import math

import pytest
import torch

from medusa_kernels import accept_greedy, accept_typical, build_tree, sample_tokens


def logits_from_probs(*rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64)).float()


CHAIN = build_tree([[0], [0, 0]])  # nodes 0 -> 1 -> 2


def test_hand_computed_cutoffs():
    # node 0: H = 1.142 nats, 0.3 * exp(-H) = 0.0957 > 0.09, so the cutoff is 0.09
    # node 1: uniform, 0.3 * exp(-ln 4) = 0.075 is the cutoff
    p0 = [0.5, 0.3, 0.15, 0.05]
    assert min(0.09, 0.3 * math.exp(sum(p * math.log(p) for p in p0))) == 0.09
    logits = logits_from_probs(p0, [0.25] * 4, [0.97, 0.01, 0.01, 0.01])[None]
    cases = {(2, 1): 3, (2, 3): 3, (3, 1): 1, (1, 0): 3, (0, 2): 3}  # (node1, node2) -> length
    for (t1, t2), length in cases.items():
        tokens = torch.tensor([[0, t1, t2]])
        lengths, path, _ = accept_typical(logits, tokens, CHAIN.retrieve_indices, 1.0)
        assert lengths.tolist() == [length], (t1, t2)
        assert path[0, :length].tolist() == list(range(length))


def test_peaked_parent_rejects_unlikely_child():
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01], [0.25] * 4)[None]
    lengths, _, _ = accept_typical(logits, torch.tensor([[0, 2, 1]]), CHAIN.retrieve_indices, 1.0)
    assert lengths.tolist() == [2]  # 0.01 < min(0.09, 0.3 * exp(-H(0.97, ...)))


def test_temperature_flattens_and_accepts_more():
    logits = logits_from_probs([0.9, 0.06, 0.02, 0.02], [0.25] * 4, [0.25] * 4)[None]
    tokens = torch.tensor([[0, 2, 1]])
    cold, _, _ = accept_typical(logits, tokens, CHAIN.retrieve_indices, 1.0)
    hot, _, _ = accept_typical(logits, tokens, CHAIN.retrieve_indices, 3.0)
    assert cold.tolist() == [1] and hot.tolist() == [3]


def test_likeliest_of_the_longest_paths_wins():
    wide = build_tree([[0], [1]])  # nodes 1 and 2 are both children of the root
    logits = logits_from_probs([0.2, 0.5, 0.3], [1 / 3] * 3, [1 / 3] * 3)[None]
    lengths, path, _ = accept_typical(logits, torch.tensor([[0, 2, 1]]), wide.retrieve_indices, 1.0)
    assert lengths.tolist() == [2] and path[0].tolist() == [0, 2]  # token 1 (p=.5) beats 2 (.3)


def test_next_token_is_sampled_after_the_last_accepted_node():
    logits = logits_from_probs([0.25] * 4, [0.001, 0.001, 0.997, 0.001], [0.25] * 4)[None]
    tokens = torch.tensor([[0, 1, 3]])  # node 1 accepted (uniform parent), node 2 rejected
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths, _, nxt = accept_typical(logits, tokens, CHAIN.retrieve_indices, 0.5, generator=g)
        assert lengths.tolist() == [2] and nxt.tolist() == [2]  # drawn from node 1's row


@pytest.mark.parametrize("seed", range(3))
def test_temperature_zero_is_greedy(seed):
    torch.manual_seed(seed)
    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    B, T, V = 3, tree.num_nodes, 7
    logits = torch.randn(B, T, V)
    tokens = torch.randint(0, V, (B, T))
    tokens[:, 1] = logits[:, 0].argmax(-1)  # make some paths acceptable
    tokens[:, 3] = logits[:, 1].argmax(-1)
    got = accept_typical(logits, tokens, tree.retrieve_indices, 0.0)
    want = accept_greedy(logits, tokens, tree.retrieve_indices)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert (want[0] >= 3).all()


def test_greedy_never_accepts_a_padded_step():
    tree = build_tree([[0], [1], [0, 0]])  # leaf [1] is padded with -1 in retrieve_indices
    logits = torch.full((1, 4, 5), -5.0)
    logits[0, :, 0] = 5.0  # the base model always predicts token 0
    tokens = torch.tensor([[0, 0, 3, 0]])  # node 1 (rank 0) and node 3 ([0, 0]) right
    lengths, path, nxt = accept_greedy(logits, tokens, tree.retrieve_indices)
    assert lengths.tolist() == [3] and path[0].tolist() == [0, 1, 3] and nxt.tolist() == [0]


def test_sample_tokens_matches_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    g = torch.Generator().manual_seed(1)
    draws = sample_tokens(torch.log(probs).expand(20000, 3), 1.0, g)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    assert sample_tokens(torch.log(probs)[None], 0.0).tolist() == [1]
