"""Training forward and losses: a cache-free causal forward of the decoder, Medusa head losses,
the backbone's LM / distillation losses and per-rank head accuracies.

Losses are returned as sums over positions; the trainer divides by the global (all ranks, all
micro-batches) count so that any sharding of a global batch gives the same gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..heads import MedusaHeads
from ..model import Transformer, causal_attention
from .data import shifted_targets


def causal_hidden(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                  segments: torch.Tensor | None = None, frozen_layers: int = 0) -> torch.Tensor:
    """Final normed hidden [B, T, d] of tokens [B, T], causal, no KV cache, autograd-friendly.

    The decoder's own layers (every family), with ``causal_attention`` in place of the cache.
    positions [B, T] (default 0..T-1); segments [B, T]: tokens attend only to earlier tokens of
    their own segment (packed rows; padding = -1 attends among itself and is ignored). The
    embedding and the first ``frozen_layers`` layers run without autograd (frozen prefix).
    """
    B, T = tokens.shape
    if positions is None:
        positions = torch.arange(T, device=tokens.device).expand(B, T)
    mask = None
    if segments is not None:
        mask = (segments[:, :, None] == segments[:, None, :])[:, None]  # [B, 1, T, T]
    cfg = model.cfg

    def attend(attn, q, k, v):
        return causal_attention(q, k, v, cfg.softmax_scale, attn.window, cfg.attn_softcap, mask)

    with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_layers == 0):
        x = model.embed_tokens(tokens)
    ropes = model.rope(positions, positions.max(dim=1).values + 1, x.dtype)
    for i, layer in enumerate(model.layers):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= frozen_layers):
            x = layer(x, *ropes[layer.attention.rope], attend)
    return model.norm(x)


def head_logits(heads: MedusaHeads, hidden: torch.Tensor, k: int) -> torch.Tensor:
    """Head k's logits for hidden [N, d] -> [N, R] over its draft vocabulary (column j: token
    ``heads.token_map[j]``; R = V without a map)."""
    return heads.head_logits(hidden, k)


def heads_loss_sums(heads: MedusaHeads, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-head cross-entropy sums [K]: head k at position t against token t + k + 2.

    With a trimmed vocabulary the cross-entropy is over the R draft tokens and positions whose
    target is not among them add nothing (no row can predict it; they still count in the
    position totals). Runs every head even when it has no valid position (an empty selection),
    so every parameter takes part in the graph (DDP needs that).
    """
    sums = []
    for k in range(heads.num_heads):
        valid, labels = shifted_targets(batch, k + 2)
        logits = upcast(head_logits(heads, hidden[valid], k))
        target = heads.token_rows(labels[valid])
        sums.append(F.cross_entropy(logits, target, ignore_index=-1, reduction="sum"))
    return torch.stack(sums)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 at least (fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def topk_kl_sum(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Sum over N positions of KL(teacher || student) on the teacher's top-k tokens plus one
    "rest of the vocabulary" bucket: an exact KL of the two coarsened distributions, zero when
    they agree, the full KL when k = V.

    student_logits [N, V]; teacher_ids [N, k]; teacher_logprobs [N, k] (log-probabilities over
    the full vocabulary; -inf marks an unused slot).
    """
    lq = upcast(student_logits).log_softmax(-1).gather(-1, teacher_ids)
    lp = teacher_logprobs.to(lq.dtype)
    p = lp.exp()
    top = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest = (1 - lq.exp().sum(-1)).clamp(min=1e-30)
    rest = torch.where(p_rest > 1e-6, p_rest * (p_rest.clamp(min=1e-30).log() - q_rest.log()),
                       0.0)
    return (top + rest).sum()


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over N positions of KL(softmax(teacher) || softmax(student)); [N, V] each."""
    return F.kl_div(upcast(student_logits).log_softmax(-1),
                    upcast(teacher_logits).log_softmax(-1), log_target=True, reduction="sum")


@torch.no_grad()
def rank_hits(heads: MedusaHeads, base: Transformer, hidden: torch.Tensor, batch: dict,
              topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hit counts: (hits [K + 1, topk], counts [K + 1], loss sums [K + 1]).

    Row 0 is the base lm_head (token t + 1), row k + 1 is head k (token t + k + 2); hits[j, r]
    counts positions whose rank-r token (descending logits) is the label.
    """
    K = heads.num_heads
    hits = torch.zeros(K + 1, topk, dtype=torch.float64, device=hidden.device)
    counts = torch.zeros(K + 1, dtype=torch.float64, device=hidden.device)
    losses = torch.zeros(K + 1, dtype=torch.float64, device=hidden.device)
    for j in range(K + 1):
        valid, labels = shifted_targets(batch, j + 1)
        h = hidden[valid]
        logits = (base.logits(h) if j == 0 else head_logits(heads, h, j - 1)).float()
        y = labels[valid]
        idx = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices
        target = y
        if j > 0:  # draft columns -> token ids; targets outside a token map: a miss, no loss
            idx, target = heads.to_token_ids(idx), heads.token_rows(y)
        hits[j, :idx.shape[1]] = (idx == y[:, None]).double().sum(0)
        counts[j] = y.numel()
        losses[j] = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum").double()
    return hits, counts, losses
