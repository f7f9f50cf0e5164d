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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .checkpoint import MedusaModel
from .ops import accept_greedy_ids, accept_typical, compact_kv_cache, sample_tokens
from .tree import TreeBuffers, build_tree, resolve_choices

# propose(last_hidden [B, d], root [B], num_generated per sequence) -> top-k token ids [B, K, k]
Proposer = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


@dataclass
class GenerationResult:
    """New tokens per sequence (prompt excluded), with step statistics."""

    tokens: list[list[int]]
    steps: int = 0
    accepted_per_step: list[list[int]] = field(default_factory=list)  # [step][seq], 0 = done
    prefill_time: float = 0.0
    wall_time: float = 0.0

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


def pad_prompts(input_ids, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] tensor or a list of token lists -> right-padded tokens [B, P], lengths [B] int32."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, P] with P >= 1, got {tuple(input_ids.shape)}")
        prompts = input_ids.tolist()
    else:
        prompts = [list(p) for p in input_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("input_ids must hold at least one non-empty prompt")
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
    return tokens.to(device), lengths.to(device)


def _check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    if bool(((tokens < 0) | (tokens >= vocab_size)).any()):
        raise ValueError(f"input_ids must lie in [0, vocab_size = {vocab_size})")


class _Stop:
    """Host-side stop bookkeeping: per-sequence EOS and max_new_tokens."""

    def __init__(self, batch: int, max_new_tokens: int, eos_token_id):
        self.max_new = max_new_tokens
        eos = [] if eos_token_id is None else eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else eos)
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


def next_token(base, hidden, temperature=0.0, generator=None) -> torch.Tensor:
    """hidden [B, d] -> the next token [B]: the argmax (without full logits) or a sample."""
    if temperature <= 0:
        return base.greedy(hidden)
    return sample_tokens(base.logits(hidden), temperature, generator)


def plain_step(model, tb, cache, root, last_hidden, running, temperature=0.0, generator=None):
    """One plain decoding step: root [B] goes into the cache, the next token comes out.

    Returns (new_tokens [B, 1], counts [B] int32 (0 for finished sequences), next root [B],
    hidden [B, d]). Advances ``cache.seqlens`` of running sequences.
    """
    h = model.base.step(root[:, None], cache, tb.tree_mask, tb.depths)[:, 0]
    next_root = next_token(model.base, h, temperature, generator)
    counts = running.to(torch.int32)
    cache.seqlens.add_(counts)
    return next_root[:, None], counts, next_root, h


def medusa_step(model, tb, cache, root, last_hidden, running, temperature=0.0,
                posterior_threshold=0.09, posterior_alpha=0.3, generator=None, guesses=None):
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
    if temperature <= 0:  # greedy: argmax ids straight from the fused lm_head top-1
        counts, path, next_root = accept_greedy_ids(
            model.base.greedy(h), candidates, tb.retrieve_indices)
    else:
        counts, path, next_root = accept_typical(
            model.base.logits(h), candidates, tb.retrieve_indices, temperature,
            posterior_threshold, posterior_alpha, generator,
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


def _decode(
    model: MedusaModel,
    input_ids,
    max_new_tokens: int,
    medusa: bool,
    temperature: float,
    posterior_threshold: float,
    posterior_alpha: float,
    tree,
    eos_token_id,
    seed: int | None,
    max_seq_len: int | None,
    propose: Proposer | None,
    cuda_graph: bool | None,
    result: GenerationResult,
) -> Iterator[list[list[int]]]:
    """Yields the new tokens of every sequence after prefill and after each step."""
    base, device = model.base, model.device
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if medusa and model.heads is None and propose is None:
        raise ValueError("medusa=True needs Medusa heads: load_model(..., medusa=DIR)")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on CUDA, not {device.type}")
    tokens, lengths = pad_prompts(input_ids, device)
    _check_tokens(tokens, base.cfg.vocab_size)
    B = tokens.shape[0]
    num_heads = model.heads.num_heads if model.heads is not None else None
    choices = resolve_choices(tree, num_heads) if medusa else []  # default: cut to the heads
    tb: TreeBuffers = build_tree(choices, num_heads, None, device)
    # Before its last step a sequence holds < P + max_new - 1 cached tokens; that step may
    # accept up to depth + 1 (overshooting max_new), and finished rows still get the tree
    # written (T nodes) at their seqlens while other rows run on.
    capacity = tokens.shape[1] + max_new_tokens + tb.depth + tb.num_nodes
    if max_seq_len is not None and capacity > max_seq_len:
        raise ValueError(
            f"prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) + tree depth "
            f"({tb.depth}) + tree nodes ({tb.num_nodes}) = {capacity} exceeds max_seq_len = "
            f"{max_seq_len}"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    # graphs replay greedy and sampling steps (a seeded generator needs GRAPH_GENERATORS);
    # `propose` (host code) runs eagerly
    graphable = device.type == "cuda" and propose is None and (
        temperature == 0 or generator is None or GRAPH_GENERATORS)
    use_graph = graphable if cuda_graph is None else bool(cuda_graph) and graphable
    stop = _Stop(B, max_new_tokens, eos_token_id)
    result.tokens = stop.tokens
    start = time.perf_counter()

    with torch.inference_mode():
        cache = base.new_cache(B, capacity)
        hidden = base.prefill(tokens, lengths, cache)
        last_hidden = hidden[torch.arange(B, device=device), lengths.long() - 1]  # [B, d]
        root = next_token(base, last_hidden, temperature, generator)
        result.prefill_time = time.perf_counter() - start
        yield stop.take([[t] for t in root.tolist()], [1] * B)

        if medusa:
            def step(root, last_hidden, running, guesses=None):
                return medusa_step(model, tb, cache, root, last_hidden, running, temperature,
                                   posterior_threshold, posterior_alpha, generator, guesses)
        else:
            def step(root, last_hidden, running):
                return plain_step(model, tb, cache, root, last_hidden, running, temperature,
                                  generator)
        running = torch.ones(B, dtype=torch.bool, device=device)
        run = step
        if use_graph:
            run = CapturedStep(step, root, last_hidden, running,
                               generator if temperature > 0 else None)
        done_uploaded = [False] * B
        while not all(stop.done):
            if stop.done != done_uploaded:  # the only host-to-device copy, when a sequence ends
                running.copy_(torch.tensor([not d for d in stop.done]))
                done_uploaded = list(stop.done)
            if propose is not None:
                guesses = propose(last_hidden, root, [len(t) for t in stop.tokens])
                new_tokens, counts, root, last_hidden = step(root, last_hidden, running, guesses)
            else:
                new_tokens, counts, root, last_hidden = run(root, last_hidden, running)
            host = torch.cat([new_tokens, counts[:, None].to(new_tokens.dtype)], 1).tolist()
            result.steps += 1
            result.accepted_per_step.append([row[-1] for row in host])
            yield stop.take([row[:-1] for row in host], [row[-1] for row in host])
    result.wall_time = time.perf_counter() - start


def generate(
    model: MedusaModel,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    medusa: bool = True,
    temperature: float = 0.0,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    tree=None,
    eos_token_id: int | Sequence[int] | None = None,
    stream: bool = False,
    seed: int | None = None,
    max_seq_len: int | None = None,
    propose: Proposer | None = None,
    cuda_graph: bool | None = None,
):
    """Decode up to ``max_new_tokens`` new tokens per sequence.

    Args:
        model: from ``load_model``.
        input_ids: [B, P] int tensor, or a list of B token lists of any lengths.
        medusa: Medusa decoding (needs heads) or, False, plain decoding: the baseline.
        temperature: 0 = greedy (Medusa output identical to plain greedy); > 0 samples, with
            typical acceptance (``posterior_threshold``, ``posterior_alpha``) for Medusa.
        tree: a tree name from ``tree.TREES``, a JSON file, or a medusa_choices list
            (default ``mc_sim_7b_63``, cut to the heads the model has).
        eos_token_id: token id(s) that end a sequence (kept in its output).
        stream: return an iterator yielding, after prefill and every step, the list of new
            tokens of each sequence; its ``result`` attribute fills in as it runs.
        seed: seeds sampling. max_seq_len: refuse up front if the cache would need more.
        propose: replaces the heads' top-k (``(last_hidden, root, num_generated) -> [B, K, k]``
            token ids), e.g. to test with known-good candidates.
        cuda_graph: replay each step from a CUDA graph (default: on for a model on CUDA, greedy
            or sampling; ``propose`` runs eagerly). Sampling with graphs draws other random
            numbers than without them, so a seed reproduces a run of the same mode.
    Returns:
        ``GenerationResult`` (tokens, steps, accepted tokens per step, times), or a
        ``GenerationStream`` when ``stream``.
    """
    result = GenerationResult(tokens=[])
    steps = _decode(model, input_ids, max_new_tokens, medusa, temperature, posterior_threshold,
                    posterior_alpha, tree, eos_token_id, seed, max_seq_len, propose, cuda_graph,
                    result)
    if stream:
        return GenerationStream(steps, result)
    for _ in steps:
        pass
    return result


class GenerationStream:
    """Iterator over per-step new tokens; ``result`` is complete once it is exhausted."""

    def __init__(self, steps: Iterator[list[list[int]]], result: GenerationResult):
        self._steps, self.result = steps, result

    def __iter__(self) -> Iterator[list[list[int]]]:
        return self._steps
