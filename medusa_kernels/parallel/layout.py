"""Which slice of each weight a tensor-parallel rank holds (Megatron style), as pure functions.

Rank r of N holds:

- attention: KV heads ``[r Hkv/N, (r+1) Hkv/N)`` and the query heads that read them (query head
  h reads KV head ``h // (Hq/Hkv)``, transformers' ``repeat_kv``), so query heads
  ``[r Hq/N, (r+1) Hq/N)``: those rows of q_proj, those KV rows of k_proj and v_proj (and of
  their biases), those columns of o_proj (column-parallel q/k/v, row-parallel o);
- MLP: intermediate rows ``[r I/N, (r+1) I/N)`` of gate_proj and up_proj, those columns of
  down_proj;
- vocabulary: rows ``vocab_range(V, N, r)`` of embed_tokens, lm_head and each Medusa head's
  final projection; V need not divide by N (the first ``V % N`` ranks hold one row more), since
  every vocabulary-parallel result carries global token ids (``vocab.py``);
- everything else whole: norms (input, post-attention, Gemma's pre/post-feedforward, the final
  norm, Qwen3/Gemma-3 q_norm/k_norm), the o_proj and down_proj biases (added once, after the
  all-reduce), the Medusa ResBlocks (d x d each).

Hkv, Hq and I must divide by N: ``TPLayout`` raises a ValueError naming the config.json key
(``num_key_value_heads``, ``num_attention_heads``, ``intermediate_size``) otherwise.

A rule is a ``Shard``: along ``dim`` (0 rows, 1 columns, None: whole), the concatenation of
``ranges``. Fused transformers tensors take several ranges: Phi-3's ``qkv_proj`` [q; k; v]
gives this rank's ``[q_r; k_r; v_r]``, ``gate_up_proj`` [gate; up] its ``[gate_r; up_r]``,
exactly what the separate tensors' slices stacked in that order give.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

Range = tuple[int, int]  # [start, stop)


def vocab_range(vocab_size: int, world: int, rank: int) -> Range:
    """Rows ``[start, stop)`` of a vocabulary of ``vocab_size`` that rank ``rank`` of ``world``
    holds: contiguous, in rank order, sizes differing by at most one (the first
    ``vocab_size % world`` ranks hold one more)."""
    base, extra = divmod(vocab_size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def even_range(size: int, world: int, rank: int, key: str) -> Range:
    """``[rank size/world, (rank+1) size/world)``; ``size`` must divide by ``world``, else a
    ValueError naming the config key ``key``."""
    if size % world:
        divisors = [n for n in range(1, min(size, 64) + 1) if size % n == 0]
        raise ValueError(f"tensor parallelism over {world} ranks needs config.json {key} = "
                         f"{size} to divide by {world}; world sizes that divide it: {divisors}")
    step = size // world
    return rank * step, (rank + 1) * step


@dataclass(frozen=True)
class Shard:
    """The part of one full tensor a rank holds: along ``dim`` (0 rows, 1 columns; None: the
    whole tensor), the ranges ``[start, stop)`` concatenated in order."""

    dim: int | None
    ranges: tuple[Range, ...] = ()

    @property
    def replicated(self) -> bool:
        return self.dim is None

    def local_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of this rank's tensor cut from a full tensor of ``shape``."""
        shape = tuple(shape)
        if self.dim is None:
            return shape
        size = sum(stop - start for start, stop in self.ranges)
        return shape[: self.dim] + (size,) + shape[self.dim + 1:]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's tensor cut from the full one (the reference the file reader matches)."""
        if self.dim is None:
            return full
        parts = [full.narrow(self.dim, start, stop - start) for start, stop in self.ranges]
        return torch.cat(parts, dim=self.dim)


WHOLE = Shard(None)

# (pattern on the transformers tensor name, rule); the first match wins.
_RULES = [
    (r"(^|\.)(embed_tokens|lm_head)\.weight$", "vocab_rows"),
    (r"(^|\.)self_attn\.q_proj\.(weight|bias)$", "q_rows"),
    (r"(^|\.)self_attn\.[kv]_proj\.(weight|bias)$", "kv_rows"),
    (r"(^|\.)self_attn\.qkv_proj\.(weight|bias)$", "qkv_rows"),
    (r"(^|\.)self_attn\.o_proj\.weight$", "q_cols"),
    (r"(^|\.)mlp\.(gate|up)_proj\.(weight|bias)$", "ffn_rows"),
    (r"(^|\.)mlp\.gate_up_proj\.(weight|bias)$", "gate_up_rows"),
    (r"(^|\.)mlp\.down_proj\.weight$", "ffn_cols"),
    # added once after the all-reduce, so every rank holds it whole
    (r"(^|\.)(self_attn\.o_proj|mlp\.down_proj)\.bias$", "whole"),
    (r"norm\.(weight|bias)$", "whole"),  # every RMSNorm (*_layernorm, norm, q_norm, k_norm)
    (r"(^|\.)rotary_emb\.inv_freq$", "whole"),  # stored by old Llama checkpoints, unused
    # Medusa heads: "{head}.{layer}.linear.*" ResBlocks, "{head}.{L}.weight" the projection
    (r"^(medusa_head\.)?\d+\.\d+\.linear\.(weight|bias)$", "whole"),
    (r"^(medusa_head\.)?\d+\.\d+\.weight$", "vocab_rows"),
]
_RULES = [(re.compile(pattern), rule) for pattern, rule in _RULES]


def tensor_rule(name: str) -> str:
    """The rule name of a transformers tensor (``layout.py``'s table); a ValueError for a
    tensor no rule covers, so nothing is silently held whole that should be split."""
    for pattern, rule in _RULES:
        if pattern.search(name):
            return rule
    raise ValueError(f"no tensor-parallel rule for tensor {name!r} (known: attention q/k/v/o "
                     f"and qkv_proj, MLP gate/up/down and gate_up_proj, embed_tokens, lm_head, "
                     f"norms, Medusa heads)")


@dataclass(frozen=True)
class TPLayout:
    """The sizes rank ``rank`` of ``world`` splits, validated; ``shard(name, shape)`` gives the
    slice of each transformers tensor it holds.

    num_heads, num_kv_heads: config.json ``num_attention_heads``, ``num_key_value_heads``;
    head_dim: D; intermediate_size: I; vocab_size: V.
    """

    world: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self):
        keys = {"world": "world", "rank": "rank", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "intermediate_size": "intermediate_size", "vocab_size": "vocab_size"}
        for attr, key in keys.items():
            value = getattr(self, attr)
            low = 0 if attr == "rank" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TPLayout {key} must be an int >= {low}, got {value!r}")
        if self.rank >= self.world:
            raise ValueError(f"TPLayout rank must lie in [0, world = {self.world}), got "
                             f"{self.rank}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.json num_attention_heads = {self.num_heads} is not a "
                             f"multiple of num_key_value_heads = {self.num_kv_heads}")
        even_range(self.num_kv_heads, self.world, 0, "num_key_value_heads")
        even_range(self.num_heads, self.world, 0, "num_attention_heads")  # follows from Hkv
        even_range(self.intermediate_size, self.world, 0, "intermediate_size")
        if self.vocab_size < self.world:
            raise ValueError(f"tensor parallelism over {self.world} ranks needs config.json "
                             f"vocab_size >= {self.world}, got {self.vocab_size}")

    @classmethod
    def from_hf_config(cls, config: Mapping, world: int, rank: int) -> TPLayout:
        """From a transformers config.json dict (its ``text_config`` when it has one)."""
        config = config.get("text_config") or config
        heads = config["num_attention_heads"]
        return cls(
            world=world, rank=rank, num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
        )  # fmt: skip

    # ------------------------------------------------------------------ this rank's ranges
    @property
    def kv_heads(self) -> Range:
        return even_range(self.num_kv_heads, self.world, self.rank, "num_key_value_heads")

    @property
    def q_heads(self) -> Range:
        return even_range(self.num_heads, self.world, self.rank, "num_attention_heads")

    @property
    def q_rows(self) -> Range:
        """Rows of q_proj (columns of o_proj): this rank's query heads x head_dim."""
        start, stop = self.q_heads
        return start * self.head_dim, stop * self.head_dim

    @property
    def kv_rows(self) -> Range:
        start, stop = self.kv_heads
        return start * self.head_dim, stop * self.head_dim

    @property
    def ffn(self) -> Range:
        return even_range(self.intermediate_size, self.world, self.rank, "intermediate_size")

    @property
    def vocab(self) -> Range:
        return vocab_range(self.vocab_size, self.world, self.rank)

    @property
    def local_num_heads(self) -> int:
        return self.num_heads // self.world

    @property
    def local_num_kv_heads(self) -> int:
        return self.num_kv_heads // self.world

    @property
    def local_intermediate_size(self) -> int:
        return self.intermediate_size // self.world

    @property
    def local_vocab_size(self) -> int:
        start, stop = self.vocab
        return stop - start

    # ------------------------------------------------------------------ the rules
    def shard(self, name: str, shape: Sequence[int]) -> Shard:
        """The slice of transformers tensor ``name`` (full ``shape``) this rank holds. A shape
        that does not fit the layout's sizes raises a ValueError naming the tensor."""
        rule = tensor_rule(name)
        if rule == "whole":
            return WHOLE
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        inter = self.intermediate_size
        rows = {  # rule -> (dim, expected size along dim, what it is, ranges)
            "vocab_rows": (0, self.vocab_size, "vocab_size", [self.vocab]),
            "q_rows": (0, q, "num_attention_heads x head_dim", [self.q_rows]),
            "kv_rows": (0, kv, "num_key_value_heads x head_dim", [self.kv_rows]),
            "qkv_rows": (0, q + 2 * kv, "(num_attention_heads + 2 num_key_value_heads) x "
                         "head_dim", [self.q_rows, _shift(self.kv_rows, q),
                                      _shift(self.kv_rows, q + kv)]),
            "q_cols": (1, q, "num_attention_heads x head_dim", [self.q_rows]),
            "ffn_rows": (0, inter, "intermediate_size", [self.ffn]),
            "gate_up_rows": (0, 2 * inter, "2 x intermediate_size",
                             [self.ffn, _shift(self.ffn, inter)]),
            "ffn_cols": (1, inter, "intermediate_size", [self.ffn]),
        }
        dim, size, what, ranges = rows[rule]
        shape = tuple(shape)
        if len(shape) <= dim or shape[dim] != size:
            raise ValueError(f"tensor {name} has shape {list(shape)}; the tensor-parallel "
                             f"layout expects {size} ({what}) along dim {dim}")
        return Shard(dim, tuple(ranges))

    def plan(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, Shard]:
        """``shard`` for every (name, full shape)."""
        return {name: self.shard(name, shape) for name, shape in shapes.items()}


@dataclass(frozen=True)
class VocabLayout:
    """The layout of Medusa heads alone (no base model): rank ``rank`` of ``world`` holds
    ``vocab_range(vocab_size, world, rank)`` of every head's projection ``{h}.{L}.weight`` and
    every ResBlock whole; any other tensor is a ValueError naming it."""

    world: int
    rank: int
    vocab_size: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world or self.vocab_size < self.world:
            raise ValueError(f"VocabLayout needs 0 <= rank < world <= vocab_size, got rank "
                             f"{self.rank}, world {self.world}, vocab_size {self.vocab_size}")

    def shard(self, name: str, shape: Sequence[int]) -> Shard:
        rule = tensor_rule(name)
        if rule == "whole" and "linear" in name:
            return WHOLE
        if rule == "vocab_rows" and re.search(r"^(medusa_head\.)?\d+\.\d+\.weight$", name):
            if len(shape) != 2 or shape[0] != self.vocab_size:
                raise ValueError(f"tensor {name} has shape {list(shape)}; the tensor-parallel "
                                 f"layout expects {self.vocab_size} (vocab_size) along dim 0")
            return Shard(0, (vocab_range(self.vocab_size, self.world, self.rank),))
        raise ValueError(f"tensor {name!r} is not a Medusa head tensor ({{h}}.{{i}}.linear.weight, "
                         f"{{h}}.{{i}}.linear.bias, {{h}}.{{L}}.weight)")


def _shift(r: Range, offset: int) -> Range:
    return r[0] + offset, r[1] + offset
