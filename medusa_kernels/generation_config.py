"""``GenerationConfig``: every knob of the generation loop in one frozen dataclass, validated once
where it is built (in the spirit of transformers' ``GenerationConfig`` and vLLM's
``SamplingParams``), and the argument checkers the entry points share.

Each check raises on the spot with one line naming the argument, the value and what is allowed:
``TypeError`` for a wrong type (a bool posing as an int, a float or a string posing as a token
id), ``ValueError`` for a wrong value (a negative temperature, NaN, an id outside the
vocabulary). What depends on the model (the vocabulary, the heads, max_position_embeddings, the
checkpoint's EOS) is checked by ``generate`` before any work.

Adding a knob: a field with its default, one line in ``__post_init__`` that checks and
normalises it, and its use in ``decoding.py``; ``generate(..., knob=...)`` picks it up.

No torch import here: the CLIs validate their flags before torch loads.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

INT32_MAX = 2**31 - 1  # lengths and positions are int32 on the device
SEED_RANGE = 2**64  # torch.Generator.manual_seed takes [0, 2**64)


def describe(value: Any) -> str:
    """``value`` for an error message: its repr (cut to 60 characters) and its type."""
    text = " ".join(repr(value).split())  # one line, whatever the repr
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers count; floats, even 2.0, do not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and \
        type(value).__name__ != "bool_"


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` as an int in [low, high]; None passes when ``optional``."""
    if value is None and optional:
        return None
    allowed = "an int" + (f" >= {low}" if low is not None and high is None else "") + \
        (f" in [{low}, {high}]" if low is not None and high is not None else "") + \
        (" or None" if optional else "")
    if not is_int(value):
        raise TypeError(f"{name} must be {allowed}, got {describe(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None
                ) -> float:
    """``value`` as a finite float in [low, high] (ints are fine, bools are not)."""
    allowed = "a finite number" + (f" >= {low}" if low is not None and high is None else "") + \
        (f" in [{low}, {high}]" if low is not None and high is not None else "")
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or \
            type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be {allowed}, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or \
            (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_bool(name: str, value: Any, optional: bool = False) -> bool | None:
    """``value`` as a bool (True/False only: 0 and 1 are not flags); None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        allowed = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {describe(value)}")
    return bool(value)


def check_token_ids(name: str, value: Any, vocab_size: int | None = None) -> tuple[int, ...]:
    """One token id or a list of them -> a tuple of ints in [0, vocab_size)."""
    items = [value] if is_int(value) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, set, frozenset)):
        raise TypeError(f"{name} must be a token id (int) or a list of them, got "
                        f"{describe(value)}")
    ids = []
    for i, t in enumerate(items):
        where = name if is_int(value) else f"{name}[{i}]"
        if not is_int(t):
            raise TypeError(f"{where} must be an int token id, got {describe(t)}")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            limit = f"[0, vocab_size = {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"{where} = {int(t)} is not a token id: must be in {limit}")
        ids.append(int(t))
    return tuple(ids)


def check_tree(value: Any):
    """A tree name, a JSON file (str or PathLike: a tree, or a policy table), a list of paths or
    a policy object -> (tree as stored, its paths or None, its policy or None), loaded and
    checked now; None (the checkpoint's or the device's default) passes."""
    from .policy import POLICY_NAMES, TreePolicy, is_policy, is_table_file
    from .tree import load_tree, validate_choices

    if value is None or (isinstance(value, str) and value in POLICY_NAMES):
        return value, None, None
    if is_policy(value):
        return value, None, value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if is_table_file(value):
            return value, None, TreePolicy.load(value)
        return value, tuple(tuple(p) for p in load_tree(value)), None
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Sequence):
        raise TypeError(f"tree must be a tree name, a JSON file (a tree or a policy table), a "
                        f"list of paths (lists of ranks) or a TreePolicy, got {describe(value)}")
    try:
        validate_choices(value)
    except ValueError as e:
        raise ValueError(f"tree: {e}") from None
    paths = tuple(tuple(int(r) for r in p) for p in value)
    return paths, paths, None


def check_seed(value: Any) -> int | tuple[int, ...] | None:
    """None, an int in [0, 2**64), or a non-empty list of them (one per sequence: a tuple)."""
    if value is None or is_int(value):
        return check_int("seed", value, 0, SEED_RANGE - 1, optional=True)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"seed must be an int in [0, 2**64), a non-empty list of them (one per "
                        f"sequence) or None, got {describe(value)}")
    return tuple(check_int(f"seed[{i}]", s, 0, SEED_RANGE - 1) for i, s in enumerate(value))


ACCEPTANCE_RULES = ("exact", "typical")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` as one of the strings ``allowed``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(allowed)}, got {describe(value)}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """The settings of one ``generate`` call (immutable; ``replace`` makes a checked copy).

    max_new_tokens: new tokens per sequence (EOS may end one sooner), >= 1.
    medusa: Medusa decoding (needs heads) or, False, plain decoding: the baseline.
    temperature: 0 = greedy (Medusa output identical to plain greedy); > 0 samples from the
        base model's distribution after temperature, ``top_k`` and ``top_p`` (transformers'
        warpers, in its order).
    top_k: None, or keep the k likeliest tokens (int >= 1; ties at the k-th kept).
    top_p: None, or keep the likeliest tokens whose probabilities sum to top_p (in (0, 1]).
        Both need temperature > 0 (greedy decoding ignores them, so setting them is an error).
    acceptance: how Medusa accepts guesses when sampling. "exact" (default): the tree walk of
        ``ops.sampling.accept_exact``, whose output is distributed exactly as plain sampling's
        (for the same seed it is the same tokens). "typical": the paper's typical acceptance
        (``posterior_threshold``, ``posterior_alpha`` in [0, 1]: a guess is kept when its
        probability > min(threshold, alpha * exp(-entropy))), which changes the distribution
        and takes no top_k / top_p. Greedy decoding ignores it.
    tree: which tree verifies each step. None or "online" (the default with heads): the
        online policy (``policy.OnlinePolicy``), which measures each step's time and accepted
        path and picks, before each step, the tree (or a plain step) of highest expected
        tokens per second, starting from what the checkpoint ships (its policy table, its
        calibrated tree's accuracies); its estimates carry over between calls on the same
        model. "table": the checkpoint's policy table for the device. "fixed": the device's
        default tree (``tree.default_tree``: a checkpoint's calibrated tree, else
        ``mc_sim_7b_63`` on a GPU and ``small_7`` on a CPU), cut to the model's heads and
        vocabulary. A name in ``tree.TREES``, a tree JSON file or a list of paths: that tree
        at every step. A policy table JSON file (``python -m medusa_kernels.tree calibrate
        --nodes auto --batches ...``) or a policy object (``policy.TreePolicy``,
        ``policy.OnlinePolicy``): before each step, the tree it picks for the rows the step
        computes (``[]``: plain decoding).
    eos_token_id: id(s) that end a sequence (kept in its output); None: the checkpoint's
        (generation_config.json, else config.json); [] never stops early.
    seed: seeds sampling: an int in [0, 2**64), or one such int per sequence. Each sequence
        samples with its own seed (the list's, or for an int ``s``: ``s`` for sequence 0 and a
        hash of (s, b) for sequence b, ``ops.sampling.sequence_seeds``), so a sequence's
        tokens depend on its prompt, its seed and the settings, never on the rest of the
        batch, and different seeds give unrelated samples. None: a fresh seed from torch's
        default generator.
    max_seq_len: refuse up front if the KV cache would need more positions than this.
    cuda_graph: replay each step from a CUDA graph (None: on for a model on CUDA).
    """

    max_new_tokens: int = 128
    medusa: bool = True
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    acceptance: str = "exact"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    tree: str | tuple[tuple[int, ...], ...] | Any | None = None
    eos_token_id: tuple[int, ...] | None = None
    seed: int | tuple[int, ...] | None = None
    max_seq_len: int | None = None
    cuda_graph: bool | None = None
    # the tree's paths, loaded from its name or file when the config is built
    tree_choices: tuple[tuple[int, ...], ...] | None = field(
        default=None, init=False, repr=False, compare=False)
    # the policy a table file or a policy object gives (None for one tree)
    tree_policy: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, 1, INT32_MAX))
        put("medusa", check_bool("medusa", self.medusa))
        put("temperature", check_float("temperature", self.temperature, low=0.0))
        put("top_k", check_int("top_k", self.top_k, 1, optional=True))
        if self.top_p is not None:
            put("top_p", check_float("top_p", self.top_p, 0.0, 1.0))
            if self.top_p == 0:
                raise ValueError("top_p must be a number in (0, 1] or None, got 0.0 (no token "
                                 "would be kept)")
        put("acceptance", check_choice("acceptance", self.acceptance, ACCEPTANCE_RULES))
        filters = [f"{k} = {v}" for k, v in (("top_k", self.top_k), ("top_p", self.top_p))
                   if v is not None]
        if filters and self.temperature == 0:
            raise ValueError(f"{' and '.join(filters)} needs temperature > 0: temperature 0 is "
                             "greedy decoding, which top_k and top_p do not change")
        if filters and self.acceptance == "typical" and self.medusa:
            raise ValueError(f"{' and '.join(filters)} needs acceptance='exact': typical "
                             "acceptance judges guesses on the unfiltered distribution")
        put("posterior_threshold",
            check_float("posterior_threshold", self.posterior_threshold, 0.0, 1.0))
        put("posterior_alpha", check_float("posterior_alpha", self.posterior_alpha, 0.0, 1.0))
        tree, choices, policy = check_tree(self.tree)
        put("tree", tree)
        put("tree_choices", choices)
        put("tree_policy", policy)
        if self.eos_token_id is not None:
            put("eos_token_id", check_token_ids("eos_token_id", self.eos_token_id))
        put("seed", check_seed(self.seed))
        put("max_seq_len", check_int("max_seq_len", self.max_seq_len, 1, INT32_MAX,
                                     optional=True))
        put("cuda_graph", check_bool("cuda_graph", self.cuda_graph, optional=True))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> GenerationConfig:
        """A copy with ``changes`` (checked like the original)."""
        unknown = sorted(set(changes) - set(knobs()))
        if unknown:
            raise TypeError(f"unknown generation setting(s) {unknown}; known: {knobs()}")
        return dataclasses.replace(self, **changes)


def knobs() -> list[str]:
    """The settable fields of ``GenerationConfig``."""
    return [f.name for f in dataclasses.fields(GenerationConfig) if f.init]


def build_config(config: GenerationConfig | None, **overrides) -> GenerationConfig:
    """``config`` (default: ``GenerationConfig()``) with the ``overrides`` that are not None."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig or None, got {describe(config)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if config is None:
        unknown = sorted(set(changes) - set(knobs()))
        if unknown:
            raise TypeError(f"unknown generation setting(s) {unknown}; known: {knobs()}")
        return GenerationConfig(**changes)
    return config.replace(**changes) if changes else config
