"""Medusa heads: K extra decoding heads on the base model's final (normed) hidden state.

Head k = ``num_layers`` ResBlocks ``h <- h + SiLU(W1 h + b1)`` (each its own weights), then a
vocabulary projection. Head k (0-based) guesses the token k + 2 positions after the hidden
state's own position (the base lm_head guesses k + 1 = 1).

Two kinds (``kind``):

- ``"separate"`` (the public Medusa heads): every head its own ``Linear(d, R, bias=False)``,
  stacked as w2 [K, R, d]. With one ResBlock layer the top-k goes through
  ``ops.medusa_heads_topk``.
- ``"shared"``: every head ends in the base model's own lm_head (frozen; with tied embeddings
  the embedding), attached after loading (``attach_lm_head``); the heads hold only their
  ResBlocks (K * L * (d^2 + d) parameters). The top-k goes through ``ops.shared_heads_topk``
  (one pass over the projection for all K heads).

Trimmed vocabulary (``token_map``: [R] int64, strictly ascending token ids, R < V): the heads
draft only those R tokens (FR-Spec's frequent-token drafting). Separate heads then hold R rows
per head; shared heads read the lm_head's rows ``lm_head[token_map]``, gathered once into a
contiguous copy when the lm_head is attached (see ``ops/shared_heads_topk.py`` for why a copy and
not a gather in the kernel). ``topk`` returns token ids; ``forward`` returns logits over the R
draft rows (column j is token ``token_map[j]``). Verification is the base model's, so greedy
decoding stays lossless and exact sampling exact whatever the heads draft.

Deeper heads (``num_layers`` > 1) run their ResBlocks in PyTorch; shared heads then still take
one fused pass over the projection (``ops.lm_head_topk`` over the N * K rows).

Tensor parallelism (``tp``): ResBlocks are whole on every rank; projections are split by
vocabulary rows as the lm_head is. Separate heads: rank r holds ``vocab_range(R, world, r)`` of
every head's rows (and those rows' token ids); shared heads: the rank's lm_head rows, so
``attach_lm_head`` takes the rank's lm_head slice [Vr, d] and keeps the map's ids that fall in
it. Each rank runs the fused top-k on its rows and ``parallel.merge_topk``'s key merge combines
the lists exactly (ties to the lower token id), so ``topk`` returns on every rank what one
process returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import lm_head_topk, medusa_heads_topk, shared_heads_topk
from .ops.heads_topk import topk_lower_index_first
from .ops.shared_heads_topk import check_token_map
from .parallel import (
    SINGLE,
    TPGroup,
    gather_vocab,
    keys_topk,
    merge_topk_keys,
    topk_keys,
    vocab_range,
)

HEAD_KINDS = ("separate", "shared")
_EMPTY_KEY = -(2**63)  # pads a rank's short candidate list (parallel/vocab.py's key order)


class MedusaHeads(nn.Module):
    """K Medusa heads of ``kind`` "separate" or "shared", optionally over a trimmed vocabulary.

    ``token_map``: None (the whole vocabulary), a [R] int64 tensor of strictly ascending token
    ids, or an int R (the size only, for loaders that fill the buffer afterwards).
    """

    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int,
                 tp: TPGroup = SINGLE, *, kind: str = "separate",
                 token_map: torch.Tensor | int | None = None):
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(
                f"MedusaHeads needs num_heads >= 1 and num_layers >= 1, got {num_heads}, "
                f"{num_layers}"
            )
        if kind not in HEAD_KINDS:
            raise ValueError(f"kind must be one of {HEAD_KINDS}, got {kind!r}")
        rows = vocab_size
        if token_map is not None:
            rows = token_map if isinstance(token_map, int) else int(token_map.shape[0]) \
                if isinstance(token_map, torch.Tensor) and token_map.dim() == 1 else -1
            if isinstance(token_map, bool) or not 1 <= rows <= vocab_size:
                raise ValueError(f"token_map must be an int R or a 1-D tensor of R token ids with "
                                 f"1 <= R <= vocab_size = {vocab_size}, got {token_map!r}")
        if rows < tp.world:
            raise ValueError(f"tensor parallelism over {tp.world} ranks needs a draft vocabulary "
                             f">= {tp.world} rows, got {rows}")
        self.num_heads, self.num_layers, self.tp, self.kind = num_heads, num_layers, tp, kind
        self._vocab_size = vocab_size
        # shared kind: (projection [R_local, d], token ids [R_local] or None, row offset); a
        # plain attribute, not a parameter or buffer: never trained, saved, or moved by .to()
        self._shared: tuple[torch.Tensor, torch.Tensor | None, int] | None = None
        self.w1 = nn.Parameter(torch.zeros(num_heads, num_layers, hidden_size, hidden_size))
        self.b1 = nn.Parameter(torch.zeros(num_heads, num_layers, hidden_size))
        if kind == "separate":
            start, stop = vocab_range(rows, tp.world, tp.rank)
            self.w2 = nn.Parameter(torch.empty(num_heads, stop - start, hidden_size))
            nn.init.normal_(self.w2, std=hidden_size**-0.5)
        else:
            self.register_parameter("w2", None)
        if token_map is None:
            self.register_buffer("token_map", None)
        else:
            self.register_buffer("token_map", torch.zeros(rows, dtype=torch.int64))
            if isinstance(token_map, torch.Tensor):
                self.set_token_map(token_map)

    # ------------------------------------------------------------------ sizes

    @property
    def hidden_size(self) -> int:
        return self.w1.shape[-1]

    @property
    def vocab_size(self) -> int:
        """The whole vocabulary V of the base model."""
        return self._vocab_size

    @property
    def draft_vocab(self) -> int:
        """R: the tokens the heads can draft (the token map's size, else V)."""
        return self.token_map.shape[0] if self.token_map is not None else self._vocab_size

    def set_token_map(self, token_map: torch.Tensor) -> None:
        """Fill the token map buffer ([R] int64, strictly ascending, in [0, V))."""
        if self.token_map is None:
            raise ValueError("these heads were built without a token map (token_map=None)")
        check_token_map("token_map", token_map.cpu(), self.token_map.shape[0], self._vocab_size)
        with torch.no_grad():
            self.token_map.copy_(token_map)
        if self._shared is not None:  # the gathered rows follow the map
            self._shared = None

    def projection_bytes(self, num_heads: int | None = None) -> int:
        """Bytes of projection weights one ``topk`` reads (this rank): K * R * d for separate
        heads, R * d once for shared heads (ResBlocks: ``resblock_bytes``)."""
        heads = num_heads or self.num_heads
        if self.kind == "separate":
            return self.w2[:heads].numel() * self.w2.element_size()
        if self._shared is None:
            rows = -(-self.draft_vocab // self.tp.world)
            return rows * self.hidden_size * self.w1.element_size()
        proj = self._shared[0]
        return proj.numel() * proj.element_size()

    def resblock_bytes(self, num_heads: int | None = None) -> int:
        heads = num_heads or self.num_heads
        return (self.w1[:heads].numel() + self.b1[:heads].numel()) * self.w1.element_size()

    # ------------------------------------------------------------------ projections

    def attach_lm_head(self, weight: torch.Tensor) -> None:
        """Shared heads: take the base model's lm_head (this rank's rows [Vr, d] under tensor
        parallelism; with tied embeddings the embedding). With a token map, its rows are
        gathered once into a contiguous [R_local, d] copy; else the weight itself is used.
        Call again after moving or casting the base model."""
        if self.kind != "shared":
            raise ValueError("attach_lm_head: only shared heads use the base lm_head")
        start, stop = vocab_range(self._vocab_size, self.tp.world, self.tp.rank)
        if weight.dim() != 2 or tuple(weight.shape) != (stop - start, self.hidden_size):
            raise ValueError(f"attach_lm_head: weight must be [{stop - start}, "
                             f"{self.hidden_size}] (this rank's lm_head rows [Vr, d]), got "
                             f"{tuple(weight.shape)}")
        weight = weight.detach()
        if self.token_map is None:
            self._shared = (weight, None, start)
            return
        ids = self.token_map.to(weight.device)
        ids = ids[(ids >= start) & (ids < stop)]
        self._shared = (weight[ids - start].contiguous(), ids, 0)

    def _projection(self, heads: int, device: torch.device):
        """(weight: [K, Rl, d] separate / [Rl, d] shared, token ids [Rl] or None, offset):
        this rank's projection rows and how a row index becomes a token id."""
        if self.kind == "separate":
            if self.token_map is None:
                start = vocab_range(self._vocab_size, self.tp.world, self.tp.rank)[0]
                return self.w2[:heads], None, start
            start, stop = vocab_range(self.draft_vocab, self.tp.world, self.tp.rank)
            return self.w2[:heads], self.token_map[start:stop], 0
        if self._shared is None:
            raise ValueError("shared Medusa heads need the base model's lm_head: "
                             "heads.attach_lm_head(model.lm_head.weight) (load_model does it)")
        proj = self._shared[0]
        if proj.device != device:
            raise ValueError(f"the attached lm_head is on {proj.device}, the hidden states on "
                             f"{device}: attach_lm_head again after moving the model")
        return self._shared

    def init_from_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Medusa's initialisation: ResBlocks zero (identity), so a fresh head predicts what the
        base lm_head predicts. Separate heads copy the lm_head (its token-map rows) into every
        head's projection; shared heads attach it. ``lm_head_weight``: this rank's rows."""
        with torch.no_grad():
            self.w1.zero_()
            self.b1.zero_()
        if self.kind == "shared":
            self.attach_lm_head(lm_head_weight)
            return
        rows = lm_head_weight
        if self.token_map is not None:
            if self.tp.world > 1:
                raise ValueError("init_from_lm_head: trimmed separate heads initialise in one "
                                 "process")
            rows = lm_head_weight[self.token_map.to(lm_head_weight.device)]
        with torch.no_grad():
            self.w2.copy_(rows[None].expand_as(self.w2))

    # ------------------------------------------------------------------ math

    def _resblocks(self, hidden: torch.Tensor, layers: range, heads: int) -> torch.Tensor:
        """hidden [..., d] -> [..., K, d] after ResBlock ``layers`` of the first K heads."""
        hidden = hidden.unsqueeze(-2).expand(*hidden.shape[:-1], heads, self.hidden_size)
        for layer in layers:
            w1, b1 = self.w1[:heads, layer], self.b1[:heads, layer]
            hidden = hidden + F.silu(torch.einsum("...kd,ked->...ke", hidden, w1) + b1)
        return hidden

    def head_logits(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """Head k's logits over this rank's draft rows: hidden [N, d] -> [N, Rl] (training)."""
        h = hidden
        for layer in range(self.num_layers):
            h = h + F.silu(F.linear(h, self.w1[k, layer], self.b1[k, layer]))
        weight = self._projection(self.num_heads, hidden.device)[0]
        return F.linear(h, weight[k] if self.kind == "separate" else weight.to(h.dtype))

    def _local_logits(self, hidden: torch.Tensor, heads: int) -> torch.Tensor:
        """hidden [..., d] -> this rank's logits [..., K, Rl] (all R for one process)."""
        h = self._resblocks(hidden, range(self.num_layers), heads)
        weight = self._projection(heads, hidden.device)[0]
        if self.kind == "separate":
            return torch.einsum("...kd,kvd->...kv", h, weight)
        return h @ weight.to(h.dtype).T

    def forward(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """Full logits over the draft vocabulary: hidden [..., d] -> [..., K, R] (column j:
        token ``token_map[j]``, or j without a map). Training and the reference path; gathered
        over the ranks under tensor parallelism (trimmed shared heads: each rank's share of the
        map, uneven), without autograd through them."""
        logits = self._local_logits(hidden, num_heads or self.num_heads)
        if self.tp.world == 1:
            return logits
        if self.kind == "shared" and self.token_map is not None:
            return self._gather_map_columns(logits.contiguous())
        return gather_vocab(logits.contiguous(), self.tp, self.draft_vocab)

    def _gather_map_columns(self, logits: torch.Tensor) -> torch.Tensor:
        """Trimmed shared heads under tensor parallelism: each rank holds the map's ids in its
        vocabulary rows (an uneven share); pad to the widest, all-gather, and concatenate in
        rank order, which is map order (the map ascends, the ranks' rows too)."""
        tmap, world, V = self.token_map, self.tp.world, self._vocab_size
        counts = [int(((tmap >= a) & (tmap < b)).sum())
                  for a, b in (vocab_range(V, world, r) for r in range(world))]
        widest = max(counts)
        padded = F.pad(logits, (0, widest - logits.shape[-1]))
        gathered = self.tp.all_gather(padded)  # [world, ..., widest]
        return torch.cat([gathered[r, ..., :counts[r]] for r in range(world)], dim=-1)

    def to_token_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary columns (of ``forward``) -> token ids."""
        return rows if self.token_map is None else self.token_map[rows]

    def token_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> their draft-vocabulary column, -1 where the map lacks the token."""
        if self.token_map is None:
            return tokens
        tmap = self.token_map.to(tokens.device)
        pos = torch.searchsorted(tmap, tokens).clamp(max=tmap.shape[0] - 1)
        return torch.where(tmap[pos] == tokens, pos, -1)

    def topk(self, hidden: torch.Tensor, k: int, num_heads: int | None = None):
        """Top-k of the first ``num_heads`` heads: hidden [N, d] -> (values [N, K, k] float32,
        token ids [N, K, k] int64), sorted descending, ties to the lower id (under tensor
        parallelism: merged over the ranks, the same on every rank). 1 <= k <= R."""
        heads = num_heads or self.num_heads
        if not 1 <= heads <= self.num_heads:
            raise ValueError(f"num_heads must lie in [1, {self.num_heads}], got {heads}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.draft_vocab:
            raise ValueError(f"k must be an int in [1, {self.draft_vocab}] (the heads' draft "
                             f"vocabulary), got {k!r}")
        weight, ids, offset = self._projection(heads, hidden.device)
        rows = weight.shape[-2]
        kk = min(k, rows)
        N = hidden.shape[0]
        if kk == 0:  # this rank holds none of the map's tokens
            values = hidden.new_empty(N, heads, 0, dtype=torch.float32)
            indices = hidden.new_empty(N, heads, 0, dtype=torch.int64)
        elif self.num_layers == 1:
            w1, b1 = self.w1[:heads, 0], self.b1[:heads, 0]
            if self.kind == "separate":
                values, indices = medusa_heads_topk(hidden, w1, b1, weight, kk)
            else:
                values, indices = shared_heads_topk(hidden, w1, b1, weight, kk)
        elif self.kind == "separate":
            values, indices = topk_lower_index_first(self._local_logits(hidden, heads).float(),
                                                     kk)
        else:  # deeper shared heads: ResBlocks in PyTorch, then one pass for all heads
            h = self._resblocks(hidden, range(self.num_layers), heads).to(weight.dtype)
            values, indices = lm_head_topk(h.reshape(N * heads, -1).contiguous(), weight, kk)
            values, indices = values.view(N, heads, kk), indices.view(N, heads, kk)
        if ids is not None:
            indices = ids[indices]
        elif offset:
            indices = indices + offset
        if self.tp.world == 1:
            return values, indices
        return _merge_ranks(values, indices, self.tp, k)


def _merge_ranks(values: torch.Tensor, ids: torch.Tensor, tp: TPGroup, k: int):
    """Every rank's top-k' (k' <= k, token ids) -> the top-k over all ranks (one all-gather of
    k int64 keys per row and rank; short lists padded with keys that sort last)."""
    keys = topk_keys(values, ids)
    if keys.shape[-1] < k:
        keys = torch.cat([keys, keys.new_full((*keys.shape[:-1], k - keys.shape[-1]),
                                              _EMPTY_KEY)], -1)
    return keys_topk(merge_topk_keys(tp.all_gather(keys), k))
