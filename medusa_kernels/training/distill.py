"""Self-distillation: the base model answers a prompt file with the package's own batched
decoder, and the (prompt + response) token ids become the heads' training data.

Greedy (``temperature`` 0) or sampled; optional top-k log-probabilities of the base model at
every response position (for Medusa-2's distillation loss). Greedy with ``save_hidden``: the
base model's last hidden state at every position whose next token is a response token, as the
greedy decoder computed it (positions P - 1 .. L - 2, fp16, ``hidden/part-*.safetensors``, one
tensor ``h{index}`` [L - P, d] per sample), so Medusa-1 heads (frozen backbone) train on them
without running the backbone again; on a CPU that forward costs more than the heads.
Resumable: every finished batch is appended and flushed before the next starts, and a rerun with
the same ``out`` skips the prompt indices already on disk. Under ``torchrun`` each rank takes
every world-th batch and writes its own part.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed

from ..checkpoint import MedusaModel, load_base_model, weight_files
from ..decoding import generate, pad_prompts
from ..tree import build_tree
from .data import DatasetWriter, Sample, demo_prompts, read_prompts
from .objectives import causal_hidden


@dataclass
class DistillConfig:
    """Settings of ``self_distill`` (the ``distill`` CLI command has the same names)."""

    model: str
    prompts: str  # prompt file (.jsonl, .json, text) or "demo[:N]" (the demo model's corpus)
    out: str
    max_new_tokens: int = 256
    temperature: float = 0.0
    batch_size: int = 16
    seed: int = 0
    top_logits: int = 0  # keep the base model's top-k log-probs per response token (0: none)
    format: str = "jsonl"  # or "safetensors"
    limit: int | None = None  # first N prompts only
    device: str | None = None
    dtype: torch.dtype | None = None
    progress: bool = True
    save_hidden: bool = False  # greedy only: keep the hidden states the decoder computed


def resolve_prompts(spec: str, tokenizer, split: str = "train") -> list[list[int]]:
    """A prompt file, or ``demo[:N]``: N (default 512) prompts from the demo corpus."""
    if spec == "demo" or spec.startswith("demo:"):
        if tokenizer is None:
            raise ValueError("--prompts demo needs the model's tokenizer.json (the demo model)")
        n = int(spec.split(":", 1)[1]) if ":" in spec else 512
        return demo_prompts(tokenizer, n, split=split)
    return read_prompts(spec, tokenizer)


def model_fingerprint(model_dir: str) -> str:
    """A cheap identity of the weights in ``model_dir``: sha256 over config.json and, per
    weight file, its size and its first and last MiB (a resume must not mix two models that
    sit at the same path). "" without a directory."""
    if not model_dir or not os.path.isdir(model_dir):
        return ""
    h = hashlib.sha256()
    paths = [os.path.join(model_dir, "config.json")] + weight_files(model_dir)
    for path in paths:
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def prompts_fingerprint(prompts: list[list[int]]) -> str:
    """sha256 of the prompt token ids (a resume must not mix two prompt sets)."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


@torch.no_grad()
def top_logprobs(base, prompt: list[int], response: list[int], k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The base model's top-k (ids, log-probs) [len(response), k] at positions P - 1 .. L - 2."""
    ids = torch.tensor(prompt + response, device=base.lm_head.weight.device)[None]
    hidden = causal_hidden(base, ids)[0, len(prompt) - 1:-1]
    lp = base.logits(hidden).float().log_softmax(-1)
    v, i = lp.topk(k, dim=-1)
    return i.to(torch.int32).cpu(), v.cpu()


def self_distill(cfg: DistillConfig, model: MedusaModel | None = None,
                 prompts: list[list[int]] | None = None, rank: int = 0, world: int = 1) -> str:
    """Generate the dataset into ``cfg.out`` (see ``data`` for the layout); returns ``cfg.out``.

    ``model``/``prompts`` may be given already loaded (else read from ``cfg``).
    """
    from tqdm import tqdm

    if model is None:
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = _load_base(cfg.model, cfg.dtype, device)
    if prompts is None:
        prompts = resolve_prompts(cfg.prompts, model.tokenizer())
    if cfg.limit is not None:
        prompts = prompts[:cfg.limit]
    meta = {
        "source": "self-distillation",
        "self_distilled": True,
        "model": os.path.abspath(cfg.model) if cfg.model else "",
        "model_fingerprint": model_fingerprint(cfg.model),
        "prompts": cfg.prompts,
        "prompts_fingerprint": prompts_fingerprint(prompts),
        "num_prompts": len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_logits": cfg.top_logits,
    }
    if cfg.save_hidden:  # only then: datasets written before the option resume as they were
        meta["save_hidden"] = True
    writer = DatasetWriter(cfg.out, cfg.format, meta, rank=rank)
    if world > 1:  # every rank reads what is done before any rank writes more
        torch.distributed.barrier()
    todo = [i for i in range(len(prompts)) if i not in writer.done]
    # similar lengths batch together within windows of 8 batches in file order, so a run cut
    # short (or resumed) has covered a prefix of the file, not only its shortest prompts
    w = 8 * cfg.batch_size
    todo = [i for s in range(0, len(todo), w)
            for i in sorted(todo[s:s + w], key=lambda i: (len(prompts[i]), i))]
    batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    mine = batches[rank::world]
    eos = model.eos_token_id()
    if cfg.save_hidden and cfg.temperature > 0:
        raise ValueError("save_hidden needs greedy decoding (temperature 0)")
    if cfg.save_hidden:
        os.makedirs(os.path.join(cfg.out, "hidden"), exist_ok=True)
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt",
               desc="self-distillation", disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    for batch in mine:
        chunk = [prompts[i] for i in batch]
        if cfg.save_hidden:
            tokens, hidden = greedy_with_hidden(model.base, chunk, cfg.max_new_tokens, eos)
            from safetensors.torch import save_file

            path = os.path.join(cfg.out, "hidden", f"part-{rank:03d}-{batch[0]:07d}")
            save_file({f"h{i}": h.contiguous() for i, h in zip(batch, hidden, strict=True)},
                      path + ".tmp", metadata={"format": "pt"})
            os.replace(path + ".tmp", path + ".safetensors")  # before the samples: done => saved
        else:
            tokens = generate(model, chunk, max_new_tokens=cfg.max_new_tokens, medusa=False,
                              temperature=cfg.temperature, eos_token_id=eos,
                              seed=cfg.seed + batch[0] if cfg.temperature > 0 else None).tokens
        samples = []
        for i, p, resp in zip(batch, chunk, tokens, strict=True):
            s = Sample(torch.tensor(p + resp, dtype=torch.int32), len(p), i)
            if cfg.top_logits:
                s.top_ids, s.top_logprobs = top_logprobs(model.base, p, resp, cfg.top_logits)
            samples.append(s)
        writer.append(samples)
        bar.update(len(batch) * world)
    bar.close()
    return cfg.out


@torch.no_grad()
def greedy_with_hidden(base, prompts: list[list[int]], max_new_tokens: int,
                       eos: int | list[int] | None) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Plain greedy decoding of a batch (the steps ``decoding.plain_step`` takes: prefill, then
    ``base.step`` one token at a time with the argmax of ``base.greedy``; finished rows leave the
    cache), returning each reply and the hidden states [len(reply), d] (fp16, CPU) that chose its
    tokens: row j is the state at position P - 1 + j, which predicted reply token j."""
    device = base.lm_head.weight.device
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    tokens, lengths = pad_prompts(prompts, device)
    B = len(prompts)
    tb = build_tree([], device=device)
    cache = base.new_cache(B, max(len(p) for p in prompts) + max_new_tokens + 1)
    hidden = base.prefill(tokens, lengths, cache)
    last = hidden[torch.arange(B, device=device), lengths.long() - 1]
    root = base.greedy(last)
    out: list[list[int]] = [[] for _ in range(B)]
    hid: list[list[torch.Tensor]] = [[] for _ in range(B)]
    done = [False] * B
    rows = list(range(B))  # the sequence of each cache row

    def take(h, ids):
        for r, b in enumerate(rows):
            out[b].append(ids[r])
            hid[b].append(h[r].to("cpu", torch.float16))
            done[b] = ids[r] in eos or len(out[b]) >= max_new_tokens

    take(last, root.tolist())
    while not all(done):
        live = [r for r, b in enumerate(rows) if not done[b]]
        if len(live) < len(rows):  # finished rows leave: every row left runs
            idx = torch.tensor(live, device=device)
            old = cache
            cache = base.new_cache(len(live), old.capacity)
            torch.index_select(old.k, 1, idx, out=cache.k)
            torch.index_select(old.v, 1, idx, out=cache.v)
            cache.seqlens.copy_(old.seqlens[idx])
            root, rows = root[idx], [rows[r] for r in live]
            del old
        h = base.step(root[:, None], cache, tb.tree_mask, tb.depths)[:, 0]
        cache.seqlens.add_(1)
        root = base.greedy(h)
        take(h, root.tolist())
    return out, [torch.stack(x) for x in hid]


def load_hidden(out_dir: str) -> dict[int, torch.Tensor]:
    """{sample index: hidden [L - P, d]} from a dataset written with ``save_hidden``."""
    import glob

    from safetensors.torch import load_file

    res: dict[int, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "hidden", "*.safetensors"))):
        res.update({int(k[1:]): v for k, v in load_file(path).items()})
    return res


def _load_base(model_dir: str, dtype, device) -> MedusaModel:
    """The base model alone (heads stored in the same dir, if any, are ignored)."""
    return MedusaModel(load_base_model(model_dir, dtype, device), None, str(model_dir))
