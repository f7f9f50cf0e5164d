"""Training data: prompt files, token-id datasets (JSONL or safetensors shards), packing.

A dataset is a directory with ``meta.json`` and parts written one batch at a time:

- ``format: "jsonl"``: ``part-RRR.jsonl``, one sample a line:
  ``{"index": i, "prompt_len": P, "input_ids": [...]}`` plus, when the base model's top logits
  are kept, ``"top_ids"`` and ``"top_logprobs"`` ([L - P][k] each);
- ``format: "safetensors"``: ``shard-RRR-NNNNN.safetensors`` holding ``input_ids`` (int32, the
  samples concatenated), ``lengths``, ``prompt_lens`` (int32 [n]), ``indices`` (int64 [n]) and
  optionally ``top_ids`` (int32 [sum(L - P), k]) and ``top_logprobs`` (float32, same shape).

Row j of a sample's ``top_*`` is the base model's distribution at position P - 1 + j, the one that
produced response token P + j: its top-k token ids and their log-probabilities (log_softmax of
the logits, so the tail mass 1 - sum(exp) is known). A plain ``*.jsonl`` file also loads: lines
with ``input_ids`` (optional ``prompt_len``), ``text``, or ``prompt`` + ``response``.

Packing: samples go into rows of ``seq_len`` tokens (next-fit over a small window of open rows);
each sample keeps its own positions (from 0) and attends only to itself (block-diagonal causal
mask); padding has segment -1 and is never a target.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

META = "meta.json"


@dataclass
class Sample:
    """One token sequence; ``top_ids``/``top_logprobs`` [L - P, k] when logits were kept."""

    ids: torch.Tensor  # [L] int32
    prompt_len: int
    index: int = -1
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids.numel()


# ----------------------------------------------------------------------------- prompts


def read_prompts(path: str, tokenizer=None) -> list[list[int]]:
    """Prompts as token ids from ``path``.

    ``.jsonl``: one JSON value a line: a string, a list of token ids, or an object with
    ``input_ids``, ``prompt`` or ``text``. ``.json``: a list of those. Anything else: plain text,
    one prompt a line (``\\n`` inside a line stands for a newline). Text needs ``tokenizer``
    (a ``tokenizers.Tokenizer``, e.g. ``MedusaModel.tokenizer()``).
    """
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            items = [json.loads(line) for line in f if line.strip()]
        elif path.endswith(".json"):
            items = json.load(f)
        else:
            items = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    out = []
    for n, item in enumerate(items):
        if isinstance(item, dict):
            item = next((item[k] for k in ("input_ids", "prompt", "text") if k in item), None)
            if item is None:
                raise ValueError(f"{path}: item {n} has none of input_ids, prompt, text")
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(f"{path} holds text prompts but the model has no tokenizer.json")
            ids = tokenizer.encode(item).ids
        else:
            ids = [int(t) for t in item]
        if not ids:
            raise ValueError(f"{path}: prompt {n} is empty")
        out.append(ids)
    return out


def demo_prompts(tokenizer, n: int, split: str = "train", length: int = 24,
                 seed: int | None = None) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens cut from the demo model's corpus (the standard
    library's sources; ``split`` "train" or "held" out), for the shipped demo model. The
    default seed is 5 for "train" and 11 for "held" (the held-out prompts every tool uses)."""
    from .corpus import EOS, corpus, encode_all, prompts_from

    if seed is None:
        seed = 5 if split == "train" else 11

    train, held = corpus(10**6)
    data = encode_all(tokenizer, train if split == "train" else held)
    return prompts_from(data, n, length, seed=seed, eos=tokenizer.token_to_id(EOS))


# ----------------------------------------------------------------------------- writing


class DatasetWriter:
    """Appends finished samples to a dataset directory, one flushed batch at a time.

    Resumable: ``done`` holds the indices already on disk (from every part, whatever rank
    wrote them); a JSONL part cut mid-line by a crash is truncated to its last whole line.
    Safetensors shards are written to a temporary name and renamed, so a shard is all or nothing.
    """

    def __init__(self, out_dir: str, fmt: str, meta: dict, rank: int = 0):
        if fmt not in ("jsonl", "safetensors"):
            raise ValueError(f"format must be 'jsonl' or 'safetensors', got {fmt!r}")
        self.out_dir, self.fmt, self.rank = out_dir, fmt, rank
        os.makedirs(out_dir, exist_ok=True)
        meta = dict(meta, format=fmt)
        meta_path = os.path.join(out_dir, META)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            if diff:
                raise ValueError(
                    f"{out_dir} holds a dataset made with other settings {diff} (old, new): "
                    "use another output directory or the same settings to resume"
                )
        elif rank == 0:
            _atomic_json(meta_path, meta)
        self.done = set(int(i) for i in scan_indices(out_dir))
        self._shards = len(glob.glob(os.path.join(out_dir, f"shard-{rank:03d}-*.safetensors")))

    def append(self, samples: list[Sample]) -> None:
        if not samples:
            return
        if self.fmt == "jsonl":
            lines = []
            for s in samples:
                row = {"index": s.index, "prompt_len": s.prompt_len, "input_ids": s.ids.tolist()}
                if s.top_ids is not None:
                    row["top_ids"] = s.top_ids.tolist()
                    row["top_logprobs"] = [[round(x, 6) for x in r] for r in
                                           s.top_logprobs.tolist()]
                lines.append(json.dumps(row, separators=(",", ":")) + "\n")
            path = os.path.join(self.out_dir, f"part-{self.rank:03d}.jsonl")
            _repair_jsonl(path)
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
        else:
            t = {
                "input_ids": torch.cat([s.ids for s in samples]).to(torch.int32),
                "lengths": torch.tensor([len(s) for s in samples], dtype=torch.int32),
                "prompt_lens": torch.tensor([s.prompt_len for s in samples], dtype=torch.int32),
                "indices": torch.tensor([s.index for s in samples], dtype=torch.int64),
            }
            if samples[0].top_ids is not None:
                t["top_ids"] = torch.cat([s.top_ids for s in samples]).to(torch.int32)
                t["top_logprobs"] = torch.cat([s.top_logprobs for s in samples]).float()
            path = os.path.join(self.out_dir, f"shard-{self.rank:03d}-{self._shards:05d}")
            save_file({k: v.contiguous() for k, v in t.items()}, path + ".tmp",
                      metadata={"format": "pt"})
            os.replace(path + ".tmp", path + ".safetensors")
            self._shards += 1
        self.done.update(s.index for s in samples)


def _atomic_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _repair_jsonl(path: str) -> None:
    """Cut a trailing partial line (a crash mid-write) so appends start on a fresh line."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)


def scan_indices(out_dir: str) -> list[int]:
    """Sample indices already written under ``out_dir`` (whole lines and whole shards)."""
    out: list[int] = []
    for path in sorted(glob.glob(os.path.join(out_dir, "part-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    out.append(json.loads(line)["index"])
    for path in sorted(glob.glob(os.path.join(out_dir, "shard-*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            out += f.get_tensor("indices").tolist()
    return out


# ----------------------------------------------------------------------------- reading


def _sample_from_json(row: dict, n: int, tokenizer, source: str) -> Sample:
    if "input_ids" in row:
        ids, P = [int(t) for t in row["input_ids"]], int(row.get("prompt_len", 0))
    elif "prompt" in row and "response" in row:
        if tokenizer is None:
            raise ValueError(f"{source}: text samples need a model with tokenizer.json")
        prompt = tokenizer.encode(row["prompt"]).ids
        ids, P = prompt + tokenizer.encode(row["response"]).ids, len(prompt)
    elif "text" in row:
        if tokenizer is None:
            raise ValueError(f"{source}: text samples need a model with tokenizer.json")
        ids, P = tokenizer.encode(row["text"]).ids, 0
    else:
        raise ValueError(f"{source}: line {n} has none of input_ids, text, prompt + response")
    s = Sample(torch.tensor(ids, dtype=torch.int32), P, int(row.get("index", n)))
    if "top_ids" in row:
        s.top_ids = torch.tensor(row["top_ids"], dtype=torch.int32)
        s.top_logprobs = torch.tensor(row["top_logprobs"], dtype=torch.float32)
    return s


def _read_jsonl(path: str, tokenizer, offset: int = 0) -> list[Sample]:
    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1 and not line.endswith("\n"):
                break  # a line cut by a crash mid-write: the resumed run writes it again
            raise ValueError(f"{path}: line {n + 1} is not valid JSON") from None
        out.append(_sample_from_json(row, offset + n, tokenizer, path))
    return out


def _read_shard(path: str) -> list[Sample]:
    with safe_open(path, framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    ids = t["input_ids"].split(t["lengths"].tolist())
    P = t["prompt_lens"].tolist()
    resp = [len(x) - p for x, p in zip(ids, P, strict=True)]
    top_ids = t["top_ids"].split(resp) if "top_ids" in t else [None] * len(ids)
    top_lp = t["top_logprobs"].split(resp) if "top_logprobs" in t else [None] * len(ids)
    return [Sample(x.to(torch.int32), p, i, a, b) for x, p, i, a, b in
            zip(ids, P, t["indices"].tolist(), top_ids, top_lp, strict=True)]


def load_dataset(path: str, tokenizer=None) -> tuple[list[Sample], dict]:
    """(samples sorted by index, meta) from a dataset dir, a ``.jsonl`` or a ``.safetensors``."""
    meta: dict = {}
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, META)):
            with open(os.path.join(path, META)) as f:
                meta = json.load(f)
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")))
        files += sorted(glob.glob(os.path.join(path, "*.safetensors")))
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"{path}: no *.jsonl or *.safetensors samples")
    samples: list[Sample] = []
    for f in files:
        samples += _read_shard(f) if f.endswith(".safetensors") else \
            _read_jsonl(f, tokenizer, offset=len(samples))
    seen: dict[int, Sample] = {}
    for s in samples:  # a sample written twice (crash between write and bookkeeping): keep one
        seen.setdefault(s.index, s)
    return [seen[i] for i in sorted(seen)], meta


# ----------------------------------------------------------------------------- packing


def pack(lengths: list[int], seq_len: int, packed: bool = True, window: int = 64
         ) -> list[list[int]]:
    """Rows of sample positions (into ``lengths``), each row's total <= ``seq_len``.

    Samples longer than ``seq_len`` are truncated at collation, so they fill a row alone.
    ``packed`` False puts one sample per row. Order is kept within the open-row window.
    """
    rows: list[list[int]] = []
    free: list[int] = []  # free tokens of the last `window` rows
    for i, n in enumerate(lengths):
        n = min(n, seq_len)
        if packed:
            for j in range(max(0, len(rows) - window), len(rows)):
                if free[j] >= n:
                    rows[j].append(i)
                    free[j] -= n
                    break
            else:
                rows.append([i])
                free.append(seq_len - n)
        else:
            rows.append([i])
            free.append(0)
    return rows


def collate(samples: list[Sample], rows: list[list[int]], seq_len: int,
            train_on_prompt: bool = False, topk: int = 0) -> dict[str, torch.Tensor]:
    """Rows of packed samples -> tensors [B, T] (T = ``seq_len``, or the longest row when no
    row is full, rounded up to 8):

    tokens (int64, pad 0), positions (from 0 in each sample), segments (sample number within
    the row, -1 for padding), target (bool: this token is trained on, i.e. it is not padding,
    not position 0 of its sample and, unless ``train_on_prompt``, not in the prompt);
    with ``topk`` > 0 also teacher_ids [B, T, topk], teacher_logprobs [B, T, topk] and
    has_teacher [B, T] (position t holds the stored distribution of token t + 1).
    """
    used = [min(sum(len(samples[i]) for i in row), seq_len) for row in rows]
    T = min(seq_len, -(-max(used) // 8) * 8)
    B = len(rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    target = torch.zeros(B, T, dtype=torch.bool)
    if topk:
        t_ids = torch.zeros(B, T, topk, dtype=torch.long)
        t_lp = torch.zeros(B, T, topk, dtype=torch.float32)
        has_t = torch.zeros(B, T, dtype=torch.bool)
    for b, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            s = samples[i]
            n = min(len(s), T - at)
            if n <= 0:
                break
            tokens[b, at:at + n] = s.ids[:n].long()
            positions[b, at:at + n] = torch.arange(n)
            segments[b, at:at + n] = seg
            first = 1 if train_on_prompt else max(1, s.prompt_len)
            target[b, at + first:at + n] = True
            if topk and s.top_ids is not None and s.prompt_len >= 1:
                r = max(0, min(s.top_ids.shape[0], n - s.prompt_len))  # rows still in the window
                k = min(topk, s.top_ids.shape[1])
                lo = at + s.prompt_len - 1
                t_ids[b, lo:lo + r, :k] = s.top_ids[:r, :k].long()
                t_lp[b, lo:lo + r, :k] = s.top_logprobs[:r, :k]
                if k < topk:
                    t_lp[b, lo:lo + r, k:] = float("-inf")
                has_t[b, lo:lo + r] = True
            at += n
    out = {"tokens": tokens, "positions": positions, "segments": segments, "target": target}
    if topk:
        out.update(teacher_ids=t_ids, teacher_logprobs=t_lp, has_teacher=has_t)
    return out


def shifted_targets(batch: dict[str, torch.Tensor], shift: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the hidden state at t has a label ``shift`` tokens ahead in the same sample.

    Returns (valid [B, T] bool, labels [B, T] int64: tokens[t + shift], 0 where not valid).
    shift 1 is the base lm_head's target; Medusa head k (0-based) uses shift k + 2.
    """
    tokens, seg, target = batch["tokens"], batch["segments"], batch["target"]
    B, T = tokens.shape
    valid = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
    labels = torch.zeros_like(tokens)
    if shift < T:
        valid[:, :T - shift] = (seg[:, :T - shift] == seg[:, shift:]) & (seg[:, :T - shift] >= 0) \
            & target[:, shift:]
        labels[:, :T - shift] = torch.where(valid[:, :T - shift], tokens[:, shift:], 0)
    return valid, labels
