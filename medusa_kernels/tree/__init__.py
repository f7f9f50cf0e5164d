"""Medusa candidate trees: ``medusa_choices`` paths to the buffers the decoding loop needs.

A tree is given as a list of paths of top-k ranks (``medusa_choices``): ``[1, 0]`` is the node
reached by taking head 0's second-best token, then head 1's best token after it. Node 0 is the
root: the base model's own next token. Nodes are numbered in (depth, path) order, so a node's
ancestors always have smaller indices.

Buffers (T = 1 + number of paths, A = max depth + 1, P = number of leaves):
- ``tree_mask [T, T]`` bool: node t sees itself and its ancestors.
- ``depths [T]`` int64: depth of each node (its position offset after the prefix).
- ``tree_indices [T]`` int64: where each node's token lies in the flat candidate row
  ``[root, head0 top-k..., head1 top-k..., ...]``.
- ``retrieve_indices [P, A]`` int64: node indices of each root-to-leaf path, padded with -1
  (never with a token id, so a short path cannot be falsely accepted).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The paper's tree for Vicuna-7B (Medusa repo, medusa_choices.py): 63 nodes + root, depth 4.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
    [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2],
    [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1],
    [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3],
    [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0],
    [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
    [0, 0, 0, 1], [1, 6], [0, 7, 0],
]  # fmt: skip

TREES: dict[str, list[list[int]]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    # 15 nodes, depth 3: a cheap tree for small models and CPUs.
    "small_15": [
        [0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2, 0], [0, 2], [1, 1], [0, 0, 1],
        [0, 1, 0], [3], [1, 0, 0], [0, 3],
    ],  # fmt: skip
    "chain_4": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]],
    "wide_8": [[i] for i in range(8)],
    "root_only": [],
}
DEFAULT_TREE = "mc_sim_7b_63"


@dataclass
class TreeBuffers:
    """Everything the loop needs about one tree (see the module doc for the shapes)."""

    choices: list[tuple[int, ...]]  # sorted paths; node i + 1 is choices[i]
    topk: int  # top-k width each head must provide
    depth: int  # number of heads the tree uses (A - 1)
    tree_mask: torch.Tensor
    depths: torch.Tensor
    tree_indices: torch.Tensor
    retrieve_indices: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return len(self.choices) + 1

    def to(self, device: torch.device | str) -> TreeBuffers:
        move = {
            name: getattr(self, name).to(device)
            for name in ("tree_mask", "depths", "tree_indices", "retrieve_indices")
        }
        return TreeBuffers(self.choices, self.topk, self.depth, **move)

    def candidates(self, root: torch.Tensor, head_topk: torch.Tensor) -> torch.Tensor:
        """Tree node tokens [B, T] from root tokens [B] and the heads' top-k [B, K, k]."""
        flat = torch.cat([root[:, None], head_topk[:, : self.depth, : self.topk].flatten(1)], 1)
        return flat[:, self.tree_indices]


def validate_choices(
    choices: Sequence[Sequence[int]], num_heads: int | None = None, topk: int | None = None
) -> list[tuple[int, ...]]:
    """Check ``choices`` is a tree and return its paths sorted; errors name the offending path."""
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise ValueError(f"medusa_choices must be a list of paths, got {type(choices).__name__}")
    paths: list[tuple[int, ...]] = []
    for path in choices:
        if isinstance(path, (str, bytes)) or not isinstance(path, Sequence) or len(path) == 0:
            raise ValueError(f"medusa_choices: path {path!r} must be a non-empty list of ranks")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
            raise ValueError(f"medusa_choices: path {list(path)} must hold non-negative int ranks")
        paths.append(tuple(path))
    seen: set[tuple[int, ...]] = set()
    for path in paths:
        if path in seen:
            raise ValueError(f"medusa_choices: path {list(path)} appears twice")
        seen.add(path)
    for path in paths:
        if len(path) > 1 and path[:-1] not in seen:
            raise ValueError(
                f"medusa_choices: path {list(path)} has no parent {list(path[:-1])} "
                "(the choices must be prefix-closed)"
            )
        if num_heads is not None and len(path) > num_heads:
            raise ValueError(
                f"medusa_choices: path {list(path)} is {len(path)} deep but there are only "
                f"{num_heads} Medusa heads"
            )
        if topk is not None and max(path) >= topk:
            raise ValueError(f"medusa_choices: path {list(path)} uses a rank >= top-k = {topk}")
    return sorted(paths, key=lambda p: (len(p), p))


def build_tree(
    choices: Sequence[Sequence[int]],
    num_heads: int | None = None,
    topk: int | None = None,
    device: torch.device | str = "cpu",
) -> TreeBuffers:
    """Buffers for ``choices``; ``num_heads``/``topk`` bound the depth and ranks when given."""
    paths = validate_choices(choices, num_heads, topk)
    width = topk if topk is not None else 1 + max((max(p) for p in paths), default=0)
    depth = max((len(p) for p in paths), default=0)
    node_of = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    T = len(paths) + 1
    mask = torch.zeros(T, T, dtype=torch.bool)
    depths = torch.zeros(T, dtype=torch.long)
    tree_indices = torch.zeros(T, dtype=torch.long)
    mask[0, 0] = True
    for p, node in node_of.items():
        for n in range(len(p) + 1):
            mask[node, node_of[p[:n]]] = True
        depths[node] = len(p)
        if p:
            tree_indices[node] = 1 + (len(p) - 1) * width + p[-1]
    parents = {p[:-1] for p in paths}
    leaves = [p for p in node_of if p not in parents]
    retrieve = torch.full((len(leaves), depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        for n in range(len(leaf) + 1):
            retrieve[row, n] = node_of[leaf[:n]]
    return TreeBuffers(paths, width, depth, mask, depths, tree_indices, retrieve).to(device)


def resolve_choices(tree: str | os.PathLike | Sequence[Sequence[int]] | None,
                    num_heads: int | None = None) -> list[list[int]]:
    """A tree given by name (``TREES``), by a JSON file (a list, or {"choices": [...]}), or as
    a list of paths; None gives the default (``mc_sim_7b_63``), cut to ``num_heads`` levels
    when given (a tree asked for by name or file is kept whole: too deep is an error later)."""
    if tree is None:
        return [p for p in TREES[DEFAULT_TREE] if num_heads is None or len(p) <= num_heads]
    if isinstance(tree, (str, os.PathLike)):
        if str(tree) in TREES:
            return TREES[str(tree)]
        if os.path.isfile(tree):
            with open(tree) as f:
                data = json.load(f)
            return data["choices"] if isinstance(data, dict) else data
        raise ValueError(f"tree {str(tree)!r} is neither a known tree {sorted(TREES)} nor a file")
    return [list(p) for p in tree]
