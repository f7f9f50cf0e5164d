"""medusa_kernels: fused GPU kernels and a thin PyTorch decoder for Medusa decoding."""

from .ops import (
    accept_greedy,
    accept_typical,
    compact_kv_cache,
    medusa_heads_topk,
    sample_tokens,
    tree_attention,
)

__version__ = "0.1.0"

__all__ = [
    "accept_greedy",
    "accept_typical",
    "compact_kv_cache",
    "medusa_heads_topk",
    "sample_tokens",
    "tree_attention",
]
