"""The generation loop: plain decoding and Medusa decoding through the same decoder.

Medusa step, for a batch of B sequences (state: each sequence's root token, already emitted but
not yet in the cache, and the hidden state that produced it)::

    heads' top-k on the hidden state  ->  tree candidates [B, T] (root + guesses)
    one tree forward (KV written at [len, len + T))  ->  tree hidden states [B, T, d]
    acceptance: longest path the base model agrees with  ->  accepted nodes, next root
      (greedy: the base argmax per node from the fused lm_head top-1, no [B, T, V] logits;
       typical: full logits)
    compaction: accepted KV moved to [len, len + accepted), len += accepted

Greedy acceptance makes the output identical to plain greedy decoding. Everything stays on the
device; the one host sync per step copies the new tokens out (streaming and the stop check).

``generate`` checks everything first (``GenerationConfig`` the settings, ``_plan`` what
depends on the model: prompt ids, EOS, tree, positions), then runs ``_decode``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .checkpoint import MedusaModel
from .generation_config import GenerationConfig, build_config, check_bool, check_token_ids, describe
from .ops import accept_greedy_ids, accept_typical, compact_kv_cache, sample_tokens
from .text import IncrementalDetokenizer, prompt_token_lists
from .tree import (
    TreeBuffers,
    build_tree,
    check_fits,
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
    has a tokenizer, else None. ``tree``: the tree used ("plain" without Medusa).
    ``pad_token_id``: the checkpoint's pad id (else its EOS, else 0), for ``padded``.
    """

    tokens: list[list[int]]
    steps: int = 0
    accepted_per_step: list[list[int]] = field(default_factory=list)  # [step][seq], 0 = done
    prefill_time: float = 0.0
    wall_time: float = 0.0
    text: list[str] | None = None
    tree: str = ""
    pad_token_id: int = 0

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


def next_token(base, hidden, config: GenerationConfig = GREEDY, generator=None) -> torch.Tensor:
    """hidden [B, d] -> the next token [B]: the argmax (without full logits) or a sample."""
    if config.greedy:
        return base.greedy(hidden)
    return sample_tokens(base.logits(hidden), config.temperature, generator)


def plain_step(model, tb, cache, root, last_hidden, running, config: GenerationConfig = GREEDY,
               generator=None):
    """One plain decoding step: root [B] goes into the cache, the next token comes out.

    Returns (new_tokens [B, 1], counts [B] int32 (0 for finished sequences), next root [B],
    hidden [B, d]). Advances ``cache.seqlens`` of running sequences.
    """
    h = model.base.step(root[:, None], cache, tb.tree_mask, tb.depths)[:, 0]
    next_root = next_token(model.base, h, config, generator)
    counts = running.to(torch.int32)
    cache.seqlens.add_(counts)
    return next_root[:, None], counts, next_root, h


def medusa_step(model, tb, cache, root, last_hidden, running, config: GenerationConfig = GREEDY,
                generator=None, guesses=None):
    """One Medusa step (see the module doc); ``guesses`` [B, K, k] replaces the heads' top-k.

    Returns (new_tokens [B, A]: the first counts[b] are new, counts [B] int32 (0 for finished
    sequences), next root [B], its hidden state [B, d]). Compacts the cache.
    """
    B = root.shape[0]
    if guesses is None:
        if tb.depth == 0:  # root-only tree: nothing to guess
            guesses = root.new_zeros(B, 0, 1)
        else:
            _, guesses = model.heads.topk(last_hidden, tb.topk, tb.depth)
    candidates = tb.candidates(root, guesses)  # [B, T]
    h = model.base.step(candidates, cache, tb.tree_mask, tb.depths)  # [B, T, d]
    if config.greedy:  # argmax ids straight from the fused lm_head top-1
        counts, path, next_root = accept_greedy_ids(
            model.base.greedy(h), candidates, tb.retrieve_indices)
    else:
        counts, path, next_root = accept_typical(
            model.base.logits(h), candidates, tb.retrieve_indices, config.temperature,
            config.posterior_threshold, config.posterior_alpha, generator,
        )  # fmt: skip
    counts = torch.where(running, counts, 0)
    last = (counts.long() - 1).clamp(min=0)[:, None]
    next_hidden = h[torch.arange(B, device=h.device), path.gather(1, last)[:, 0]]
    # new tokens: the accepted path after the root, then the next root
    new_tokens = candidates.gather(1, path.clamp(min=0)).roll(-1, dims=1)
    new_tokens.scatter_(1, last, next_root[:, None])
    compact_kv_cache(cache.k, cache.v, cache.seqlens, path, counts)
    return new_tokens, counts, next_root, next_hidden


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
    """What ``generate`` settled before any work: the checked prompts, EOS ids, tree."""

    prompts: list[list[int]]
    eos: frozenset[int]
    pad_token_id: int
    tb: TreeBuffers
    tree: str
    capacity: int
    tokenizer: object | None


def _plan(model: MedusaModel, prompt, config: GenerationConfig, propose) -> _Plan:
    """Every check that needs the model: prompt ids, EOS, heads, tree, positions, cache size."""
    base, device = model.base, model.device
    V = base.cfg.vocab_size
    defaults = model.generation_defaults()
    source = f"from {defaults['source']}"
    tokenizer = model.cached_tokenizer()
    bos = None
    if defaults["add_bos_token"] is True and defaults["bos_token_id"] is not None:
        bos = check_token_ids(f"bos_token_id ({source})", defaults["bos_token_id"], V)[0]
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
    if not config.medusa:
        choices, label = [], "plain"
    elif config.tree is None:  # the device's default, cut to the heads and the vocabulary
        source_tree = default_tree(device, model.model_dir)
        label = tree_label(source_tree)
        choices = fit_choices(load_tree(source_tree), num_heads, V)
    else:  # asked for: used whole, or a clear error
        label = tree_label(config.tree)
        choices = [list(p) for p in config.tree_choices]
        check_fits(choices, label, num_heads, V)
    tb = build_tree(choices, num_heads, None, device)

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
    # written (T nodes) at their seqlens while other rows run on.
    capacity = longest + config.max_new_tokens + tb.depth + tb.num_nodes
    if config.max_seq_len is not None and capacity > config.max_seq_len:
        raise ValueError(
            f"prompt ({longest}) + max_new_tokens ({config.max_new_tokens}) + tree depth "
            f"({tb.depth}) + tree nodes ({tb.num_nodes}) = {capacity} exceeds max_seq_len = "
            f"{config.max_seq_len}"
        )
    if config.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on CUDA, not {device.type}")
    return _Plan(prompts, frozenset(eos), pad, tb, label, capacity, tokenizer)


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


def _decode(model: MedusaModel, plan: _Plan, config: GenerationConfig, propose: Proposer | None,
            result: GenerationResult) -> Iterator[StreamStep]:
    """Yields the new tokens (and text) of every sequence after prefill and after each step."""
    base, device, tb = model.base, model.device, plan.tb
    tokens, lengths = pad_prompts(plan.prompts, device)
    B = tokens.shape[0]
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    # graphs replay greedy and sampling steps (a seeded generator needs GRAPH_GENERATORS);
    # `propose` (host code) runs eagerly
    graphable = device.type == "cuda" and propose is None and (
        config.greedy or generator is None or GRAPH_GENERATORS)
    use_graph = graphable if config.cuda_graph is None else config.cuda_graph and graphable
    stop = _Stop(B, config.max_new_tokens, plan.eos)
    result.tokens = stop.tokens
    detok = None
    if plan.tokenizer is not None:
        detok = [IncrementalDetokenizer(plan.tokenizer) for _ in range(B)]

    def emit(new: list[list[int]]) -> StreamStep:
        out = StreamStep(new)
        if detok is not None:  # a finished sequence also gets what its decoder held back
            out.text = [d.push(t) + (d.flush() if done else "")
                        for d, t, done in zip(detok, new, stop.done, strict=True)]
        return out

    start = time.perf_counter()
    with torch.inference_mode():
        cache = base.new_cache(B, plan.capacity)
        hidden = base.prefill(tokens, lengths, cache)
        last_hidden = hidden[torch.arange(B, device=device), lengths.long() - 1]  # [B, d]
        root = next_token(base, last_hidden, config, generator)
        result.prefill_time = time.perf_counter() - start
        yield emit(stop.take([[t] for t in root.tolist()], [1] * B))

        if config.medusa:
            def step(root, last_hidden, running, guesses=None):
                return medusa_step(model, tb, cache, root, last_hidden, running, config,
                                   generator, guesses)
        else:
            def step(root, last_hidden, running):
                return plain_step(model, tb, cache, root, last_hidden, running, config,
                                  generator)
        running = torch.ones(B, dtype=torch.bool, device=device)
        run = step
        if use_graph:
            run = CapturedStep(step, root, last_hidden, running,
                               generator if not config.greedy else None)
        done_uploaded = [False] * B
        while not all(stop.done):
            if stop.done != done_uploaded:  # the only host-to-device copy, when a sequence ends
                running.copy_(torch.tensor([not d for d in stop.done]))
                done_uploaded = list(stop.done)
            if propose is not None:
                guesses = propose(last_hidden, root, [len(t) for t in stop.tokens])
                guesses = _checked_guesses(guesses, B, tb, base.cfg.vocab_size, device)
                new_tokens, counts, root, last_hidden = step(root, last_hidden, running, guesses)
            else:
                new_tokens, counts, root, last_hidden = run(root, last_hidden, running)
            host = torch.cat([new_tokens, counts[:, None].to(new_tokens.dtype)], 1).tolist()
            result.steps += 1
            result.accepted_per_step.append([row[-1] for row in host])
            yield emit(stop.take([row[:-1] for row in host], [row[-1] for row in host]))
    result.wall_time = time.perf_counter() - start
    if plan.tokenizer is not None:
        result.text = [plan.tokenizer.decode(t, skip_special_tokens=True) for t in stop.tokens]


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
    seed: int | None = None,
    max_seq_len: int | None = None,
    propose: Proposer | None = None,
    cuda_graph: bool | None = None,
    *,
    config: GenerationConfig | None = None,
):
    """Decode up to ``max_new_tokens`` new tokens per sequence.

    Args:
        model: from ``load_model`` (or ``medusa_kernels.demo.load()``).
        prompt: a string or a list of strings (encoded with the model's tokenizer.json), a
            flat list of token ids (one sequence), a list of B id lists of any lengths, or a
            [P] / [B, P] integer tensor.
        max_new_tokens, medusa, temperature, posterior_threshold, posterior_alpha, tree,
            eos_token_id, seed, max_seq_len, cuda_graph: the ``GenerationConfig`` settings
            (see there; defaults 128, True, 0.0 = greedy, 0.09, 0.3, the device's default
            tree, the checkpoint's EOS, unseeded, no limit, CUDA graphs on CUDA). A value
            given here overrides ``config``'s; None keeps it.
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
    Sampling with CUDA graphs draws other random numbers than without them, so a seed
    reproduces a run of the same mode.
    """
    if not isinstance(model, MedusaModel):
        raise TypeError(f"model must be a MedusaModel (from load_model), got {describe(model)}")
    config = build_config(
        config, max_new_tokens=max_new_tokens, medusa=medusa, temperature=temperature,
        posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha, tree=tree,
        eos_token_id=eos_token_id, seed=seed, max_seq_len=max_seq_len, cuda_graph=cuda_graph,
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
