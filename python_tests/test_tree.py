"""medusa_choices -> tree buffers, and the checks that refuse a bad tree."""

import json

import pytest
import torch

from medusa_kernels.tree import (
    MC_SIM_7B_63,
    TREES,
    build_tree,
    fit_choices,
    load_tree,
    resolve_choices,
    validate_choices,
)


def ancestors_by_brute_force(choices):
    paths = [()] + sorted((tuple(p) for p in choices), key=lambda p: (len(p), p))
    return paths, [[q == p[: len(q)] for q in paths] for p in paths]


@pytest.mark.parametrize("name", sorted(TREES))
def test_buffers_describe_the_tree(name):
    tree = build_tree(TREES[name])
    paths, mask = ancestors_by_brute_force(TREES[name])
    assert tree.num_nodes == len(paths)
    assert tree.tree_mask.tolist() == mask
    assert tree.depths.tolist() == [len(p) for p in paths]
    for node, p in enumerate(paths[1:], start=1):  # flat candidate row: root, head0 top-k, ...
        assert tree.tree_indices[node] == 1 + (len(p) - 1) * tree.topk + p[-1]
    leaves = {p for p in paths if not any(q[:-1] == p for q in paths[1:])}
    assert tree.retrieve_indices.shape == (len(leaves), tree.depth + 1)
    got_leaves = set()
    for row in tree.retrieve_indices.tolist():
        nodes = [n for n in row if n >= 0]
        assert row[len(nodes):] == [-1] * (len(row) - len(nodes))  # -1 padding, never a token
        steps = zip(nodes, nodes[1:], strict=False)
        assert nodes[0] == 0 and all(paths[b][:-1] == paths[a] for a, b in steps)
        got_leaves.add(paths[nodes[-1]])
    assert got_leaves == leaves


def test_default_tree_is_the_papers():
    tree = build_tree(MC_SIM_7B_63)
    assert (tree.num_nodes, tree.depth, tree.topk, tree.retrieve_indices.shape[0]) == (64, 4, 10, 42)


def test_candidates_gather_heads_topk():
    tree = build_tree([[0], [2], [0, 1]])
    root = torch.tensor([7, 8])
    topk = torch.arange(2 * 2 * 3).view(2, 2, 3) + 100  # [B, K, k]
    cand = tree.candidates(root, topk)
    assert cand.tolist() == [[7, 100, 102, 104], [8, 106, 108, 110]]


@pytest.mark.parametrize(
    "choices,kwargs,match",
    [
        ([[0], [0, 1], [0, 1]], {}, r"path \[0, 1\] appears twice"),
        ([[0], [1, 0]], {}, r"path \[1, 0\] has no parent \[1\]"),
        ([[0], [12]], {"topk": 10}, r"path \[12\] uses a rank >= top-k"),
        ([[0], [0, 0], [0, 0, 0]], {"num_heads": 2}, r"path \[0, 0, 0\] is 3 deep"),
        ([[0], []], {}, r"path \[\] must be a non-empty"),
        ([[0], [-1]], {}, r"path \[-1\] must hold non-negative"),
        ([[0], [0.5]], {}, r"non-negative int"),
        ("mc_sim", {}, "list of paths"),
    ],
)
def test_bad_trees_are_refused_naming_the_path(choices, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_tree(choices, **kwargs)


def test_resolve_choices_from_name_file_and_list(tmp_path):
    assert resolve_choices(None) == MC_SIM_7B_63
    assert resolve_choices("chain_4") == TREES["chain_4"]
    (tmp_path / "t.json").write_text(json.dumps({"choices": [[0], [0, 0]]}))
    assert resolve_choices(tmp_path / "t.json") == [[0], [0, 0]]
    assert resolve_choices(((0,), (1,))) == [[0], [1]]
    with pytest.raises(ValueError, match="neither a known tree"):
        resolve_choices("no-such-tree")


@pytest.mark.parametrize("name", sorted(TREES))
@pytest.mark.parametrize("heads,vocab", [(1, None), (2, 3), (3, 1), (None, 2), (4, 10)])
def test_fit_choices_cuts_to_a_tree(name, heads, vocab):
    """Cut to the heads and the vocabulary, a tree stays a tree (prefix-closed) and keeps
    every path that fits."""
    cut = fit_choices(TREES[name], heads, vocab)
    validate_choices(cut, heads, vocab)
    fits = [p for p in TREES[name] if (heads is None or len(p) <= heads)
            and (vocab is None or max(p) < vocab)]
    assert cut == fits
    assert resolve_choices(None, heads, vocab) == fit_choices(MC_SIM_7B_63, heads, vocab)


def test_load_tree_errors_name_the_file(tmp_path):
    cases = {"bad.json": ("[[0], [1]", "not a readable JSON file"),
             "obj.json": ('{"tree": [[0]]}', 'found keys [\'tree\']'),
             "str.json": ('"mc_sim"', "got a JSON str"),
             "orphan.json": ('{"choices": [[0], [3, 1]]}', "no parent [3]")}
    for name, (text, part) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as info:
            load_tree(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and part in str(info.value)
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe[")
    with pytest.raises(ValueError, match="bytes.json"):
        load_tree(tmp_path / "bytes.json")
    assert load_tree("small_7") == MC_SIM_7B_63[:7]
