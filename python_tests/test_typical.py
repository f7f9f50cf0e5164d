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


# --------------------------------------------- issue 14: -inf logits (a masked vocabulary)


def medusa_typical_lengths(logits, tokens, retrieve_indices, temperature, threshold=0.09,
                           alpha=0.3):
    """Accepted lengths (root included) by the Medusa reference's typical rule
    (medusa/model/utils.py, evaluate_posterior): entropy with log(p + 1e-5), per path."""
    B = logits.shape[0]
    out = []
    for b in range(B):
        best = 0
        for path in retrieve_indices.tolist():
            n = 0
            for parent, child in zip(path, path[1:], strict=False):
                if child < 0:
                    break
                p = torch.softmax(logits[b, parent].double() / temperature, -1)
                entropy = -(p * torch.log(p + 1e-5)).sum()
                cut = min(threshold, float(torch.exp(-entropy)) * alpha)
                if not float(p[tokens[b, child]]) > cut:
                    break
                n += 1
            best = max(best, n)
        out.append(best + 1)
    return out


def test_minus_inf_logits_keep_the_entropy_finite_and_accept():
    """exp(-inf) * -inf was NaN: the cutoff became NaN and every child was rejected."""
    p = [0.6, 0.3, 0.1]
    row = torch.full((8,), float("-inf"))
    row[[1, 4, 6]] = torch.log(torch.tensor(p))  # 5 of 8 tokens masked
    logits = row.expand(1, 3, 8).clone()
    tokens = torch.tensor([[0, 1, 4]])  # p = 0.6, then 0.3: both above min(0.09, ...)
    lengths, path, nxt = accept_typical(logits, tokens, CHAIN.retrieve_indices, 1.0)
    assert lengths.tolist() == [3] and path.tolist() == [[0, 1, 2]]
    assert nxt.item() in (1, 4, 6)  # never a masked token
    assert medusa_typical_lengths(logits, tokens, CHAIN.retrieve_indices, 1.0) == [3]
    masked = torch.tensor([[0, 1, 3]])  # a masked token is never accepted
    assert accept_typical(logits, masked, CHAIN.retrieve_indices, 1.0)[0].tolist() == [2]


@pytest.mark.parametrize("seed", range(4))
def test_masking_equals_dropping_the_masked_tokens(seed):
    """With -inf on a token subset, acceptance equals acceptance over the remaining
    vocabulary alone (the entropy of p over the kept tokens), and Medusa's rule agrees."""
    g = torch.Generator().manual_seed(seed)
    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    B, T, V = 3, tree.num_nodes, 12
    kept = torch.randperm(V, generator=g)[:5].sort().values
    small = torch.randn(B, T, 5, generator=g) * 1.5
    logits = torch.full((B, T, V), float("-inf"))
    logits[:, :, kept] = small
    small_tokens = torch.randint(0, 5, (B, T), generator=g)
    tokens = kept[small_tokens]
    for temperature in (0.7, 1.0, 2.0):
        got = accept_typical(logits, tokens, tree.retrieve_indices, temperature)
        want = accept_typical(small, small_tokens, tree.retrieve_indices, temperature)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[0].tolist() == medusa_typical_lengths(logits, tokens, tree.retrieve_indices,
                                                         temperature)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number >= 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0, got -1"),
        (dict(temperature="0.7"), TypeError, "temperature must be a real number, got str"),
        (dict(temperature=True), TypeError, "temperature must be a real number, got bool"),
        (dict(posterior_threshold=float("inf")), ValueError, "posterior_threshold must be"),
        (dict(posterior_alpha=-0.3), ValueError, "posterior_alpha must be a finite number"),
        (dict(posterior_alpha=None), TypeError, "posterior_alpha must be a real number"),
        (dict(generator="seed"), TypeError, "generator must be a torch.Generator or None"),
    ],
)
def test_typical_settings_are_checked(kwargs, error, match):
    logits = logits_from_probs([0.5, 0.5], [0.5, 0.5], [0.5, 0.5])[None]
    args = dict(temperature=0.7) | kwargs
    with pytest.raises(error, match=match):
        accept_typical(logits, torch.tensor([[0, 1, 1]]), CHAIN.retrieve_indices, **args)


def test_sample_tokens_checks_its_arguments():
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sample_tokens(torch.zeros(2, 3), float("inf"))
    with pytest.raises(TypeError, match="logits must have dtype"):
        sample_tokens(torch.zeros(2, 3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="logits must be \\[..., V\\] with V >= 1"):
        sample_tokens(torch.zeros(2, 0), 1.0)
    with pytest.raises(TypeError, match="generator must be"):
        sample_tokens(torch.zeros(2, 3), 1.0, generator=0)
    masked = torch.tensor([[float("-inf"), 0.0, float("-inf")]]).expand(50, 3)
    assert sample_tokens(masked, 1.3).tolist() == [1] * 50
    assert sample_tokens(torch.zeros(0, 4), 0.5).shape == (0,)
