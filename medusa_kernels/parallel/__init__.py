"""Tensor parallelism for the decoder and the Medusa heads on torch.distributed (NCCL on GPUs,
gloo on CPUs), launched by ``torchrun``.

- ``group``: ``TPGroup`` (this rank's rank, world and process group; ``SINGLE`` is one process
  and every collective is then free), ``init_tp``, ``rank_device``, ``launched_world``
  (torchrun's WORLD_SIZE), ``check_device`` (NCCL with CUDA tensors, gloo with CPU ones),
  ``sync_random_state`` (rank 0's torch random state on every rank).
- ``layout``: which slice of each transformers tensor a rank holds (``TPLayout.shard`` ->
  ``Shard``; ``VocabLayout`` for Medusa heads alone): attention by KV-head groups, MLP by
  intermediate chunks, embedding / lm_head / Medusa head projections by vocabulary rows; a
  ValueError naming the config.json key when num_key_value_heads, num_attention_heads or
  intermediate_size do not divide by the world size (a vocabulary need not: ranks then hold
  V // N or V // N + 1 rows).
- ``load``: ``read_shards`` / ``iter_shards`` read only those slices from safetensors files.
- ``layers``: ``row_parallel_linear`` (all-reduce, then the bias once).
- ``vocab``: vocabulary-parallel embedding, logits gather, and the exact top-k merge across
  ranks (per-rank top-k lists with global ids; ties to the lower global id).

One decoder layer costs two all-reduces of [B, T, d]: after o_proj and after down_proj, each
inside its module (``row_parallel_linear``) so the residual stream, and Gemma's post-attention /
post-feedforward norms that act on it, see the full sums. Tree attention and KV compaction are
rank-local (each rank caches its KV heads); acceptance runs identically on every rank. The
decoder that uses these pieces is ``model.Transformer(cfg, tp)``, loaded by
``checkpoint.load_model(..., tp=True)``.
"""

from .group import (
    SINGLE,
    TPGroup,
    check_device,
    destroy_group,
    group_ending,
    init_tp,
    launched_world,
    rank_device,
    sync_random_state,
)
from .layers import row_parallel_linear
from .layout import WHOLE, Shard, TPLayout, VocabLayout, even_range, tensor_rule, vocab_range
from .load import ReadStats, iter_shards, read_shards
from .vocab import (
    gather_vocab,
    keys_topk,
    lm_head_topk_parallel,
    medusa_heads_topk_parallel,
    merge_topk,
    merge_topk_keys,
    shard_topk,
    topk_keys,
    vocab_parallel_embedding,
)

__all__ = [
    "SINGLE",
    "WHOLE",
    "ReadStats",
    "Shard",
    "TPGroup",
    "TPLayout",
    "VocabLayout",
    "check_device",
    "destroy_group",
    "even_range",
    "gather_vocab",
    "group_ending",
    "init_tp",
    "iter_shards",
    "keys_topk",
    "launched_world",
    "lm_head_topk_parallel",
    "medusa_heads_topk_parallel",
    "merge_topk",
    "merge_topk_keys",
    "rank_device",
    "read_shards",
    "row_parallel_linear",
    "shard_topk",
    "sync_random_state",
    "tensor_rule",
    "topk_keys",
    "vocab_parallel_embedding",
    "vocab_range",
]
