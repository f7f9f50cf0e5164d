"""Benchmark section: the whole decode step and real generation, plain vs Medusa (``e2e``).

Parts run in the order 2, 1, 3.

1. Step timing, random weights (``impl`` "plain_step" / "medusa_step"): one plain decode step
   (1 token per sequence) against one Medusa step (heads' top-k, the tree forward of T nodes,
   acceptance, KV compaction) with the cache holding L tokens (random K/V, ``seqlens`` reset to
   L before every call, inside the timing: one tiny copy for both). CUDA (``ctx.dtype``, bf16 by
   default): Vicuna-7B (32 layers, d 4096, MHA, V 32000) and a Llama-3.2-1B shape (16 layers,
   d 2048, GQA 32/8, V 128256), B 1, L 1024 (full: also 4096), each step captured in a CUDA
   graph (``mode`` "graph", what ``generate`` replays) and as plain calls ("eager"); 7B is
   skipped with a note when the GPU lacks the memory. CPU: a tiny model (2 layers, d 128),
   fp32, L 64 and 256 (full: also 1024).
   bytes_moved = the weights a step must read (base, plus the heads the tree uses for Medusa)
   + the K/V prefix, so ``frac_floor`` is the fraction of the weight-streaming floor.
   ``ratio_vs_plain`` (Medusa step time / plain step time, same mode) is the break-even: Medusa
   wins when the mean accepted tokens per step exceed it. (Random heads accept ~nothing: these
   rows time the step, whatever it accepts.)
2. Real generation (``impl`` "plain_generate" / "medusa_generate"): greedy decoding of a few
   prompts with the model given by ``ctx.model_dir``/``ctx.medusa_dir`` or, by default, the
   bundled demo model (held-out prompts; CPU quick: 4 prompts x 64 tokens, 2 x 32 on gloo
   ranks, CUDA: 4 x 128, 8 x 256 for a real checkpoint without --quick), with the default
   tree (or ``--tree``) and, for the demo without ``--tree``, also with its shipped calibrated
   trees (``demo_trees``: 63 nodes grown from its heads' accuracies, and the size ``--nodes
   auto`` chose on a CPU); one ``medusa_generate`` row per tree. Tokens/s leave out prefill
   and the first step (CUDA graph capture, warm-up); ``mean_accepted``, the acceptance-length
   histogram ``accept_hist`` (accepted tokens per step -> steps) and ``identical``: Medusa's
   output equals plain greedy decoding token for token (``check`` "ok"; in bf16/fp16 a
   divergence is reported as a note, since the tree forward and the one-token forward round
   differently on near-ties).

3. Plain decoding against transformers (``impl`` "plain_decode" / "hf_generate"): greedy
   decoding of one random prompt (CUDA: 128 tokens, then 128 new; CPU: 32, then 32) with the
   random models of part 1: ours (``generate``, CUDA graphs on CUDA) and transformers'
   ``LlamaForCausalLM.generate`` on the very same weight tensors (no copy), with its dynamic
   cache and, at Vicuna-7B only on CUDA (its first call compiles), its static cache (what
   ``cache_implementation="static"`` does by default: ``torch.compile`` on CUDA). Tokens/s
   after the first new token; ``frac_floor`` against reading the weights once per token;
   ``speedup_vs_hf_*`` on our row; ``identical`` says whether the two greedy outputs agree
   (random weights give near-ties, so bf16 may differ: a note, not a failure). Skipped with a
   note when transformers is not installed. Runs last, so a time limit costs it first.

``ctx.shapes`` filters by ``key=value`` words (``model=llama-1b``, ``L=1024``).

Tensor parallelism: under ``torchrun --nproc-per-node N ... -m medusa_kernels.bench --only e2e``
every rank holds its part of the model (``load_model(..., tp=True)``; random models built as
``Transformer(cfg, tp)``): parts 1 and 2 run tensor-parallel and their rows carry ``tp`` = N,
rank 0's times (NCCL on ``cuda:LOCAL_RANK``, collectives inside the captured graphs; gloo on
CPUs, eager). Steps are timed with a fixed number of calls (the ranks must make the same calls:
a time budget could differ between them). Part 3 needs one process (transformers' peer) and is
skipped with a note.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import torch

from medusa_kernels.checkpoint import MedusaModel, load_model
from medusa_kernels.decoding import generate, medusa_step, plain_step
from medusa_kernels.heads import MedusaHeads
from medusa_kernels.model import ModelConfig, Transformer
from medusa_kernels.parallel import (
    SINGLE,
    TPGroup,
    group_ending,
    init_tp,
    launched_world,
    rank_device,
)
from medusa_kernels.tree import DEFAULT_TREE, TREES, build_tree, resolve_choices

from ._common import (
    BenchContext,
    case_wanted,
    cuda_usable,
    failure_row,
    graphed,
    timed_mode_row,
)

SECTION = "e2e"

SHAPES: dict[str, dict] = {
    "vicuna-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                     rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=32),
}  # fmt: skip

# Vicuna's chat template (the MT-bench setting of the Medusa paper), for real checkpoints.
CHAT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: {} ASSISTANT:"
)
QUESTIONS = [
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Explain how a hash table works and when its lookups become slow.",
    "Give three tips for writing clear technical documentation.",
    "Summarise the causes of the French Revolution in a short paragraph.",
    "What is the difference between a process and a thread?",
    "Write a haiku about autumn rain, then explain its imagery.",
    "Describe how to make a simple tomato sauce, step by step.",
    "Why is the sky blue? Answer for a ten-year-old.",
]


def _tree_label(ctx: BenchContext) -> str:
    return os.path.basename(str(ctx.tree)) if ctx.tree is not None else DEFAULT_TREE


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_model(cfg: ModelConfig, num_heads: int, dtype, device, seed: int = 0,
                 tp: TPGroup = SINGLE) -> MedusaModel:
    """A base model and one-layer Medusa heads with random weights, built on ``device`` (under
    tensor parallelism this rank's part, drawn from the same seed on every rank)."""
    with torch.device("meta"):
        base = Transformer(cfg, tp)
        heads = MedusaHeads(num_heads, 1, cfg.hidden_size, cfg.vocab_size, tp)
    base = base.to(dtype=dtype).to_empty(device=device)
    heads = heads.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor: tie them again
        base.lm_head.weight = base.embed.weight
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for module in (base, heads):
            for name, p in module.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif p.dim() == 1 or name == "b1":
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=gen)
    return MedusaModel(base.eval(), heads.eval())


def weight_bytes(base: Transformer) -> int:
    """Bytes of the base weights one decode step reads (the embedding table is only gathered
    from, unless it is also the lm_head)."""
    total = sum(p.numel() * p.element_size() for p in base.parameters())
    if not base.cfg.tie_word_embeddings:
        total -= base.embed.weight.numel() * base.embed.weight.element_size()
    return total


def _param_count(cfg: ModelConfig, num_heads: int) -> int:
    with torch.device("meta"):
        base, heads = Transformer(cfg), MedusaHeads(num_heads, 1, cfg.hidden_size, cfg.vocab_size)
    return sum(p.numel() for m in (base, heads) for p in m.parameters())


def step_fns(model: MedusaModel, trees: list, batch: int, context: int) -> list:
    """Closures of one plain step, then one Medusa step per tree (``TreeBuffers``), on a shared
    cache of ``batch`` sequences holding ``context`` tokens each (random K/V; ``seqlens``
    reset to ``context`` in every call, so each call does the same work), random root tokens
    and hidden states."""
    base, device = model.base, model.device
    plain_tree = build_tree([], None, None, device)
    cache = base.new_cache(batch, context + max([t.num_nodes for t in trees], default=1) + 8)
    gen = torch.Generator(device).manual_seed(context)
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    lens0 = torch.full((batch,), context, dtype=torch.int32, device=device)
    root = torch.randint(base.cfg.vocab_size, (batch,), generator=gen, device=device)
    last_hidden = torch.randn(batch, base.cfg.hidden_size, generator=gen, device=device,
                              dtype=model.dtype)  # fmt: skip
    running = torch.ones(batch, dtype=torch.bool, device=device)

    def fn(step, tree):
        def call():
            cache.seqlens.copy_(lens0)
            return step(model, tree, cache, root, last_hidden, running)

        return call

    return [fn(plain_step, plain_tree)] + [fn(medusa_step, t) for t in trees]


def _step_rows(ctx: BenchContext, name: str, lengths: tuple[int, ...], B: int = 1,
               tp: TPGroup = SINGLE) -> list[dict]:
    """plain_step vs medusa_step of a random ``SHAPES[name]`` model at each context length
    (this rank's part of it under tensor parallelism)."""
    cfg = ModelConfig(**SHAPES[name])
    dtype = ctx.dtype if ctx.cuda else torch.float32
    choices = resolve_choices(ctx.tree)
    depth = max((len(p) for p in choices), default=0)
    num_heads = max(depth, 1)
    cases = [
        dict(model=name, B=B, L=L, tree=_tree_label(ctx), tree_nodes=len(choices) + 1,
             dtype=_dtype_name(dtype), **_tp_case(tp))
        for L in lengths
    ]  # fmt: skip
    cases = [c for c in cases if case_wanted(ctx, c)]
    if not cases:
        return []
    elsize = torch.finfo(dtype).bits // 8
    if ctx.cuda:
        kv_max = 2 * cfg.num_layers * B * (max(lengths) + 128) * cfg.num_kv_heads * cfg.head_dim
        need = (_param_count(cfg, num_heads) + kv_max) * elsize // tp.world + (3 << 30)
        free = torch.cuda.mem_get_info(_device(ctx, tp))[0]
        if free < need:
            ctx.notes.append(
                f"{SECTION}: {name} skipped: needs ~{need / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB free"
            )
            return []
    model = random_model(cfg, num_heads, dtype, _device(ctx, tp), tp=tp)
    tree = build_tree(choices, num_heads, None, model.device)
    weights = weight_bytes(model.base)
    heads = model.heads
    heads_bytes = sum(t[:depth].numel() for t in (heads.w1, heads.b1, heads.w2)) * elsize
    rows = []
    for case in cases:
        L = case["L"]
        kv = 2 * cfg.num_layers * B * L * cfg.num_kv_heads * cfg.head_dim * elsize // tp.world
        plain, medusa = step_fns(model, [tree], B, L)

        for mode in ("graph", "eager") if ctx.cuda else ("eager",):
            try:
                rows += _time_pair(ctx, case, mode, plain, medusa, weights + kv,
                                   weights + heads_bytes + kv, tp)  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                ctx.notes.append(f"{SECTION}: {name} L={L} {mode} ran out of GPU memory")
                torch.cuda.empty_cache()
            except Exception as e:  # a step that fails (or cannot be captured): recorded
                if not ctx.cuda:
                    raise
                rows.append(failure_row(ctx, SECTION, "step", e, True, mode=mode, **case))
        del plain, medusa  # and the cache they hold
    return rows


def _time_pair(ctx, case, mode, plain, medusa, plain_bytes, medusa_bytes,
               tp: TPGroup = SINGLE) -> list[dict]:
    """Rows for plain_step and medusa_step in ``mode``; the Medusa row gets the time ratio."""
    rows = []
    with torch.inference_mode():
        for impl, fn, nbytes in (("plain_step", plain, plain_bytes),
                                 ("medusa_step", medusa, medusa_bytes)):  # fmt: skip
            if tp.world > 1:
                row = _tp_timed_row(ctx, tp, impl, fn, nbytes, mode, **case)
            else:
                row = timed_mode_row(ctx, SECTION, impl, fn, nbytes, True, mode, **case)
            if row is not None:
                rows.append(row)
    if len(rows) == 2 and all("median_us" in r for r in rows):
        rows[1]["ratio_vs_plain"] = rows[1]["median_us"] / rows[0]["median_us"]
    return rows


def _tp_timed_row(ctx: BenchContext, group: TPGroup, impl: str, fn, bytes_moved: int,
                  mode: str, **case) -> dict:
    """``timed_row`` for a tensor-parallel step: every rank makes the same fixed number of
    calls (a time budget could differ between ranks and leave one waiting in a collective);
    rank 0's times (the collectives keep the ranks in step)."""
    import statistics

    run = graphed(fn) if mode == "graph" else fn
    warmup, reps = (3, 10) if ctx.quick else (5, 50)
    for _ in range(warmup):
        run()
    sync = torch.cuda.synchronize if ctx.cuda else (lambda: None)
    sync()
    group.barrier()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(1e6 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=10, method="inclusive")
    median = statistics.median(times)
    floor_us = bytes_moved / (ctx.copy_gbps * 1e9) * 1e6 if ctx.copy_gbps else None
    row = dict(section=SECTION, impl=impl, **case, mode=mode, median_us=median, p20_us=q[1],
               p80_us=q[7], gbps=bytes_moved / (median * 1e-6) / 1e9, floor_us=floor_us,
               frac_floor=floor_us / median if floor_us else None)  # fmt: skip
    if ctx.on_row is not None:
        ctx.on_row(row)
    return row


def _tp_case(tp: TPGroup) -> dict:
    """The ``tp`` key of a tensor-parallel row (none for one process: rows as before)."""
    return {"tp": tp.world} if tp.world > 1 else {}


def _device(ctx: BenchContext, tp: TPGroup) -> torch.device:
    """This rank's device (``cuda:LOCAL_RANK`` under tensor parallelism on GPUs)."""
    return rank_device(ctx.device) if tp.world > 1 else ctx.device


def _each_model(ctx: BenchContext, names, rows_of, impl: str) -> list[dict]:
    """``rows_of(name)`` for each model. On the GPU a model that runs out of memory is noted, one
    that raises becomes a failure row, and the next model still runs (until CUDA breaks); the
    CPU raises. The model goes with ``rows_of``'s frame; ``cuda_usable`` frees its memory."""
    rows = []
    for name in names:
        try:
            rows += rows_of(name)
        except torch.cuda.OutOfMemoryError:
            ctx.notes.append(f"{SECTION}: {impl} {name} ran out of GPU memory")
        except Exception as e:
            if not ctx.cuda:
                raise
            rows.append(failure_row(ctx, SECTION, impl, e, True, model=name))
        if ctx.cuda and not cuda_usable(ctx):
            break
    return rows


def _step_section(ctx: BenchContext, tp: TPGroup = SINGLE) -> list[dict]:
    if ctx.cuda:
        names, lengths = ("llama-1b", "vicuna-7b"), (1024,) if ctx.quick else (1024, 4096)
    else:
        names, lengths = ("tiny",), (64, 256) if ctx.quick else (64, 256, 1024)
    names = [n for n in names if _splits(ctx, n, tp)]
    return _each_model(ctx, names, lambda name: _step_rows(ctx, name, lengths, tp=tp), "step")


def _splits(ctx: BenchContext, name: str, tp: TPGroup) -> bool:
    """Whether ``SHAPES[name]``'s heads split over the ranks (else a note)."""
    shape = SHAPES[name]
    for key in ("num_kv_heads", "intermediate_size"):
        if shape[key] % tp.world:
            ctx.notes.append(f"{SECTION}: {name} skipped: {key} = {shape[key]} does not divide "
                             f"by tp = {tp.world}")
            return False
    return True


def hf_twin(base: Transformer):
    """transformers' ``LlamaForCausalLM`` on ``base``'s own weight tensors (no copy): the peer
    of plain decoding. Plain Llama only (no rope scaling, no biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = base.cfg
    if cfg.rope_scaling or cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        raise NotImplementedError("hf_twin: plain Llama shapes only (no rope scaling, no bias)")
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
        pad_token_id=0,
    )  # fmt: skip
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(base.hf_state_dict(), strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    device = base.lm_head.weight.device
    rotary = hf.model.rotary_emb  # its inv_freq buffer was built on meta: build it for real
    with torch.device(device):
        hf.model.rotary_emb = type(rotary)(config=hf_cfg)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"hf_twin: tensors left on meta: {left[:5]}")
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def _hf_decode_timed(hf, prompt: list[int], max_new: int, **kwargs) -> tuple[list[int], int, float]:
    """(tokens, tokens after the first decode step, seconds after it): greedy ``generate``,
    a streamer stamping each new token (the first stamp is the prompt, the second the token
    from prefill, the third the first decode step's)."""
    from transformers.generation.streamers import BaseStreamer

    stamps: list[float] = []

    class Stamps(BaseStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor([prompt], device=hf.device)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                          min_new_tokens=max_new, do_sample=False, streamer=Stamps(),
                          **kwargs)  # fmt: skip
    if hf.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    tokens = out[0, len(prompt):].tolist()
    if len(stamps) < 3:
        return tokens, 0, 0.0
    return tokens, len(tokens) - 2, end - stamps[2]


def _decode_row(ctx: BenchContext, impl: str, mode: str, case: dict, tokens: int,
                seconds: float, weights: int) -> dict:
    tps = tokens / seconds if seconds > 0 else float("nan")
    us = 1e6 / tps if tps > 0 else float("nan")
    floor_us = weights / (ctx.copy_gbps * 1e9) * 1e6 if ctx.copy_gbps else None
    row = dict(section=SECTION, impl=impl, mode=mode, **case, tokens_per_s=tps,
               us_per_token=us, gbps=weights / (us * 1e-6) / 1e9 if tps > 0 else None,
               frac_floor=floor_us / us if floor_us and tps > 0 else None)  # fmt: skip
    if ctx.on_row is not None:
        ctx.on_row(row)
    return row


def _decode_rows(ctx: BenchContext, name: str) -> list[dict]:
    """Ours vs transformers' ``generate``: plain greedy decoding of a random model (part 3)."""
    cfg = ModelConfig(**SHAPES[name])
    dtype = ctx.dtype if ctx.cuda else torch.float32
    prompt_len, new = (128, 128) if ctx.cuda else (32, 32)
    case = dict(model=name, B=1, prompt=prompt_len, new_tokens=new, dtype=_dtype_name(dtype))
    if not case_wanted(ctx, case):
        return []
    model = MedusaModel(random_model(cfg, 1, dtype, ctx.device).base, None)
    weights = weight_bytes(model.base)
    prompt = torch.randint(cfg.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    generate(model, [prompt], max_new_tokens=8, medusa=False)  # warm-up, kernel compilation
    ours_tokens, _, tokens, seconds = _decode_timed(model, prompt, False, new, None, None)
    ours = _decode_row(ctx, "plain_decode", "graph" if ctx.cuda else "eager", case, tokens,
                       seconds, weights)
    rows = [ours]
    try:
        hf = hf_twin(model.base)
    except ImportError as e:
        ctx.notes.append(f"{SECTION}: transformers peer not run ({e})")
        return rows
    except Exception as e:  # the peer cannot be built: recorded, ours stays
        return rows + [failure_row(ctx, SECTION, "hf_generate", e, False, **case)]
    peers = [("dynamic", {})]
    if not ctx.cuda or (name == "vicuna-7b" and not ctx.quick):
        peers.append(("static", {"cache_implementation": "static"}))
    for mode, kwargs in peers:
        try:
            t0 = time.perf_counter()
            # warm-up; the static cache compiles for its cache length: warm up at that length
            _hf_decode_timed(hf, prompt, new if mode == "static" else 8, **kwargs)
            warmup_s = time.perf_counter() - t0
            hf_tokens, tokens, seconds = _hf_decode_timed(hf, prompt, new, **kwargs)
        except torch.cuda.OutOfMemoryError:
            ctx.notes.append(f"{SECTION}: hf_generate {mode} {name} ran out of GPU memory")
            torch.cuda.empty_cache()
            continue
        except Exception as e:
            rows.append(failure_row(ctx, SECTION, "hf_generate", e, False, mode=mode, **case))
            continue
        row = _decode_row(ctx, "hf_generate", mode, case, tokens, seconds, weights)
        row["warmup_s"] = warmup_s
        row["identical"] = hf_tokens == ours_tokens
        if not row["identical"]:
            at = _first_difference(hf_tokens, ours_tokens)
            row["check"] = f"note: differs from ours at token {at} (near-tie on random weights)"
        rows.append(row)
        if row["tokens_per_s"] > 0:
            ours[f"speedup_vs_hf_{mode}"] = ours["tokens_per_s"] / row["tokens_per_s"]
    del hf
    return rows


def _decode_section(ctx: BenchContext) -> list[dict]:
    names = ("llama-1b", "vicuna-7b") if ctx.cuda else ("tiny",)
    return _each_model(ctx, names, lambda name: _decode_rows(ctx, name), "plain_decode")


def _prompts(ctx: BenchContext, model: MedusaModel, n: int, demo: bool) -> list[list[int]]:
    """Held-out stdlib prompts for the demo; chat prompts (or random ids) for a checkpoint."""
    if demo:
        try:
            from medusa_kernels.demo import prompts as demo_prompts

            return demo_prompts(model, n=n)
        except Exception as e:  # e.g. no stdlib sources: fall back to the sample prompt
            ctx.notes.append(f"{SECTION}: demo prompts unavailable ({e}); built-in questions")
    tok = model.tokenizer()
    if tok is not None:
        text = [CHAT.format(q) if not demo else q for q in QUESTIONS]
        return [tok.encode(t).ids for t in (text * n)[:n]]
    ctx.notes.append(f"{SECTION}: {model.model_dir} has no tokenizer.json: random prompt ids")
    gen = torch.Generator().manual_seed(0)
    return torch.randint(model.base.cfg.vocab_size, (n, 32), generator=gen).tolist()


def _decode_timed(
    model, prompt, medusa, max_new, eos, tree
) -> tuple[list[int], list[int], int, float]:
    """(tokens, accepted per step, tokens after the first step, seconds after the first step)."""
    stream = generate(model, [prompt], max_new_tokens=max_new, medusa=medusa, tree=tree,
                      eos_token_id=eos, stream=True)  # fmt: skip
    t_first = t_last = None
    tokens_after = 0
    for i, new in enumerate(stream):
        now = time.perf_counter()
        if i == 1:  # after prefill (0) and the first step (capture, warm-up)
            t_first = now
        elif i > 1:
            tokens_after += len(new[0])
            t_last = now
    r = stream.result
    counts = [step[0] for step in r.accepted_per_step]
    if t_last is None:  # one step only: nothing after the first step to time
        return r.tokens[0], counts, 0, 0.0
    return r.tokens[0], counts, tokens_after, t_last - t_first


def _first_difference(a: list, b: list) -> int:
    """Index of the first element where ``a`` and ``b`` differ (or the shorter length)."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def demo_trees() -> list[str]:
    """The tree files shipped with the demo: ``calibrated_tree.json`` (63 nodes, grown from its
    heads' accuracies) and ``calibrated_tree_cpu.json`` (the size ``--nodes auto`` chose on a
    CPU)."""
    from medusa_kernels.demo import TREE_FILES

    return [f for f in TREE_FILES if os.path.isfile(f)]


def _medusa_row_checks(row: dict, plain_outs: list, outs: list, counts: list, dtype) -> None:
    """Acceptance histogram and the lossless check (Medusa output == plain greedy)."""
    row["accept_hist"] = {str(k): v for k, v in sorted(Counter(counts).items())}
    identical = outs == plain_outs
    row["identical"] = identical
    if identical:
        row["check"] = "ok"
        return
    seq = _first_difference(plain_outs, outs)
    where = f"prompt {seq}, token {_first_difference(plain_outs[seq], outs[seq])}"
    if dtype in (torch.float32, torch.float64):
        row["check"] = f"FAIL: Medusa greedy output differs from plain at {where}"
    else:
        row["check"] = (
            f"note: differs from plain at {where} ({_dtype_name(dtype)} rounding on a near-tie)"
        )


def _generation_rows(ctx: BenchContext, tp: TPGroup = SINGLE) -> list[dict]:
    demo = ctx.model_dir is None
    dtype = ctx.dtype if ctx.cuda else torch.float32
    if demo:
        from medusa_kernels.demo import path as demo_path

        model_dir, heads_dir = demo_path()
        label = "demo"
    else:
        model_dir, heads_dir = ctx.model_dir, ctx.medusa_dir
        label = os.path.basename(os.path.normpath(model_dir))
    if ctx.cuda:
        n, max_new = (4, 128) if ctx.quick or demo else (8, 256)
    elif tp.world > 1:  # gloo on CPUs: a check that TP decodes, not a speed to measure
        n, max_new = (2, 32) if ctx.quick else (4, 64)
    else:
        n, max_new = (4, 64) if ctx.quick else (8, 128)
    # the demo without --tree: the default tree and the demo's own calibrated trees
    trees = [ctx.tree] + (demo_trees() if demo and ctx.tree is None else [])
    case = dict(model=label, dtype=_dtype_name(dtype), prompts=n, max_new_tokens=max_new,
                mode="graph" if ctx.cuda else "eager", **_tp_case(tp))  # fmt: skip
    tree_label = {t: _tree_label(ctx) if t is ctx.tree else os.path.basename(t) for t in trees}
    trees = [t for t in trees if case_wanted(ctx, dict(case, tree=tree_label[t]))]
    if not trees:
        return []
    model = load_model(model_dir, medusa=heads_dir, dtype=dtype, device=_device(ctx, tp),
                       tp=tp if tp.world > 1 else None)
    if model.heads is None:
        ctx.notes.append(
            f"{SECTION}: {model_dir} has no Medusa heads: generation skipped (give --medusa DIR)"
        )
        return []
    prompts = _prompts(ctx, model, n, demo)
    eos = model.eos_token_id()
    runs = [(False, None)] + [(True, t) for t in trees]  # (medusa, tree): plain first
    # no --tree: the paper's tree cut to the heads (what the rows name), not generate's
    # device-aware default (on a CPU the demo's calibrated_tree_cpu.json, a row of its own)
    paper = resolve_choices(None, model.heads.num_heads, model.heads.draft_vocab)
    runs = [(m, paper if m and t is None else t) for m, t in runs]
    for medusa, tree in runs:  # warm-up: first-call costs, kernel compilation
        generate(model, [prompts[0]], max_new_tokens=8, medusa=medusa, tree=tree,
                 eos_token_id=eos)  # fmt: skip
    stats = [([], [], 0, 0.0) for _ in runs]  # outputs, accepted counts, tokens, seconds
    for p in prompts:  # plain and Medusa interleaved: background load hits them alike
        for i, (medusa, tree) in enumerate(runs):
            out, c, t, s = _decode_timed(model, p, medusa, max_new, eos, tree)
            outs, counts, tokens, seconds = stats[i]
            stats[i] = (outs + [out], counts + [k for k in c if k > 0], tokens + t, seconds + s)

    rows = []
    for i in range(len(runs)):
        outs, counts, tokens, seconds = stats[i]
        tps = tokens / seconds if seconds > 0 else float("nan")
        row = dict(section=SECTION, impl="medusa_generate" if i else "plain_generate", **case,
                   tree=tree_label[trees[i - 1]] if i else "-", tokens=sum(len(o) for o in outs),
                   steps=len(counts), tokens_per_s=tps,
                   us_per_token=1e6 / tps if tps > 0 else float("nan"),
                   mean_accepted=sum(counts) / max(len(counts), 1))  # fmt: skip
        if i:
            row["speedup"] = tps / rows[0]["tokens_per_s"]
            _medusa_row_checks(row, stats[0][0], outs, counts, dtype)
        rows.append(row)
    tok = model.tokenizer()
    if tok is not None:  # show what the model generates (prompt | Medusa continuation)
        sample = tok.decode(prompts[0]) + " | " + tok.decode(stats[1][0][0])
        rows[1]["sample"] = sample
        ctx.notes.append(f"{SECTION}: {label} sample (prompt | Medusa output): {sample[:400]!r}")
    if ctx.on_row is not None:
        for row in rows:
            ctx.on_row(row)
    return rows


def run(ctx: BenchContext) -> list[dict]:
    if ctx.tree is not None and str(ctx.tree) not in TREES and not os.path.isfile(ctx.tree):
        raise ValueError(f"tree {ctx.tree!r} is neither a known tree {sorted(TREES)} nor a file")
    tp = init_tp(device=ctx.device) if launched_world() > 1 else SINGLE  # torchrun: TP mode
    with group_ending(tp.owned):
        return _run(ctx, tp)


def _run(ctx: BenchContext, tp: TPGroup) -> list[dict]:
    rows: list[dict] = []
    try:  # the real generation first: a time limit should cost the random-weight parts
        rows += _generation_rows(ctx, tp)
    except Exception as e:  # on the GPU keep going; the CPU run raises as before
        if not ctx.cuda:
            raise
        label = os.path.basename(os.path.normpath(ctx.model_dir)) if ctx.model_dir else "demo"
        rows.append(failure_row(ctx, SECTION, "generate", e, True, model=label))
    if ctx.cuda and not cuda_usable(ctx):
        return rows
    rows += _step_section(ctx, tp)
    if ctx.cuda and not cuda_usable(ctx):
        return rows
    if tp.world > 1:
        ctx.notes.append(f"{SECTION}: plain decoding against transformers not run under "
                         f"tensor parallelism (tp = {tp.world}): its peer runs in one process")
        return rows
    return rows + _decode_section(ctx)
