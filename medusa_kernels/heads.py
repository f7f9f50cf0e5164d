"""Medusa heads: K extra decoding heads on the base model's final (normed) hidden state.

Head k = ``num_layers`` ResBlocks ``h <- h + SiLU(W1 h + b1)`` (each its own weights), then its
own ``Linear(d, V, bias=False)``. Head k (0-based) guesses the token k + 2 positions after the
hidden state's own position (the base lm_head guesses k + 1 = 1).

Weights are stacked so the fused op reads them directly: w1 [K, L, d, d], b1 [K, L, d],
w2 [K, V, d]. With one ResBlock layer (the public checkpoints) the top-k goes through
``ops.medusa_heads_topk``; deeper heads run their extra layers in PyTorch first.

Under tensor parallelism (``tp``) w2 holds this rank's vocabulary rows [K, Vr, d] (the
ResBlocks are whole on every rank): each rank runs the fused top-k on its rows and
``parallel.merge_topk`` merges the per-rank lists exactly (one all-gather of k int64 keys per
head and token), so ``topk`` returns on every rank what one process returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import medusa_heads_topk
from .ops.heads_topk import topk_lower_index_first
from .parallel import (
    SINGLE,
    TPGroup,
    gather_vocab,
    medusa_heads_topk_parallel,
    shard_topk,
    vocab_range,
)


class MedusaHeads(nn.Module):
    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int,
                 tp: TPGroup = SINGLE):
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(
                f"MedusaHeads needs num_heads >= 1 and num_layers >= 1, got {num_heads}, "
                f"{num_layers}"
            )
        if vocab_size < tp.world:
            raise ValueError(f"tensor parallelism over {tp.world} ranks needs vocab_size >= "
                             f"{tp.world}, got {vocab_size}")
        self.num_heads, self.num_layers, self.tp = num_heads, num_layers, tp
        self._vocab_size = vocab_size
        start, stop = vocab_range(vocab_size, tp.world, tp.rank)
        self.w1 = nn.Parameter(torch.zeros(num_heads, num_layers, hidden_size, hidden_size))
        self.b1 = nn.Parameter(torch.zeros(num_heads, num_layers, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_heads, stop - start, hidden_size))
        nn.init.normal_(self.w2, std=hidden_size**-0.5)

    @property
    def hidden_size(self) -> int:
        return self.w2.shape[2]

    @property
    def vocab_size(self) -> int:
        """The whole vocabulary V (w2 holds ``vocab_range(V, world, rank)`` of it)."""
        return self.w2.shape[1] if self.tp.world == 1 else self._vocab_size

    def init_from_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Medusa's initialisation: ResBlocks zero (identity) and every head's projection a copy
        of the base lm_head, so a fresh head predicts what the base model predicts."""
        with torch.no_grad():
            self.w1.zero_()
            self.b1.zero_()
            self.w2.copy_(lm_head_weight[None].expand_as(self.w2))

    def _resblocks(self, hidden: torch.Tensor, layers: range, heads: int) -> torch.Tensor:
        """hidden [..., d] -> [..., K, d] after ResBlock ``layers`` of the first K heads."""
        hidden = hidden.unsqueeze(-2).expand(*hidden.shape[:-1], heads, self.hidden_size)
        for layer in layers:
            w1, b1 = self.w1[:heads, layer], self.b1[:heads, layer]
            hidden = hidden + F.silu(torch.einsum("...kd,ked->...ke", hidden, w1) + b1)
        return hidden

    def _local_logits(self, hidden: torch.Tensor, heads: int) -> torch.Tensor:
        """hidden [..., d] -> this rank's logits [..., K, Vr] (all V for one process)."""
        h = self._resblocks(hidden, range(self.num_layers), heads)
        return torch.einsum("...kd,kvd->...kv", h, self.w2[:heads])

    def forward(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """Full logits: hidden [..., d] -> [..., K, V] (training and the reference path;
        gathered over the ranks under tensor parallelism, without autograd through them)."""
        logits = self._local_logits(hidden, num_heads or self.num_heads)
        if self.tp.world == 1:
            return logits
        return gather_vocab(logits.contiguous(), self.tp, self._vocab_size)

    def topk(self, hidden: torch.Tensor, k: int, num_heads: int | None = None):
        """Top-k of the first ``num_heads`` heads: hidden [N, d] -> (values [N, K, k] float32,
        indices [N, K, k] int64), sorted descending, ties to the lower index (under tensor
        parallelism: merged over the ranks, the same on every rank)."""
        heads = num_heads or self.num_heads
        if not 1 <= heads <= self.num_heads:
            raise ValueError(f"num_heads must lie in [1, {self.num_heads}], got {heads}")
        tp, V = self.tp, self.vocab_size
        if self.num_layers == 1:
            w1, b1, w2 = self.w1[:heads, 0], self.b1[:heads, 0], self.w2[:heads]
            if tp.world > 1:
                return medusa_heads_topk_parallel(hidden, w1, b1, w2, k, tp, V)
            return medusa_heads_topk(hidden, w1, b1, w2, k)
        logits = self._local_logits(hidden, heads).float()
        if tp.world > 1:
            return shard_topk(logits, k, tp, V)
        return topk_lower_index_first(logits, k)
