"""Medusa-1 and Medusa-2 training loops, one process or DDP under ``torchrun``.

Medusa-1: the backbone is frozen (``requires_grad`` False, outside the optimizer, its forward
under ``no_grad``); head k learns token t + k + 2 from the hidden state at t with weight
``head_decay ** k``.

Medusa-2: backbone and heads together. Loss = backbone loss + ``heads_coefficient`` x ramp(step)
x sum_k ``head_decay ** k`` CE_k. The backbone loss is KL(original model || trained model) when
the data is self-distilled (teacher: the stored top-k log-probs, or a frozen copy of the
original weights), else the LM loss. Optional heads-only warm-up phase (``heads_warmup_steps``,
a Medusa-1 stage) and sine/linear ramp of the heads' weight; heads' lr = ``lr x heads_lr_mult``;
``unfreeze_last`` N trains only the last N blocks and the final norm.

Batches: the packed rows of one optimizer step (``batch_size`` rows, global) are the same on
every rank; rank r takes rows r, r + W, ... and splits them into micro-batches. Losses are sums
divided by the global position counts (all-reduced), scaled by W because DDP averages gradients,
so W processes give the gradient of one process on the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import (
    MedusaModel,
    load_base_model,
    load_model,
    read_json,
    save_base_model,
    save_medusa_heads,
)
from ..heads import MedusaHeads
from ..model import Transformer
from ..parallel import group_ending
from ..tree import DEFAULT_TREE, resolve_choices
from .data import collate, load_dataset, pack, shifted_targets
from .distill import DistillConfig, resolve_prompts, self_distill
from .objectives import causal_hidden, heads_loss_sums, kl_sum, rank_hits, topk_kl_sum, upcast

ACCURACY_FILE = "head_accuracy.json"
ACCURACY_FORMAT = "medusa_kernels.head_accuracy.v1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")


@dataclass
class TrainConfig:
    """Settings of ``train`` (the CLI flags carry the same names with dashes)."""

    model: str
    out: str
    mode: str = "medusa1"  # or "medusa2"
    data: str | None = None  # dataset dir / .jsonl / .safetensors (written there if prompts)
    prompts: str | None = None  # self-distil these first (file or "demo[:N]")
    # self-distillation (with prompts)
    max_new_tokens: int = 256
    temperature: float = 0.0
    distill_batch_size: int = 16
    top_logits: int = 0
    data_format: str = "jsonl"
    # heads
    num_heads: int = 5
    num_layers: int = 1  # ResBlocks per head (CLI: --num-layers / --head-layers)
    heads_kind: str = "separate"  # or "shared": ResBlocks + the base lm_head (frozen)
    vocab: int | None = None  # trimmed vocabulary: the N most frequent target tokens
    # data
    seq_len: int = 2048
    pack: bool = True
    train_on_prompt: bool = False
    batch_size: int = 8  # packed rows per optimizer step, all ranks together
    micro_batch_size: int | None = None  # rows per forward per rank (default: all of them)
    steps: int | None = None  # default: epochs over the packed rows
    epochs: float = 1.0
    # optimiser
    lr: float | None = None  # Medusa-1: the heads' lr (1e-3); Medusa-2: the backbone's (5e-5)
    heads_lr_mult: float = 4.0  # Medusa-2: heads' lr = lr x this
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    head_decay: float = 0.8
    # Medusa-2
    heads_coefficient: float = 0.2
    heads_warmup_steps: int = 0  # heads-only phase before the joint one
    heads_ramp: str = "sine"  # "sine", "linear" or "none": the heads' weight over the ramp
    heads_ramp_steps: int | None = None  # default: the whole joint phase
    unfreeze_last: int | None = None  # train only the last N blocks (+ final norm)
    backbone_loss: str = "auto"  # "auto" (kl on self-distilled data, else lm), "kl", "lm"
    teacher: str = "auto"  # "auto" (stored logits if any, else model), "stored", "model"
    # evaluation
    eval_data: str | None = None
    eval_fraction: float = 0.05
    eval_every: int | None = None  # default: steps // 10
    eval_topk: int = 10
    eval_max_rows: int = 256
    # accepted tokens per step, trained vs fresh heads, after training (0: skip)
    measure_accept: int = 0
    accept_tree: str | None = None
    accept_max_new_tokens: int | None = None
    report: str | None = None  # also write the run report (JSON) here
    # misc
    seed: int = 0
    device: str | None = None
    dtype: torch.dtype | None = None  # backbone weights (default: bf16 frozen on CUDA, else fp32)
    autocast: bool | None = None  # bf16 autocast (default: on CUDA)
    save_dtype: torch.dtype | None = None  # default: the model's config torch_dtype
    log_every: int = 10
    progress: bool = True


@dataclass
class TrainResult:
    heads: MedusaHeads
    base: Transformer
    heads_dir: str
    model_dir: str  # the base to load the heads with (the new one for Medusa-2)
    history: list[dict] = field(default_factory=list)  # logged training steps
    accuracy: dict = field(default_factory=dict)  # the head_accuracy.json content
    accept: dict | None = None
    optimizer: torch.optim.Optimizer | None = None  # the last stage's
    steps: int = 0


# ----------------------------------------------------------------------------- distributed


def setup_distributed(device: str | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, whether we created the process group). Under ``torchrun``
    (WORLD_SIZE > 1) a group is created: nccl on CUDA, gloo on CPU."""
    owned = False
    if not (dist.is_available() and dist.is_initialized()) and \
            int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owned = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    return rank, world, torch.device(device), owned


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- schedules


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def ramp(step: int, total: int, kind: str) -> float:
    """Heads' loss weight factor in Medusa-2: 0 -> 1 over ``total`` steps (sine or linear)."""
    if kind == "none" or total <= 0:
        return 1.0
    x = min(1.0, step / total)
    if kind == "sine":
        return math.sin(math.pi / 2 * x)
    if kind == "linear":
        return x
    raise ValueError(f"heads_ramp must be 'sine', 'linear' or 'none', got {kind!r}")


class RowStream:
    """Packed-row order: epoch after epoch, each a seeded permutation, identical on every rank."""

    def __init__(self, num_rows: int, seed: int):
        self.n, self.seed, self._perms = num_rows, seed, {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def take(self, step: int, n: int) -> list[int]:
        """The ``n`` row ids of optimizer step ``step``."""
        return [self._perm(p // self.n)[p % self.n] for p in range(step * n, (step + 1) * n)]


# ----------------------------------------------------------------------------- the objective


class Objective(nn.Module):
    """One forward: the weighted Medusa loss of a micro-batch (wrapped in DDP when W > 1).

    forward(batch, norm [K + 1] global counts (backbone, head 0..K-1), head_w [K],
    backbone_w) -> (loss, stats [K + 1] = (backbone loss sum, head CE sums)).
    """

    def __init__(self, base: Transformer, heads: MedusaHeads, joint: bool, frozen_layers: int,
                 backbone_loss: str | None, teacher: Transformer | None):
        super().__init__()
        self.base, self.heads = base, heads
        self.joint, self.frozen_layers, self.backbone_loss = joint, frozen_layers, backbone_loss
        self._teacher = [teacher]  # a list: not a submodule, so DDP leaves it alone

    def hidden(self, batch: dict) -> torch.Tensor:
        args = (self.base, batch["tokens"], batch["positions"], batch["segments"])
        if self.joint:
            return causal_hidden(*args, frozen_layers=self.frozen_layers)
        with torch.no_grad():
            return causal_hidden(*args)

    def forward(self, batch: dict, norm: torch.Tensor, head_w: torch.Tensor, backbone_w: float):
        hidden = self.hidden(batch)
        h_sums = heads_loss_sums(self.heads, hidden, batch)
        loss = (head_w * h_sums / norm[1:]).sum()
        bb = torch.zeros((), device=hidden.device)
        if self.joint and self.backbone_loss:
            valid, labels = backbone_positions(batch, self.backbone_loss)
            logits = self.base.logits(hidden[valid])
            if self.backbone_loss == "lm":
                bb = nn.functional.cross_entropy(upcast(logits), labels[valid], reduction="sum")
            elif self.backbone_loss == "kl-stored":
                bb = topk_kl_sum(logits, batch["teacher_ids"][valid],
                                 batch["teacher_logprobs"][valid])
            else:
                teacher = self._teacher[0]
                with torch.no_grad():
                    t = causal_hidden(teacher, batch["tokens"], batch["positions"],
                                      batch["segments"])
                    t_logits = teacher.logits(t[valid])
                bb = kl_sum(logits, t_logits)
            loss = loss + backbone_w * bb / norm[0]
        return loss, torch.cat([bb.detach().float()[None], h_sums.detach().float()])


def backbone_positions(batch: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the backbone's loss (next token is a target; stored teacher present)."""
    valid, labels = shifted_targets(batch, 1)
    if kind == "kl-stored":
        valid = valid & batch["has_teacher"]
    return valid, labels


def position_counts(batch: dict, K: int, backbone_kind: str | None) -> torch.Tensor:
    """[K + 1]: backbone-loss positions, then head k's valid positions (shift k + 2)."""
    bb = backbone_positions(batch, backbone_kind or "lm")[0].sum() if backbone_kind else 0
    out = [torch.as_tensor(bb, dtype=torch.float64)]
    out += [shifted_targets(batch, k + 2)[0].sum().double() for k in range(K)]
    return torch.stack(out)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(base: Transformer, heads: MedusaHeads, batches: list[dict], topk: int, world: int,
             autocast) -> dict:
    """Per-head rank hit rates on ``batches`` (this rank's share), summed over ranks."""
    device = heads.w1.device
    K = heads.num_heads
    hits = torch.zeros(K + 1, topk, dtype=torch.float64, device=device)
    counts = torch.zeros(K + 1, dtype=torch.float64, device=device)
    losses = torch.zeros(K + 1, dtype=torch.float64, device=device)
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        with autocast():
            hidden = causal_hidden(base, b["tokens"], b["positions"], b["segments"])
            h, c, s = rank_hits(heads, base, hidden, b, topk)
        hits += h
        counts += c
        losses += s
    stats = _all_reduce(torch.cat([hits.flatten(), counts, losses]), world).cpu()
    hits = stats[:(K + 1) * topk].view(K + 1, topk)
    counts, losses = stats[(K + 1) * topk:-(K + 1)], stats[-(K + 1):]
    acc = hits / counts.clamp(min=1)[:, None]
    r = lambda x: round(float(x), 6)
    return {
        "accuracies": [[r(a) for a in row] for row in acc[1:].tolist()],
        "top1": [r(a) for a in acc[1:, 0]],
        "top5": [r(a) for a in acc[1:, :5].sum(1)],
        "loss": [r(x) for x in (losses / counts.clamp(min=1))[1:]],
        "positions": [int(c) for c in counts[1:]],
        "base": {"top1": r(acc[0, 0]), "top5": r(acc[0, :5].sum()),
                 "loss": r(losses[0] / counts[0].clamp(min=1)), "positions": int(counts[0])},
    }


# ----------------------------------------------------------------------------- accepted tokens


def measure_accept(model_dir: str, heads_dir: str, original_dir: str,
                   prompts: list[list[int]], max_new_tokens: int, tree, device) -> dict:
    """Mean accepted tokens per step of greedy Medusa decoding with the trained heads (loaded
    from disk, on the trained base) and with fresh heads (``init_from_lm_head``) on the
    original base, one prompt at a time; checks trained greedy Medusa == plain greedy."""
    from ..decoding import generate

    trained = load_model(model_dir, medusa=heads_dir, device=device)
    K, L = trained.heads.num_heads, trained.heads.num_layers
    orig = load_base_model(original_dir, trained.dtype, device)
    fresh = MedusaHeads(K, L, orig.cfg.hidden_size, orig.cfg.vocab_size,
                        kind=trained.heads.kind, token_map=trained.heads.token_map)
    fresh = fresh.to(device, trained.dtype)
    fresh.init_from_lm_head(orig.lm_head.weight)
    untrained = MedusaModel(orig, fresh.eval(), original_dir)
    eos = trained.eos_token_id()
    out: dict = {"prompts": len(prompts), "max_new_tokens": max_new_tokens,
                 "tree": tree or DEFAULT_TREE, "dtype": str(trained.dtype).split(".")[-1]}
    if tree is None:  # the same tree for both models: the paper's, cut to the heads
        tree = resolve_choices(None, K, trained.heads.draft_vocab)
    same = True
    for name, m in (("trained", trained), ("untrained", untrained)):
        counts, tokens, t = [], 0, 0.0
        for p in prompts:
            r = generate(m, [p], max_new_tokens=max_new_tokens, medusa=True, tree=tree,
                         eos_token_id=eos)
            counts += [n for step in r.accepted_per_step for n in step if n > 0]
            tokens, t = tokens + r.num_tokens, t + r.wall_time
            if name == "trained":
                plain = generate(m, [p], max_new_tokens=max_new_tokens, medusa=False,
                                 eos_token_id=eos)
                same = same and plain.tokens == r.tokens
        out[f"mean_accepted_{name}"] = round(sum(counts) / max(len(counts), 1), 4)
        out[f"tokens_per_second_{name}"] = round(tokens / t, 1) if t > 0 else None
    out["identical_to_plain_greedy"] = same
    return out


# ----------------------------------------------------------------------------- training


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(f"[medusa_kernels.train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)


def _model_dtype_name(cfg_json: dict) -> str | None:
    return cfg_json.get("torch_dtype") or cfg_json.get("dtype")


class _Cast:
    """``hf_state_dict`` of a model cast to ``dtype`` on the CPU (what save_base_model reads)."""

    def __init__(self, model: Transformer, dtype):
        self.model, self.dtype = model, dtype

    def hf_state_dict(self):
        return {k: v.to("cpu", self.dtype) for k, v in self.model.hf_state_dict().items()}


def train(cfg: TrainConfig) -> TrainResult:
    """Self-distil (when ``cfg.prompts``), train, evaluate, save; see the module doc.

    Writes ``out/heads`` (public Medusa heads layout), for Medusa-2 ``out/model`` (HF layout,
    the original config.json and tokenizer files), ``out/head_accuracy.json`` and
    ``out/train_report.json``.
    """
    rank, world, device, owned = setup_distributed(cfg.device)
    with group_ending(owned):
        return _train(cfg, rank, world, device)


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> TrainResult:
    if cfg.mode not in ("medusa1", "medusa2"):
        raise ValueError(f"mode must be 'medusa1' or 'medusa2', got {cfg.mode!r}")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of the number of "
                         f"processes ({world})")
    if cfg.data is None and cfg.prompts is None:
        raise ValueError("give data (a dataset) or prompts (to self-distil one)")
    t0 = time.perf_counter()
    joint_mode = cfg.mode == "medusa2"
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    cfg_json = read_json(os.path.join(cfg.model, "config.json"))

    # -- backbone: fp32 master weights when it trains; frozen bf16 on CUDA for Medusa-1
    if cfg.dtype is not None:
        base_dtype = cfg.dtype
    elif joint_mode or device.type != "cuda":
        base_dtype = torch.float32
    else:
        base_dtype = torch.bfloat16
    head_dtype = torch.float64 if base_dtype == torch.float64 else torch.float32
    use_autocast = cfg.autocast if cfg.autocast is not None else device.type == "cuda"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast \
        else contextlib.nullcontext
    base = load_base_model(cfg.model, base_dtype, device)
    tokenizer = MedusaModel(base, None, cfg.model).tokenizer()

    # -- data (self-distilled first if asked)
    data = cfg.data or os.path.join(cfg.out, "data")
    if cfg.prompts is not None:
        dcfg = DistillConfig(cfg.model, cfg.prompts, data, cfg.max_new_tokens, cfg.temperature,
                             cfg.distill_batch_size, cfg.seed, cfg.top_logits, cfg.data_format,
                             progress=cfg.progress)
        _log(rank, f"self-distillation of {cfg.prompts} into {data}")
        self_distill(dcfg, MedusaModel(base, None, cfg.model), rank=rank, world=world)
        _barrier(world)
    samples, meta = load_dataset(data, tokenizer)
    keep = lambda s: min(len(s), cfg.seq_len) >= 3 and (
        cfg.train_on_prompt or min(len(s), cfg.seq_len) > s.prompt_len)
    samples = [s for s in samples if keep(s)]
    if cfg.eval_data:
        train_s, eval_s = samples, load_dataset(cfg.eval_data, tokenizer)[0]
    else:
        g = torch.Generator().manual_seed(cfg.seed + 17)
        perm = torch.randperm(len(samples), generator=g).tolist()
        n_eval = min(len(samples) - 1, math.ceil(cfg.eval_fraction * len(samples))) \
            if cfg.eval_fraction > 0 else 0
        eval_s = [samples[i] for i in sorted(perm[:n_eval])]
        train_s = [samples[i] for i in sorted(perm[n_eval:])]
    if not train_s:
        raise ValueError(f"{data}: no training samples (need >= 3 tokens and a response)")

    # -- backbone loss (Medusa-2)
    has_stored = train_s[0].top_ids is not None
    bb_kind = None
    if joint_mode:
        kind = cfg.backbone_loss
        if kind == "auto":
            kind = "kl" if meta.get("self_distilled") else "lm"
        if kind == "kl":
            teacher_kind = cfg.teacher if cfg.teacher != "auto" else \
                ("stored" if has_stored else "model")
            if teacher_kind == "stored" and not has_stored:
                raise ValueError(f"teacher 'stored' but {data} holds no top logits "
                                 "(self-distil with top_logits > 0)")
            bb_kind = "kl-stored" if teacher_kind == "stored" else "kl-model"
        elif kind == "lm":
            bb_kind = "lm"
        else:
            raise ValueError(f"backbone_loss must be 'auto', 'kl' or 'lm', got {kind!r}")
    topk_stored = int(train_s[0].top_ids.shape[1]) if bb_kind == "kl-stored" else 0
    teacher = None
    if bb_kind == "kl-model":
        teacher = copy.deepcopy(base).eval().requires_grad_(False)

    # -- rows, steps
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_s), generator=g).tolist()
    train_s = [train_s[i] for i in order]  # shuffled before packing
    rows = pack([len(s) for s in train_s], cfg.seq_len, cfg.pack)
    eval_rows = pack([len(s) for s in eval_s], cfg.seq_len, cfg.pack)[:cfg.eval_max_rows]
    stream = RowStream(len(rows), cfg.seed)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))
    local = cfg.batch_size // world
    micro = cfg.micro_batch_size or local
    collate_args = (cfg.seq_len, cfg.train_on_prompt, topk_stored)
    eval_batches = [collate(eval_s, [eval_rows[j] for j in chunk], cfg.seq_len,
                            cfg.train_on_prompt)
                    for chunk in _chunks(list(range(rank, len(eval_rows), world)), micro)]
    eval_every = cfg.eval_every or max(1, steps // 10)
    _log(rank, f"{cfg.mode}: {len(train_s)} samples in {len(rows)} rows of <= {cfg.seq_len} "
               f"tokens, {len(eval_s)} held out; {steps} steps of {cfg.batch_size} rows on "
               f"{world} process(es); backbone loss {bb_kind}")

    # -- heads (Medusa's initialisation: ResBlocks zero, projections = the lm_head; shared
    # heads read the frozen lm_head itself); a trimmed vocabulary: the most frequent targets
    cfgm = base.cfg
    token_map = None
    if cfg.vocab is not None:
        token_map = frequent_tokens(train_s, cfgm.vocab_size, cfg.vocab, cfg.train_on_prompt)
    heads = MedusaHeads(cfg.num_heads, cfg.num_layers, cfgm.hidden_size, cfgm.vocab_size,
                        kind=cfg.heads_kind, token_map=token_map)
    heads = heads.to(device, head_dtype)
    heads.init_from_lm_head(base.lm_head.weight.detach().to(head_dtype))
    _log(rank, f"heads: {cfg.heads_kind}, {cfg.num_layers} ResBlock(s), draft vocabulary "
               f"{heads.draft_vocab} of {cfgm.vocab_size}, "
               f"{sum(p.numel() for p in heads.parameters())} trained parameters")

    result = TrainResult(heads, base, os.path.join(cfg.out, "heads"),
                         os.path.join(cfg.out, "model") if joint_mode else cfg.model)
    acc_history: list[dict] = []

    def run_eval(step: int) -> None:
        if not eval_rows:
            return
        base.eval()
        res = evaluate(base, heads, eval_batches, cfg.eval_topk, world, autocast)
        acc_history.append({"step": step, "top1": res["top1"], "top5": res["top5"],
                            "loss": res["loss"], "base_top1": res["base"]["top1"]})
        result.accuracy = {"format": ACCURACY_FORMAT, "step": step,
                           "num_heads": heads.num_heads, "topk": cfg.eval_topk, **res,
                           "eval_samples": len(eval_s), "history": acc_history}
        _log(rank, f"eval step {step}: head top-1 {res['top1']} top-5 {res['top5']} "
                   f"(base top-1 {res['base']['top1']})")
        if rank == 0:
            with open(os.path.join(cfg.out, ACCURACY_FILE), "w") as f:
                json.dump(result.accuracy, f, indent=1)

    # -- stages: (steps, joint)
    stages = []
    if joint_mode and cfg.heads_warmup_steps > 0:
        stages.append((cfg.heads_warmup_steps, False))
    stages.append((steps, joint_mode))
    total = sum(n for n, _ in stages)
    run_eval(0)
    done = 0
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", desc=cfg.mode, dynamic_ncols=True,
               disable=not cfg.progress or rank != 0)
    for stage_steps, joint in stages:
        frozen = 0
        base.requires_grad_(False)
        if joint:
            if cfg.unfreeze_last is not None:
                frozen = max(0, cfgm.num_layers - cfg.unfreeze_last)
                for layer in base.layers[frozen:]:
                    layer.requires_grad_(True)
                base.norm.requires_grad_(True)
            else:
                base.requires_grad_(True)
        base.train(joint)
        heads.train()
        head_lr = (cfg.lr or 1e-3) if not joint_mode else (cfg.lr or 5e-5) * cfg.heads_lr_mult
        groups = [{"params": list(heads.parameters()), "lr": head_lr}]
        bb_params = [p for p in base.parameters() if p.requires_grad]
        if bb_params:
            groups.append({"params": bb_params, "lr": cfg.lr or 5e-5})
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
        warm = cfg.warmup_steps if cfg.warmup_steps is not None else \
            math.ceil(cfg.warmup_ratio * stage_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s, n=stage_steps, w=warm: lr_factor(s, n, w, cfg.min_lr_ratio))
        objective = Objective(base, heads, joint, frozen, bb_kind if joint else None, teacher)
        model = objective
        if world > 1:
            model = nn.parallel.DistributedDataParallel(
                objective, device_ids=[device.index] if device.type == "cuda" else None)
        params = [p for grp in groups for p in grp["params"]]
        decay = torch.tensor([cfg.head_decay**k for k in range(cfg.num_heads)],
                             dtype=torch.float64, device=device)
        ramp_steps = cfg.heads_ramp_steps if cfg.heads_ramp_steps is not None else stage_steps
        for s in range(stage_steps):
            coef = cfg.heads_coefficient * ramp(s, ramp_steps, cfg.heads_ramp) if joint else 1.0
            head_w = decay * coef
            ids = stream.take(done, cfg.batch_size)[rank::world]
            mbs = [collate(train_s, [rows[j] for j in chunk], *collate_args)
                   for chunk in _chunks(ids, micro)]
            counts = sum(position_counts(b, cfg.num_heads, bb_kind if joint else None)
                         for b in mbs).to(device)
            norm = _all_reduce(counts, world).clamp(min=1)
            stats = torch.zeros(cfg.num_heads + 1, device=device)
            for j, b in enumerate(mbs):
                b = {k: v.to(device) for k, v in b.items()}
                sync = j == len(mbs) - 1 or world == 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast():
                        loss, st = model(b, norm, head_w, 1.0)
                    (loss * world).backward()
                stats += st
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            if heads.kind == "shared" and base.lm_head.weight.requires_grad:  # Medusa-2
                heads.attach_lm_head(base.lm_head.weight.detach().to(head_dtype))
            opt.zero_grad(set_to_none=True)
            done += 1
            bar.update(1)
            if done % cfg.log_every == 0 or s == stage_steps - 1 or done == 1:
                st = (_all_reduce(stats, world).double() / norm).tolist()
                h_loss = (head_w.cpu() * torch.tensor(st[1:])).sum().item()
                entry = {"step": done, "stage": "joint" if joint else "heads",
                         "loss": h_loss + (st[0] if bb_kind and joint else 0.0),
                         "head_loss": [round(x, 6) for x in st[1:]],
                         "backbone_loss": st[0] if bb_kind and joint else None,
                         "heads_weight": coef, "lr": sched.get_last_lr()}
                result.history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                if done % (cfg.log_every * 10) == 0 or done == total:
                    _log(rank, f"step {done}/{total} loss {entry['loss']:.4f} heads CE "
                               f"{[round(x, 3) for x in st[1:]]} backbone {entry['backbone_loss']}")
            if done % eval_every == 0 and done != total:
                run_eval(done)
                base.train(joint)
        result.optimizer = opt
    bar.close()
    base.requires_grad_(False).eval()
    heads.eval()
    result.steps = done
    run_eval(done)

    # -- save (rank 0)
    save_dtype = cfg.save_dtype or DTYPES.get(_model_dtype_name(cfg_json) or "", torch.float32)
    if rank == 0:
        save_medusa_heads(heads, result.heads_dir,
                          base_model_name_or_path=os.path.abspath(result.model_dir),
                          dtype=save_dtype)
        if joint_mode:
            save_base_model(_Cast(base, save_dtype), result.model_dir, cfg_json)
            for name in TOKENIZER_FILES:
                src = os.path.join(cfg.model, name)
                if os.path.isfile(src):
                    shutil.copy(src, os.path.join(result.model_dir, name))
        _log(rank, f"saved heads to {result.heads_dir}" +
             (f" and the base to {result.model_dir}" if joint_mode else ""))
    _barrier(world)

    # -- accepted tokens per step, trained vs fresh heads (rank 0)
    if cfg.measure_accept and rank == 0:
        if cfg.prompts and cfg.prompts.startswith("demo"):
            prompts = resolve_prompts(f"demo:{cfg.measure_accept}", tokenizer, split="held")
        else:
            pool = [s for s in eval_s + train_s if s.prompt_len >= 1]
            prompts = [s.ids[:s.prompt_len].tolist() for s in pool[:cfg.measure_accept]]
        new_tokens = cfg.accept_max_new_tokens or meta.get("max_new_tokens") or 128
        result.accept = measure_accept(result.model_dir, result.heads_dir, cfg.model, prompts,
                                       new_tokens, cfg.accept_tree, device)
        _log(rank, f"accepted tokens per step: {result.accept}")
    if rank == 0:
        report = {
            "mode": cfg.mode, "steps": done, "world_size": world, "device": _device_name(device),
            "seconds": round(time.perf_counter() - t0, 1), "samples": len(train_s),
            "rows": len(rows), "eval_samples": len(eval_s), "backbone_loss": bb_kind,
            "head_accuracy": {k: result.accuracy.get(k) for k in ("top1", "top5", "base")},
            "heads": heads_summary(heads, save_dtype),
            "accept": result.accept, "final_loss": result.history[-1] if result.history else None,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "config": {k: (str(v) if isinstance(v, torch.dtype) else v)
                       for k, v in asdict(cfg).items()},
        }
        for path in {os.path.join(cfg.out, "train_report.json"), cfg.report} - {None}:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
    return result


def heads_summary(heads: MedusaHeads, dtype: torch.dtype) -> dict:
    """Kind, sizes, trained parameters and the weight bytes one step of all K heads reads in
    ``dtype`` (separate: K (d^2 + d + R d); shared: K (d^2 + d) + R d; R the draft rows)."""
    K, d, R = heads.num_heads, heads.hidden_size, heads.draft_vocab
    res = K * heads.num_layers * (d * d + d)
    proj = (K if heads.kind == "separate" else 1) * R * d
    return {"kind": heads.kind, "num_heads": K, "num_layers": heads.num_layers,
            "draft_vocab": R, "vocab_size": heads.vocab_size,
            "parameters": sum(p.numel() for p in heads.parameters()),
            "bytes_per_step": (res + proj) * (torch.finfo(dtype).bits // 8)}


def frequent_tokens(samples, vocab_size: int, n: int, train_on_prompt: bool = False
                    ) -> torch.Tensor:
    """The token map of a trimmed vocabulary: the ``n`` most frequent target tokens of
    ``samples`` (response tokens, and prompt tokens with ``train_on_prompt``; frequency ties to
    the lower id), as strictly ascending int64 ids [n]."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= vocab_size:
        raise ValueError(f"vocab must be an int in [1, vocab_size = {vocab_size}], got {n!r}")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in samples:
        ids = s.ids if train_on_prompt else s.ids[s.prompt_len:]
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.numel():
            counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    order = torch.sort(counts, descending=True, stable=True).indices  # ties: lower id first
    return order[:n].sort().values


def _chunks(items: list[int], n: int) -> list[list[int]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
