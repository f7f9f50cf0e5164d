"""Self-distillation: the base model answers a prompt file with the package's own batched
decoder, and the (prompt + response) token ids become the heads' training data.

Greedy (``temperature`` 0) or sampled; optional top-k log-probabilities of the base model at
every response position (for Medusa-2's distillation loss). Resumable: every finished batch is
appended and flushed before the next starts, and a rerun with the same ``out`` skips the prompt
indices already on disk. Under ``torchrun`` each rank takes every world-th batch and writes its
own part.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed

from ..checkpoint import MedusaModel, load_base_model, weight_files
from ..decoding import generate
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
    writer = DatasetWriter(cfg.out, cfg.format, meta, rank=rank)
    if world > 1:  # every rank reads what is done before any rank writes more
        torch.distributed.barrier()
    todo = sorted((i for i in range(len(prompts)) if i not in writer.done),
                  key=lambda i: (len(prompts[i]), i))  # similar lengths batch together
    batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    mine = batches[rank::world]
    eos = model.eos_token_id()
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), unit="prompt",
               desc="self-distillation", disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    for batch in mine:
        chunk = [prompts[i] for i in batch]
        r = generate(model, chunk, max_new_tokens=cfg.max_new_tokens, medusa=False,
                     temperature=cfg.temperature, eos_token_id=eos,
                     seed=cfg.seed + batch[0] if cfg.temperature > 0 else None)
        samples = []
        for i, p, resp in zip(batch, chunk, r.tokens, strict=True):
            s = Sample(torch.tensor(p + resp, dtype=torch.int32), len(p), i)
            if cfg.top_logits:
                s.top_ids, s.top_logprobs = top_logprobs(model.base, p, resp, cfg.top_logits)
            samples.append(s)
        writer.append(samples)
        bar.update(len(batch) * world)
    bar.close()
    return cfg.out


def _load_base(model_dir: str, dtype, device) -> MedusaModel:
    """The base model alone (heads stored in the same dir, if any, are ignored)."""
    return MedusaModel(load_base_model(model_dir, dtype, device), None, str(model_dir))
