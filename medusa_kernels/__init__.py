"""medusa_kernels: fused GPU kernels and a thin PyTorch decoder for Medusa decoding.

Kernels (each ``backend="auto" | "torch" | "triton" | "cuda"``): ``tree_attention``,
``medusa_heads_topk``, ``compact_kv_cache``, ``accept_greedy``, ``accept_typical``.
Decoding: ``load_model`` then ``generate``; trees: ``build_tree``, ``TREES``.
"""

from .checkpoint import MedusaModel, load_medusa_heads, load_model, save_medusa_heads
from .decoding import GenerationResult, generate
from .heads import MedusaHeads
from .model import ModelConfig, Transformer
from .ops import (
    accept_greedy,
    accept_greedy_ids,
    accept_typical,
    compact_kv_cache,
    medusa_heads_topk,
    pack_tree_mask,
    sample_tokens,
    tree_attention,
)
from .tree import TREES, TreeBuffers, build_tree

__version__ = "0.1.0"

__all__ = [
    "TREES",
    "GenerationResult",
    "MedusaHeads",
    "MedusaModel",
    "ModelConfig",
    "Transformer",
    "TreeBuffers",
    "accept_greedy",
    "accept_greedy_ids",
    "accept_typical",
    "build_tree",
    "compact_kv_cache",
    "generate",
    "load_medusa_heads",
    "load_model",
    "medusa_heads_topk",
    "pack_tree_mask",
    "sample_tokens",
    "save_medusa_heads",
    "tree_attention",
]
