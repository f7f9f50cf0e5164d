"""The kernel boundary: every hot op of the Medusa step, each with a ``backend=`` choice.

Each op module holds the plain PyTorch reference (``*_ref``), the fast kernels and the public
function, registered as a ``torch.library`` custom op so torch.compile and CUDA graphs see it.
"""

from .acceptance import accept_greedy, accept_greedy_ids, accept_typical, sample_tokens
from .activation import ACTIVATIONS, gated_act, gated_act_ref
from .compact_kv import compact_kv_cache, compact_kv_cache_ref
from .embedding import embedding, embedding_ref
from .heads_topk import lm_head_topk, lm_head_topk_ref, medusa_heads_topk, medusa_heads_topk_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rotary import rope_kv_write, rope_kv_write_ref
from .sampling import accept_exact, accept_exact_ids, filter_logits, sample_logits, sampling_probs
from .shared_heads_topk import shared_heads_topk, shared_heads_topk_ref
from .tree_attention import (
    pack_tree_mask,
    tree_attention,
    tree_attention_ref,
    unpack_tree_mask,
)

__all__ = [
    "ACTIVATIONS",
    "accept_exact",
    "accept_exact_ids",
    "accept_greedy",
    "accept_greedy_ids",
    "accept_typical",
    "compact_kv_cache",
    "compact_kv_cache_ref",
    "embedding",
    "embedding_ref",
    "filter_logits",
    "gated_act",
    "gated_act_ref",
    "lm_head_topk",
    "lm_head_topk_ref",
    "medusa_heads_topk",
    "medusa_heads_topk_ref",
    "pack_tree_mask",
    "rms_norm",
    "rms_norm_ref",
    "rope_kv_write",
    "rope_kv_write_ref",
    "sample_logits",
    "sample_tokens",
    "sampling_probs",
    "shared_heads_topk",
    "shared_heads_topk_ref",
    "tree_attention",
    "tree_attention_ref",
    "unpack_tree_mask",
]
