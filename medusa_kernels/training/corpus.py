"""The demo model's corpus: the Python standard library's own sources, tokenized and cut into
windows and prompts. Shared by the training data (``data.demo_prompts``) and the demo build
(``medusa_kernels.demo.build``), which sits above it."""

from __future__ import annotations

import glob
import os
import sysconfig

import torch

EOS = "<|endoftext|>"  # the demo tokenizer's one special token, between files


def corpus(max_files: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) from the stdlib's own sources, deterministic: the
    top-level ``*.py`` files, sorted; every 10th is held out."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:max_files]
    texts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    train = [t for i, t in enumerate(texts) if i % 10 != 5]
    held = [t for i, t in enumerate(texts) if i % 10 == 5] or texts[-1:]
    return train, held


def encode_all(tok, texts: list[str]) -> torch.Tensor:
    """The texts as one id stream [N] int64, each text followed by ``EOS``."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(data: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows [n, length] of the id stream ``data``."""
    starts = torch.randint(0, len(data) - length, (n,), generator=gen)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


def prompts_from(data: torch.Tensor, n: int, length: int, seed: int, eos: int) -> list[list[int]]:
    """``n`` prompt windows of ``length`` tokens containing no eos."""
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < n:
        w = windows(data, 1, length, gen)[0]
        if not (w == eos).any():
            out.append(w.tolist())
    return out
