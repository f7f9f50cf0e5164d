"""The kernel boundary: every hot op of the Medusa step, each with a ``backend=`` choice.

Each op module holds the plain PyTorch reference (``*_ref``), the fast kernels and the public
function, registered as a ``torch.library`` custom op so torch.compile and CUDA graphs see it.
"""

from .acceptance import accept_greedy, accept_greedy_ids, accept_typical, sample_tokens
from .compact_kv import compact_kv_cache, compact_kv_cache_ref
from .heads_topk import lm_head_topk, lm_head_topk_ref, medusa_heads_topk, medusa_heads_topk_ref
from .sampling import accept_exact, accept_exact_ids, filter_logits, sample_logits, sampling_probs
from .shared_heads_topk import shared_heads_topk, shared_heads_topk_ref
from .tree_attention import (
    pack_tree_mask,
    tree_attention,
    tree_attention_ref,
    unpack_tree_mask,
)

__all__ = [
    "accept_exact",
    "accept_exact_ids",
    "accept_greedy",
    "accept_greedy_ids",
    "accept_typical",
    "compact_kv_cache",
    "compact_kv_cache_ref",
    "filter_logits",
    "lm_head_topk",
    "lm_head_topk_ref",
    "medusa_heads_topk",
    "medusa_heads_topk_ref",
    "pack_tree_mask",
    "sample_logits",
    "sample_tokens",
    "sampling_probs",
    "shared_heads_topk",
    "shared_heads_topk_ref",
    "tree_attention",
    "tree_attention_ref",
    "unpack_tree_mask",
]
