"""The generation loop: plain decoding and Medusa decoding through the same decoder.

Medusa step, for a batch of B sequences (state: each sequence's root token, already emitted but
not yet in the cache, and the hidden state that produced it)::

    heads' top-k on the hidden state  ->  tree candidates [B, T] (root + guesses)
    one tree forward (KV written at [len, len + T))  ->  tree hidden states [B, T, d]
    acceptance: longest path the base model agrees with  ->  accepted nodes, next root
      (greedy: the base argmax per node from the fused lm_head top-1, no [B, T, V] logits;
       sampling: exact (``accept_exact``) or typical, from full logits)
    compaction: accepted KV moved to [len, len + accepted), len += accepted

Greedy acceptance makes the output identical to plain greedy decoding; exact acceptance makes
it distributed exactly as plain sampling (temperature, top_k, top_p), and since the token at
position t of sequence b is always drawn with the same uniform u(seed_b, t)
(``ops.sampling.position_uniforms``; seed_b: the sequence's own seed), it is the very tokens
plain sampling gives for the same seed, alone or in any batch, with or without CUDA graphs
(up to floating-point differences
between the tree forward and the one-token forward that move a boundary of the inverse CDF
across a draw). Everything stays on the device; the one host sync per step copies the new
tokens out (streaming and the stop check).

Which tree: a policy (``policy.py``) picks it before each step from the rows the step computes
and the longest context; the empty tree is a plain decoding step. An online policy (one with
``observe``: the default, ``OnlinePolicy``) is told after each step what it cost (CUDA events
around the step, read after the step's own host copy, so no extra sync; on a CPU the thread's
CPU time with one torch thread), the tree node each running row's accepted path ended at
(one more column in that copy) and, if its ``observe`` takes a ``context``, the step's longest
context; buffers and captures are made before the timer starts.
Finished sequences ride along (accepting nothing) until at most ``KEEP_FRACTION`` of the rows
still run (90%; 50% with CUDA graphs, where a smaller batch means new captures); then their
rows are dropped from the batch
(the KV cache rows of the others copied once), so the step's cost and the policy's choice
follow the load. Tree buffers are built, and on CUDA a step graph captured, at the first
step that uses the tree (per batch of rows).

``generate`` checks everything first (``GenerationConfig`` the settings, ``_plan`` what
depends on the model: prompt ids, EOS, trees, positions), then runs ``_decode``.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .chat import conversations, encode_chat, is_chat, render
from .checkpoint import MedusaModel
from .generation_config import (
    GenerationConfig,
    build_config,
    check_bool,
    check_token_ids,
    describe,
)
from .ops import accept_greedy_ids, accept_typical, compact_kv_cache
from .ops.sampling import (
    accept_exact,
    position_uniforms,
    sample_logits,
    seed_keys,
    sequence_seeds,
)
from .policy import FixedTreePolicy, OnlinePolicy, Tree, TreePolicy, policy_label
from .text import IncrementalDetokenizer, prompt_token_lists
from .tree import (
    TreeBuffers,
    build_tree,
    check_fits,
    default_policy_file,
    default_tree,
    fit_choices,
    load_tree,
    tree_label,
)

# propose(last_hidden [B, d], root [B], num_generated per sequence) -> top-k token ids [B, K, k]
Proposer = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]
GREEDY = GenerationConfig()


@dataclass
class GenerationResult:
    """New tokens per sequence (prompt excluded), their text, and step statistics.

    ``text``: the new tokens of each sequence decoded (special tokens skipped) when the model
    has a tokenizer, else None. ``tree``: the tree or policy used ("plain" without Medusa,
    "online" for the online policy, a table's file name, a tree's name).
    ``pad_token_id``: the checkpoint's pad id (else its EOS, else 0), for ``padded``.
    ``step_trees``: the tree each step verified (paths in ``validate_choices`` order; ``()``: a
    plain decoding step); ``step_nodes`` their node counts.
    """

    tokens: list[list[int]]
    steps: int = 0
    accepted_per_step: list[list[int]] = field(default_factory=list)  # [step][seq], 0 = done
    prefill_time: float = 0.0
    wall_time: float = 0.0
    text: list[str] | None = None
    tree: str = ""
    pad_token_id: int = 0
    step_trees: list[tuple] = field(default_factory=list)

    @property
    def step_nodes(self) -> list[int]:
        return [len(t) + 1 for t in self.step_trees]

    @property
    def tree_steps(self) -> dict[int, int]:
        """Steps per tree size: {nodes: steps} (1: plain steps), by size."""
        counts: dict[int, int] = {}
        for n in self.step_nodes:
            counts[n] = counts.get(n, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def mean_accepted(self) -> float:
        """Mean tokens gained per step per running sequence (1.0 for plain decoding)."""
        counts = [n for step in self.accepted_per_step for n in step if n > 0]
        return sum(counts) / max(len(counts), 1)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (after prefill)."""
        decode = self.wall_time - self.prefill_time
        return (self.num_tokens - len(self.tokens)) / decode if decode > 0 else float("nan")

    def padded(self) -> torch.Tensor:
        """The new tokens as one [B, longest] int64 tensor, right-padded with ``pad_token_id``."""
        longest = max((len(t) for t in self.tokens), default=0)
        out = torch.full((len(self.tokens), longest), self.pad_token_id, dtype=torch.long)
        for b, t in enumerate(self.tokens):
            out[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        return out


class StreamStep(list):
    """One step of a stream: a list of B lists, the new tokens of each sequence; ``text``: the
    new text of each (B strings, "" while a character is still split over tokens), or None
    when the model has no tokenizer."""

    text: list[str] | None = None


def pad_prompts(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded tokens [B, P] int64, lengths [B] int32 on ``device``."""
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
    return tokens.to(device), lengths.to(device)


class _Stop:
    """Host-side stop bookkeeping: per-sequence EOS and max_new_tokens."""

    def __init__(self, batch: int, max_new_tokens: int, eos: frozenset[int]):
        self.max_new, self.eos = max_new_tokens, eos
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch

    def take(self, rows: list[list[int]], counts: list[int]) -> list[list[int]]:
        """Append each running sequence's first ``counts[b]`` tokens, stopping at EOS/limit."""
        new = []
        for b, (row, n) in enumerate(zip(rows, counts, strict=True)):
            kept = []
            if not self.done[b]:
                for tok in row[:n]:
                    kept.append(tok)
                    if tok in self.eos or len(self.tokens[b]) + len(kept) >= self.max_new:
                        self.done[b] = True
                        break
            self.tokens[b].extend(kept)
            new.append(kept)
        return new


def next_token(base, hidden, config: GenerationConfig = GREEDY, generator=None, keys=None,
               positions=None) -> torch.Tensor:
    """hidden [B, d] -> the next token [B]: the argmax (without full logits) or a sample from
    the filtered distribution, drawn with ``position_uniforms(keys, positions)`` (positions
    [B]: where the token goes) when ``keys`` is given, else with ``generator``."""
    if config.greedy:
        return base.greedy(hidden)
    uniforms = None if keys is None else position_uniforms(keys, positions)
    return sample_logits(base.logits(hidden), config.temperature, config.top_k, config.top_p,
                         None if keys is not None else generator, uniforms=uniforms)


def plain_step(model, tb, cache, root, last_hidden, running, config: GenerationConfig = GREEDY,
               generator=None, keys=None):
    """One plain decoding step: root [B] goes into the cache, the next token comes out.

    Returns (new_tokens [B, 1], counts [B] int32 (0 for finished sequences), next root [B],
    hidden [B, d]). Advances ``cache.seqlens`` of running sequences. ``keys`` [B, 2]: the
    sequences' sampling keys (``seed_keys``); None: ``generator`` draws.
    """
    h = model.base.step(root[:, None], cache, tb.tree_mask, tb.offsets)[:, 0]
    positions = None if keys is None else cache.seqlens.long() + 1  # the next token's position
    next_root = next_token(model.base, h, config, generator, keys, positions)
    counts = running.to(torch.int32)
    cache.seqlens.add_(counts)
    return next_root[:, None], counts, next_root, h


def medusa_step(model, tb, cache, root, last_hidden, running, config: GenerationConfig = GREEDY,
                generator=None, guesses=None, keys=None, leaves: bool = False):
    """One Medusa step (see the module doc); ``guesses`` [B, K, k] replaces the heads' top-k;
    ``keys`` as ``plain_step``.

    Returns (new_tokens [B, A]: the first counts[b] are new, counts [B] int32 (0 for finished
    sequences), next root [B], its hidden state [B, d]), and with ``leaves`` also the tree node
    each accepted path ended at [B] int64 (0: the root; what an online policy learns from).
    Compacts the cache.
    """
    B = root.shape[0]
    if guesses is None:
        if tb.depth == 0:  # root-only tree: nothing to guess
            guesses = root.new_zeros(B, 0, 1)
        else:
            _, guesses = model.heads.topk(last_hidden, tb.topk, tb.depth)
    candidates = tb.candidates(root, guesses)  # [B, T]
    h = model.base.step(candidates, cache, tb.tree_mask, tb.offsets)  # [B, T, d]
    ri = tb.retrieve_indices
    if config.greedy:  # argmax ids straight from the fused lm_head top-1
        pred = model.base.greedy(h)
        counts, path, next_root = accept_greedy_ids(pred, candidates, ri)
        # an accepted node's token is its parent's argmax: the new tokens are the argmaxes
        # along the accepted path, the last of them the next root
        new_tokens = pred.gather(1, path.clamp(min=0))
    else:
        if config.acceptance == "typical":
            counts, path, next_root = accept_typical(
                model.base.logits(h), candidates, ri, config.temperature,
                config.posterior_threshold, config.posterior_alpha, generator,
            )  # fmt: skip
        else:  # exact: the node at depth d draws the token at position root + d + 1
            uniforms = None
            if keys is not None:
                depth = torch.arange(1, ri.shape[1] + 1, device=root.device)
                uniforms = position_uniforms(keys, cache.seqlens.long()[:, None] + depth)
            counts, path, next_root = accept_exact(
                model.base.logits(h), candidates, ri, config.temperature, config.top_k,
                config.top_p, None if keys is not None else generator, uniforms=uniforms,
            )  # fmt: skip
        # new tokens: the accepted path after the root, then the next root
        new_tokens = candidates.gather(1, path.clamp(min=0)).roll(-1, dims=1)
    # the last accepted node (counts >= 1: the root is always accepted), as an int64 index
    last = torch.sub(counts, 1, out=torch.empty(counts.shape, dtype=torch.long,
                                                  device=counts.device))[:, None]
    if not config.greedy:
        new_tokens.scatter_(1, last, next_root[:, None])
    node = path.gather(1, last)  # [B, 1]
    next_hidden = h.gather(1, node[:, :, None].expand(B, 1, h.shape[-1]))[:, 0]
    counts = torch.where(running, counts, 0)
    compact_kv_cache(cache.k, cache.v, cache.seqlens, path, counts)
    if leaves:  # the last accepted node of each row
        return new_tokens, counts, next_root, next_hidden, node[:, 0]
    return new_tokens, counts, next_root, next_hidden


# finished rows are dropped from the batch once at most this fraction of it still runs: a drop
# copies the kept rows' KV (a fraction of a step) and, with CUDA graphs, recaptures each tree.
# (CPU, demo, B 64, 128 tokens: the policy's run at 0.5 / 0.75 / 0.9 gave 1.05 / 1.09 / 1.11x
# plain, best of 4, process CPU time)
KEEP_FRACTION = {"eager": 0.9, "graph": 0.5}

# a seeded generator can drive sampling inside a CUDA graph (registered with it: its offset
# advances with every replay); the default generator always can
GRAPH_GENERATORS = hasattr(torch.cuda.CUDAGraph, "register_generator_state")


class CapturedStep:
    """A step function on static buffers, captured once in a CUDA graph and replayed.

    ``fn(root, last_hidden, running)`` must only touch device tensors. Warm-up runs (which
    compile the Triton kernels) use running = False everywhere, so they accept nothing and
    leave the cache's contents before ``seqlens`` unchanged. ``generator``: the seeded CUDA
    generator ``fn`` samples with, if any; each replay draws fresh random numbers from it.
    """

    def __init__(self, fn, root: torch.Tensor, last_hidden: torch.Tensor, running: torch.Tensor,
                 generator: torch.Generator | None = None):
        self.inputs = (root.clone(), last_hidden.clone(), torch.zeros_like(running))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, root, last_hidden, running):
        for static, value in zip(self.inputs, (root, last_hidden, running), strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.outputs


@dataclass
class _Plan:
    """What ``generate`` settled before any work: the checked prompts, EOS ids, the tree policy
    and every tree it can pick (checked to fit the model), the cache size."""

    prompts: list[list[int]]
    eos: frozenset[int]
    pad_token_id: int
    policy: object  # choose(batch, context) -> Tree, trees() -> [Tree] (policy.py)
    trees: frozenset[Tree]
    tree: str
    capacity: int
    tokenizer: object | None


# the online policies of each model's heads, per sampling setting: their estimates carry over
# from one generate call to the next (as a server's would), and go with the heads
_ONLINE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tree_home(model: MedusaModel) -> str | None:
    """Where the checkpoint's shipped trees and policy tables are looked for: the heads'
    directory when it (or the one above it) ships one (trees are made for heads: the SmolLM2
    heads shipped apart from their GGUF base), else the model's."""
    home = model.heads_dir
    if home is not None and (default_policy_file(model.device, home) is not None
                             or os.path.isfile(default_tree(model.device, home))):
        return home
    return model.model_dir


def _fixed(model: MedusaModel) -> tuple[FixedTreePolicy, str]:
    """The device's default tree (a checkpoint's calibrated tree, else small_7 on a CPU and
    mc_sim_7b_63 on a GPU), cut to the heads and the vocabulary."""
    num_heads = model.heads.num_heads if model.heads is not None else None
    V = model.heads.draft_vocab if model.heads is not None else model.base.cfg.vocab_size
    source = default_tree(model.device, _tree_home(model))
    choices = fit_choices(load_tree(source), num_heads, V)
    return FixedTreePolicy(choices), tree_label(source)


def online_policy(model: MedusaModel, **kwargs) -> OnlinePolicy:
    """A fresh ``OnlinePolicy`` for ``model``'s heads, its prior what the checkpoint ships for
    the device: the policy table's trees and step times (``tree.default_policy_file``), the
    calibrated tree's head accuracies (``tree.default_tree``), the default tree as a
    candidate; without them a generic prior. ``kwargs`` go to ``OnlinePolicy``."""
    if model.heads is None:
        raise ValueError("an online tree policy needs Medusa heads: load_model(..., medusa=DIR)")
    device, model_dir = model.device, _tree_home(model)
    table_file = default_policy_file(device, model_dir)
    table = TreePolicy.load(table_file) if table_file is not None else None
    source = default_tree(device, model_dir)
    accuracies = None
    if os.path.isfile(source):
        with open(source) as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("accuracies"), list):
            accuracies = data["accuracies"]
    fixed, _ = _fixed(model)
    kwargs.setdefault("defer", True)  # the loop flushes it at the end of each call
    return OnlinePolicy(model.heads.num_heads, accuracies=accuracies, table=table,
                        trees=[fixed.tree], vocab_size=model.heads.draft_vocab,
                        device=device.type, **kwargs)


def _policy(model: MedusaModel, config: GenerationConfig, propose=None) -> tuple[object, str]:
    """(policy, label) of the settings: plain decoding, a policy object or table file given,
    a policy by name (``POLICY_NAMES``; None: "online"), or one tree given whole."""
    if not config.medusa:
        return FixedTreePolicy([]), "plain"
    if config.tree_policy is not None:
        return config.tree_policy, policy_label(config.tree_policy)
    name = "online" if config.tree is None else config.tree
    if name == "table":
        shipped = default_policy_file(model.device, _tree_home(model))
        if shipped is None:
            raise ValueError(f"tree='table': {model.model_dir} ships no tree policy table for "
                             f"{model.device.type} (tree calibrate --nodes auto --batches ... "
                             "writes one); use tree='online' or a tree")
        policy = TreePolicy.load(shipped)
        return policy, policy_label(policy)
    if name == "fixed":
        return _fixed(model)
    if name == "online":
        if model.heads is None:  # propose without heads: the default tree
            return _fixed(model)
        if propose is not None:  # test guesses: a fresh policy, not the heads' estimates
            return online_policy(model), "online"
        key = (config.temperature, config.top_k, config.top_p,
               config.acceptance if not config.greedy else None, config.cuda_graph)
        policies = _ONLINE.setdefault(model.heads, {})
        if key not in policies:
            policies[key] = online_policy(model)
        return policies[key], "online"
    return FixedTreePolicy(config.tree_choices), tree_label(config.tree)


def _plan(model: MedusaModel, prompt, config: GenerationConfig, propose) -> _Plan:
    """Every check that needs the model: prompt ids, EOS, heads, trees, positions, cache size."""
    base, device = model.base, model.device
    V = base.cfg.vocab_size
    defaults = model.generation_defaults()
    source = f"from {defaults['source']}"
    tokenizer = model.cached_tokenizer()
    bos = None
    if defaults["add_bos_token"] is True and defaults["bos_token_id"] is not None:
        bos = check_token_ids(f"bos_token_id ({source})", defaults["bos_token_id"], V)[0]
    if is_chat(prompt):  # messages: the checkpoint's chat template, no special tokens added
        where = model.model_dir or "the model"
        texts = render(model.chat_template(), conversations(prompt), model.special_tokens(),
                       where)
        prompt = encode_chat(texts, tokenizer, where)
    prompts, _ = prompt_token_lists(prompt, tokenizer, V, bos)
    if config.eos_token_id is not None:
        eos = check_token_ids("eos_token_id", config.eos_token_id, V)
    elif defaults["eos_token_id"] is not None:
        eos = check_token_ids(f"eos_token_id ({source})", defaults["eos_token_id"], V)
    else:
        eos = ()
    pad = defaults["pad_token_id"]
    if pad is not None:
        pad = check_token_ids(f"pad_token_id ({source})", pad, V)[0]
    pad = pad if pad is not None else (eos[0] if eos else 0)

    if config.medusa and model.heads is None and propose is None:
        raise ValueError("medusa=True needs Medusa heads: load_model(..., medusa=DIR), or "
                         "medusa=False for plain decoding")
    num_heads = model.heads.num_heads if model.heads is not None else None
    policy, label = _policy(model, config, propose)
    trees = frozenset(tuple(tuple(int(r) for r in p) for p in t) for t in policy.trees())
    if not trees:
        raise ValueError(f"tree policy {label!r}: trees() lists no tree")
    for t in trees:  # asked for (or shipped): used whole, or a clear error
        try:
            check_fits([list(p) for p in t], label, num_heads,
                       model.heads.draft_vocab if model.heads is not None else V)
        except ValueError as e:
            if isinstance(policy, FixedTreePolicy):
                raise
            raise ValueError(f"tree policy: a tree it can pick does not fit: {e}") from None
    depth = max(max((len(p) for p in t), default=0) for t in trees)
    nodes = max(len(t) + 1 for t in trees)

    longest = max(len(p) for p in prompts)
    max_positions = base.cfg.max_position_embeddings
    if isinstance(max_positions, int) and longest + config.max_new_tokens > max_positions:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) = "
            f"{longest + config.max_new_tokens} exceeds the model's max_position_embeddings = "
            f"{max_positions} (config.json): shorten the prompt or lower max_new_tokens"
        )
    # Before its last step a sequence holds < P + max_new - 1 cached tokens; that step may
    # accept up to depth + 1 (overshooting max_new), and finished rows still get the tree
    # written (T nodes) at their seqlens while other rows run on. Any tree the policy can pick.
    capacity = longest + config.max_new_tokens + depth + nodes
    if config.max_seq_len is not None and capacity > config.max_seq_len:
        raise ValueError(
            f"prompt ({longest}) + max_new_tokens ({config.max_new_tokens}) + tree depth "
            f"({depth}) + tree nodes ({nodes}) = {capacity} exceeds max_seq_len = "
            f"{config.max_seq_len}"
        )
    if isinstance(config.seed, tuple) and len(config.seed) != len(prompts):
        raise ValueError(f"seed lists {len(config.seed)} seeds for {len(prompts)} sequences: "
                         "give one per sequence, or one int")
    if config.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on CUDA, not {device.type}")
    return _Plan(prompts, frozenset(eos), pad, policy, trees, label, capacity, tokenizer)


def _checked_guesses(guesses, batch: int, tb: TreeBuffers, vocab_size: int, device):
    """``propose``'s output, checked: integer ids [B, K >= depth, k >= topk] in [0, V)."""
    if not isinstance(guesses, torch.Tensor):
        raise TypeError(f"propose must return a tensor of token ids [B, K, k], got "
                        f"{describe(guesses)}")
    if guesses.dtype == torch.bool or guesses.is_floating_point() or guesses.is_complex():
        raise TypeError(f"propose must return integer token ids, got {guesses.dtype}")
    shape = tuple(guesses.shape)
    if len(shape) != 3 or shape[0] != batch or shape[1] < tb.depth or shape[2] < tb.topk:
        raise ValueError(f"propose must return token ids [B = {batch}, K >= {tb.depth}, "
                         f"k >= {tb.topk}], got shape {shape}")
    used = guesses[:, : tb.depth, : tb.topk]
    if used.numel():
        bad = used[(used < 0) | (used >= vocab_size)]
        if bad.numel():
            raise ValueError(f"propose returned token id {int(bad[0])}, outside the "
                             f"vocabulary [0, vocab_size = {vocab_size})")
    return guesses.to(device=device, dtype=torch.long)


def _fresh_seed() -> int:
    """A seed from torch's default generator (so ``torch.manual_seed`` reproduces a run)."""
    hi, lo = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return (hi << 32) | lo


class _Rows:
    """The rows the steps compute (a subset of the B sequences, in order) and their device
    state: the KV cache, root tokens [W], hidden states [W, d], running mask [W], sampling
    keys [W, 2] (or None)."""

    def __init__(self, batch, cache, root, last_hidden, keys):
        self.index = list(range(batch))  # the sequence of each row
        self.cache, self.root, self.last_hidden, self.keys = cache, root, last_hidden, keys
        self.running = torch.ones(batch, dtype=torch.bool, device=root.device)
        self.uploaded = [True] * batch  # the running mask as the device holds it

    def keep(self, base, live: list[int]) -> None:
        """Drop every row but ``live`` (row numbers), copying their cache rows out once."""
        idx = torch.tensor(live, device=self.root.device)
        old = self.cache
        self.cache = base.new_cache(len(live), old.capacity, empty=True)
        # the slots the kept rows hold, copied; the rest zeroed (attention reads slots past a
        # row's length, masked: finite values only)
        used = int(old.seqlens[idx].max())  # after the step's own host copy: waits on nothing
        for new, src in ((self.cache.k, old.k), (self.cache.v, old.v)):
            new[:, :, :used] = src[:, idx, :used]
            new[:, :, used:].zero_()
        self.cache.seqlens.copy_(old.seqlens[idx])
        self.root, self.last_hidden = self.root[idx], self.last_hidden[idx]
        self.keys = None if self.keys is None else self.keys[idx]
        self.index = [self.index[i] for i in live]
        self.running = torch.ones(len(live), dtype=torch.bool, device=idx.device)
        self.uploaded = [True] * len(live)

    def update_running(self, done: list[bool]) -> None:
        """The only host-to-device copy of a step, when a sequence has ended."""
        want = [not done[b] for b in self.index]
        if want != self.uploaded:
            self.running.copy_(torch.tensor(want))
            self.uploaded = want


def _decode(model: MedusaModel, plan: _Plan, config: GenerationConfig, propose: Proposer | None,
            result: GenerationResult) -> Iterator[StreamStep]:
    """Yields the new tokens (and text) of every sequence after prefill and after each step."""
    base, device = model.base, model.device
    tokens, lengths = pad_prompts(plan.prompts, device)
    B = tokens.shape[0]
    keys, generator = None, None
    if not config.greedy:  # sequence b draws position t's token with u(seed_b, t)
        seed = config.seed if config.seed is not None else _fresh_seed()
        seeds = list(seed) if isinstance(seed, tuple) else sequence_seeds(seed, B)
        keys = seed_keys(seeds, device)
    typical = config.medusa and not config.greedy and config.acceptance == "typical"
    if typical and config.seed is not None:
        first = config.seed[0] if isinstance(config.seed, tuple) else config.seed
        generator = torch.Generator(device=device).manual_seed(first)
    # graphs replay greedy and sampling steps (typical acceptance's seeded generator needs
    # GRAPH_GENERATORS); `propose` (host code) runs eagerly
    graphable = device.type == "cuda" and propose is None and (
        not typical or generator is None or GRAPH_GENERATORS)
    use_graph = graphable if config.cuda_graph is None else config.cuda_graph and graphable
    keep_fraction = KEEP_FRACTION["graph" if use_graph else "eager"]
    stop = _Stop(B, config.max_new_tokens, plan.eos)
    result.tokens = stop.tokens
    detok = None
    if plan.tokenizer is not None:
        detok = [IncrementalDetokenizer(plan.tokenizer) for _ in range(B)]
    num_heads = model.heads.num_heads if model.heads is not None else None

    def emit(new: list[list[int]]) -> StreamStep:
        out = StreamStep(new)
        if detok is not None:  # a finished sequence also gets what its decoder held back
            out.text = [d.push(t) + (d.flush() if done else "")
                        for d, t, done in zip(detok, new, stop.done, strict=True)]
        return out

    buffers: dict[Tree, TreeBuffers] = {}
    steps: dict[Tree, object] = {}  # per tree: the step on the current rows (eager or a graph)
    # an online policy learns from each step: its time and each row's accepted tree node
    observe = getattr(plan.policy, "observe", None)
    timer = _StepTimer(device) if observe is not None else None
    observe_context = observe is not None and "context" in inspect.signature(observe).parameters

    def step_for(tree: Tree, rows: _Rows):
        if tree not in plan.trees:  # the cache is sized for plan.trees only
            raise ValueError(f"tree policy {plan.tree!r} chose a tree its trees() does not list "
                             f"({len(tree) + 1} nodes): its KV cache cannot hold it")
        if tree not in buffers:
            buffers[tree] = build_tree(tree, num_heads, None, device)
        tb, cache, keys = buffers[tree], rows.cache, rows.keys
        if not tree:
            def fn(root, last_hidden, running, guesses=None):
                return plain_step(model, tb, cache, root, last_hidden, running, config,
                                  generator, keys)
        else:
            def fn(root, last_hidden, running, guesses=None):
                return medusa_step(model, tb, cache, root, last_hidden, running, config,
                                   generator, guesses, keys, leaves=observe is not None)
        if use_graph:
            return CapturedStep(fn, rows.root, rows.last_hidden, rows.running,
                                generator if typical else None)
        return fn

    start = time.perf_counter()
    with torch.inference_mode():
        cache = base.new_cache(B, plan.capacity)
        hidden = base.prefill(tokens, lengths, cache)
        last_hidden = hidden[torch.arange(B, device=device), lengths.long() - 1]  # [B, d]
        root = next_token(base, last_hidden, config, generator, keys, lengths.long())
        result.prefill_time = time.perf_counter() - start
        yield emit(stop.take([[t] for t in root.tolist()], [1] * B))

        rows = _Rows(B, cache, root, last_hidden, keys)
        del cache, hidden, root, last_hidden, keys
        while not all(stop.done):
            live = [i for i, b in enumerate(rows.index) if not stop.done[b]]
            if len(live) <= keep_fraction * len(rows.index):  # drop the finished rows
                rows.keep(base, live)
                steps.clear()  # their graphs hold the old cache
            else:
                rows.update_running(stop.done)
            if timer is not None:  # a CPU times the rest of the iteration, host work included
                timer.begin()
            context = max(len(plan.prompts[b]) + len(stop.tokens[b]) for b in rows.index
                          if not stop.done[b])
            tree = tuple(tuple(p) for p in plan.policy.choose(len(rows.index), context))
            first = tree not in steps
            if first:  # buffers, and the graph's capture, not timed
                if timer is not None:
                    timer.pause()
                steps[tree] = step_for(tree, rows)
                if timer is not None:
                    timer.resume()
            # an eager first call on CUDA compiles Triton kernels: not timed
            untimed = first and device.type == "cuda" and not use_graph
            if timer is not None:
                timer.start()  # CUDA: the step's device time
            if propose is not None and tree:  # host code: eager, on the full batch
                guesses = propose(*_full_batch(rows, B, stop))
                guesses = _checked_guesses(guesses, B, buffers[tree], base.cfg.vocab_size,
                                           device)
                if len(rows.index) < B:
                    guesses = guesses[torch.tensor(rows.index, device=device)]
                out = steps[tree](rows.root, rows.last_hidden, rows.running, guesses)
            else:
                out = steps[tree](rows.root, rows.last_hidden, rows.running)
            new_tokens, counts, rows.root, rows.last_hidden = out[:4]
            if timer is not None:
                timer.stop()
            extra = [counts[:, None].to(new_tokens.dtype)]
            if len(out) > 4:  # the accepted leaf per row, for the online policy
                extra.append(out[4][:, None].to(new_tokens.dtype))
            host = torch.cat([new_tokens, *extra], 1).tolist()  # the step's one sync
            new: list[list[int]] = [[] for _ in range(B)]
            accepted = [0] * B
            n = new_tokens.shape[1]
            for row, b in zip(host, rows.index, strict=True):
                new[b], accepted[b] = row[:n], row[n]
            step_out = emit(stop.take(new, accepted))  # the stop rules, the text
            if observe is not None:
                leaves = [row[n + 1] for row in host if row[n] > 0] if tree else None
                timer.end()
                observe(tree, len(rows.index), None if untimed else timer.seconds(), leaves,
                        **({"context": context} if observe_context else {}))
            result.steps += 1
            result.accepted_per_step.append(accepted)
            result.step_trees.append(tree)
            yield step_out
    result.wall_time = time.perf_counter() - start
    flush = getattr(plan.policy, "flush", None)
    if flush is not None:  # observations a policy kept back: its estimates up to date
        flush()
    if plan.tokenizer is not None:
        result.text = [plan.tokenizer.decode(t, skip_special_tokens=True) for t in stop.tokens]


class _StepTimer:
    """A step's cost for the online policy, with no sync of its own. On a GPU: CUDA events
    around the step, read after the step's host copy (which has waited for them). On a CPU: the
    whole loop iteration (``begin`` to ``end``: the policy's choice, the step, the host copy,
    the stop rules and the streamed text; not the first use of a tree, which builds its
    buffers, nor dropping finished rows): the host work of a step is part of what a tree
    costs there, and a small model's plain step is mostly host work; with one torch thread in
    CPU time of this thread, which computes the step (other processes, and other threads of
    this one, hardly change it), else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.events = (torch.cuda.Event(enable_timing=True),
                           torch.cuda.Event(enable_timing=True))
        self.clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        self.t0 = self.t1 = self.paused = 0.0

    def begin(self) -> None:
        if not self.cuda:
            self.t0 = self.clock()

    def pause(self) -> None:
        self.paused = self.clock()

    def resume(self) -> None:
        self.t0 += self.clock() - self.paused

    def start(self) -> None:
        if self.cuda:
            self.events[0].record()

    def stop(self) -> None:
        if self.cuda:
            self.events[1].record()

    def end(self) -> None:
        if not self.cuda:
            self.t1 = self.clock()

    def seconds(self) -> float:
        """After the step's sync: its seconds."""
        if self.cuda:
            return self.events[0].elapsed_time(self.events[1]) / 1e3
        return self.t1 - self.t0


def _full_batch(rows: _Rows, batch: int, stop: _Stop):
    """``propose``'s arguments over all B sequences: last hidden [B, d] and root [B] (zeros for
    the rows no longer computed), tokens generated so far per sequence."""
    last_hidden, root = rows.last_hidden, rows.root
    if len(rows.index) < batch:
        idx = torch.tensor(rows.index, device=root.device)
        last_hidden = last_hidden.new_zeros(batch, last_hidden.shape[1]).index_copy_(
            0, idx, last_hidden)
        root = root.new_zeros(batch).index_copy_(0, idx, root)
    return last_hidden, root, [len(t) for t in stop.tokens]


def generate(
    model: MedusaModel,
    prompt,
    max_new_tokens: int | None = None,
    medusa: bool | None = None,
    temperature: float | None = None,
    posterior_threshold: float | None = None,
    posterior_alpha: float | None = None,
    tree=None,
    eos_token_id=None,
    stream: bool = False,
    seed: int | Sequence[int] | None = None,
    max_seq_len: int | None = None,
    propose: Proposer | None = None,
    cuda_graph: bool | None = None,
    *,
    config: GenerationConfig | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    acceptance: str | None = None,
):
    """Decode up to ``max_new_tokens`` new tokens per sequence.

    Args:
        model: from ``load_model`` (or ``medusa_kernels.demo.load()``).
        prompt: a string or a list of strings (encoded with the model's tokenizer.json), a
            flat list of token ids (one sequence), a list of B id lists of any lengths, a
            [P] / [B, P] integer tensor, or chat messages: a list of ``{"role", "content"}``
            dicts (or B such lists), rendered with the checkpoint's chat template as
            transformers' ``apply_chat_template(..., add_generation_prompt=True)`` renders it
            and encoded without adding special tokens (``chat``); the result's ``text`` is
            then the reply.
        max_new_tokens, medusa, temperature, top_k, top_p, acceptance, posterior_threshold,
            posterior_alpha, tree, eos_token_id, seed, max_seq_len, cuda_graph: the
            ``GenerationConfig`` settings (see there; defaults 128, True, 0.0 = greedy, no
            top-k, no top-p, "exact", 0.09, 0.3, the online tree policy, the checkpoint's EOS,
            unseeded, no limit, CUDA graphs on CUDA). A value given here overrides
            ``config``'s; None keeps it. ``tree`` also takes "online", "table", "fixed", a
            policy table file or a policy object: the tree is then picked before each step.
        config: a ``GenerationConfig`` holding the settings (default: ``GenerationConfig()``).
        stream: return a ``GenerationStream`` yielding, after prefill and every step, a
            ``StreamStep``: the list of new tokens of each sequence, with ``.text`` (the new
            text of each, when the model has a tokenizer).
        propose: replaces the heads' top-k (``(last_hidden, root, num_generated) -> [B, K, k]``
            token ids), e.g. to test with known-good candidates.
    Returns:
        ``GenerationResult`` (tokens, text, steps, accepted tokens per step, times), or a
        ``GenerationStream`` when ``stream``. Every argument is checked before any work: a
        bad one raises ``TypeError``/``ValueError`` naming it.
    A seed reproduces a run. Plain sampling and exact Medusa sampling draw the token at
    position t of sequence b with u(seed_b, t) (seed_b: the sequence's own seed, see
    ``GenerationConfig.seed``), with or without CUDA graphs: the same seed gives the same
    tokens (module doc). Typical acceptance draws from a torch generator seeded with the
    (first) seed, so with CUDA graphs it draws other numbers than without them.
    """
    if not isinstance(model, MedusaModel):
        raise TypeError(f"model must be a MedusaModel (from load_model), got {describe(model)}")
    config = build_config(
        config, max_new_tokens=max_new_tokens, medusa=medusa, temperature=temperature,
        posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha, tree=tree,
        eos_token_id=eos_token_id, seed=seed, max_seq_len=max_seq_len, cuda_graph=cuda_graph,
        top_k=top_k, top_p=top_p, acceptance=acceptance,
    )  # fmt: skip
    stream = check_bool("stream", stream)
    if propose is not None and not callable(propose):
        raise TypeError(f"propose must be a function or None, got {describe(propose)}")
    plan = _plan(model, prompt, config, propose)
    result = GenerationResult(tokens=[], tree=plan.tree, pad_token_id=plan.pad_token_id)
    steps = _decode(model, plan, config, propose, result)
    if stream:
        return GenerationStream(steps, result)
    for _ in steps:
        pass
    return result


class GenerationStream:
    """Iterator over per-step ``StreamStep``s; ``result`` is complete once it is exhausted."""

    def __init__(self, steps: Iterator[StreamStep], result: GenerationResult):
        self._steps, self.result = steps, result

    def __iter__(self) -> Iterator[StreamStep]:
        return self._steps
