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

What ``generate`` and the CLIs use when no tree is given: the checkpoint's policy table for the
device if it ships one (``default_policy_file``: ``tree_policy_cpu.json`` /
``tree_policy_cuda.json``, written by ``python -m medusa_kernels.tree calibrate --nodes auto
--batches ...``; see ``policy.py``), which picks the tree per step by load; else one tree
(``default_tree``): on a GPU the
checkpoint's ``calibrated_tree.json`` if it ships one, else the paper's ``mc_sim_7b_63``; on a
CPU, which pays for every tree node, ``calibrated_tree_cpu.json`` if shipped, else the 7-node
``small_7``. A checkpoint ships a tree in its model directory or the directory above it (the
demo's layout: ``DIR/model``, ``DIR/heads``, ``DIR/calibrated_tree_cpu.json``). The default is
cut to the heads and the vocabulary the model has; a tree asked for by name, file or list is
used whole, and one that does not fit is an error naming it.

torch is imported at first use (``build_tree``), so ``python -m medusa_kernels.tree`` answers
``--help`` at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    # 7 nodes, depth 3: mc_sim_7b_63's first 7 (it lists its nodes by estimated value), the
    # size `tree calibrate --nodes auto` chose for the demo on a CPU: the CPU default
    "small_7": MC_SIM_7B_63[:7],
    "chain_4": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]],
    "wide_8": [[i] for i in range(8)],
    "root_only": [],
}
DEFAULT_TREE = "mc_sim_7b_63"  # the paper's: the default on a GPU until calibrated
CPU_DEFAULT_TREE = "small_7"  # the default on a CPU without a calibrated tree
# the calibrated trees a checkpoint may ship, by device type ("cuda": any GPU)
CALIBRATED_TREE_FILES = {"cpu": "calibrated_tree_cpu.json", "cuda": "calibrated_tree.json"}
# the policy tables (tree per batch size, measured on such a device) a checkpoint may ship
TREE_POLICY_FILES = {"cpu": "tree_policy_cpu.json", "cuda": "tree_policy_cuda.json"}


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
    offsets: torch.Tensor | None = None  # [2, T]: depths over arange(T) (Transformer.step)

    def __post_init__(self):
        import torch

        if self.offsets is None:
            slots = torch.arange(self.depths.shape[0], device=self.depths.device)
            self.offsets = torch.stack([self.depths, slots.to(self.depths.dtype)])

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
        import torch

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
    import torch

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


def load_tree(tree: str | os.PathLike) -> list[list[int]]:
    """The paths of a tree given by name (``TREES``) or by a JSON file: a list of paths, or an
    object with "choices" (what ``tree calibrate`` writes). Errors name the name or the file."""
    if str(tree) in TREES:
        return [list(p) for p in TREES[str(tree)]]
    if not os.path.isfile(tree):
        raise ValueError(f"tree {str(tree)!r} is neither a known tree {sorted(TREES)} nor a file")
    try:
        with open(tree, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tree file {str(tree)!r}: not a readable JSON file ({e})") from None
    if isinstance(data, dict):
        if "choices" not in data:
            raise ValueError(f"tree file {str(tree)!r}: a JSON object needs a \"choices\" key (the "
                             f"list of paths), found keys {sorted(data)[:8]}")
        data = data["choices"]
    if not isinstance(data, list):
        raise ValueError(f"tree file {str(tree)!r}: expected a list of paths or "
                         f"{{\"choices\": [...]}}, got a JSON {type(data).__name__}")
    try:
        validate_choices(data)
    except ValueError as e:
        raise ValueError(f"tree file {str(tree)!r}: {e}") from None
    return data


def fit_choices(choices: Sequence[Sequence[int]], num_heads: int | None = None,
                vocab_size: int | None = None) -> list[list[int]]:
    """``choices`` cut to a model: paths deeper than ``num_heads`` and paths through a rank >=
    ``vocab_size`` dropped (a kept path's prefixes are kept too, so the result is a tree)."""
    return [list(p) for p in choices if (num_heads is None or len(p) <= num_heads)
            and (vocab_size is None or max(p) < vocab_size)]


def check_fits(choices: Sequence[Sequence[int]], label: str, num_heads: int | None,
               vocab_size: int | None) -> None:
    """A clear error, naming the tree, when ``choices`` is deeper than the heads or asks a head
    for more ranks than the vocabulary holds."""
    try:
        validate_choices(choices, num_heads)
    except ValueError as e:
        raise ValueError(f"tree {label!r}: {e}") from None
    width = 1 + max((max(p) for p in choices), default=-1)
    if vocab_size is not None and width > vocab_size:
        path = next(list(p) for p in choices if max(p) >= vocab_size)
        raise ValueError(
            f"tree {label!r}: path {path} asks a head for its top-{width} but the vocabulary has "
            f"only V = {vocab_size} tokens (use a tree with ranks < {vocab_size}, or the default "
            "tree, which is cut to fit)"
        )


def _shipped(files: dict[str, str], device, model_dir) -> str | None:
    """The file ``files[device type]`` in ``model_dir`` or the directory above it, or None."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if model_dir is None:
        return None
    model_dir = os.path.abspath(model_dir)
    for folder in (model_dir, os.path.dirname(model_dir)):
        candidate = os.path.join(folder, files[kind])
        if os.path.isfile(candidate):
            return candidate
    return None


def default_tree(device: torch.device | str = "cpu", model_dir: str | os.PathLike | None = None
                 ) -> str:
    """The tree to use when none is given and no policy table is shipped (a name in ``TREES``
    or a shipped file's path), by device type: the checkpoint's calibrated tree for it
    (``CALIBRATED_TREE_FILES``, looked for in ``model_dir`` then the directory above it) if it
    ships one, else ``mc_sim_7b_63`` on a GPU and ``small_7`` on a CPU."""
    shipped = _shipped(CALIBRATED_TREE_FILES, device, model_dir)
    if shipped is not None:
        return shipped
    return DEFAULT_TREE if str(device).startswith("cuda") else CPU_DEFAULT_TREE


def default_policy_file(device: torch.device | str = "cpu",
                        model_dir: str | os.PathLike | None = None) -> str | None:
    """The checkpoint's policy table for the device type (``TREE_POLICY_FILES``, in
    ``model_dir`` or the directory above it), or None: then ``default_tree`` applies."""
    return _shipped(TREE_POLICY_FILES, device, model_dir)


def tree_label(tree) -> str:
    """A short name for messages and reports: the tree's name, its file's name, or "custom"."""
    if isinstance(tree, (str, os.PathLike)):
        return os.path.basename(str(tree)) if str(tree) not in TREES else str(tree)
    return "custom"


def resolve_choices(tree: str | os.PathLike | Sequence[Sequence[int]] | None,
                    num_heads: int | None = None, vocab_size: int | None = None
                    ) -> list[list[int]]:
    """A tree given by name (``TREES``), by a JSON file (a list, or {"choices": [...]}), or as
    a list of paths; None gives the paper's ``mc_sim_7b_63``, cut to ``num_heads`` levels and
    ``vocab_size`` ranks when given (a tree asked for by name or file is kept whole: too deep
    is an error later)."""
    if tree is None:
        return fit_choices(TREES[DEFAULT_TREE], num_heads, vocab_size)
    if isinstance(tree, (str, os.PathLike)):
        return load_tree(tree)
    if isinstance(tree, (bytes, bytearray)) or not isinstance(tree, Sequence):
        raise ValueError(f"tree must be a name in {sorted(TREES)}, a JSON file or a list of "
                         f"paths, got {type(tree).__name__}")
    validate_choices(tree)
    return [list(p) for p in tree]
