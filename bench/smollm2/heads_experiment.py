"""Medusa-1 heads for SmolLM2-135M-Instruct on a CPU: train on the greedy decoder's own hidden
states, measure head accuracy and accepted tokens per step.

Medusa-1 freezes the backbone, so the hidden state at every position is a constant of the data:
``train distill --save-hidden`` keeps the states the greedy decoder computed while it wrote the
replies (fp16), and this script trains the heads on them with the trainer's objective
(``training.objectives``: head k at position t against token t + k + 2, per-head mean
cross-entropy weighted ``head_decay ** k``, AdamW, warm-up + cosine, gradient clipping 1.0) but
without running 30 layers again for every step and every variant: on a CPU the backbone
forward costs more than the heads (``train medusa1`` runs it each step).

Accepted tokens per step are counted on the held-out prompts' greedy replies the same way:
greedy Medusa accepts the longest tree path whose head-d candidate equals the greedy token d + 1
places ahead, so, given the greedy reply and the hidden state at every position, a step from
position j takes 1 + that depth tokens (``simulate_accept``; checked against real decoding by
``--decode N``, which also checks greedy Medusa == plain greedy).

    python bench/smollm2/heads_experiment.py train --data /work/data/distill \\
        --heldout /work/data/heldout --out /work/data/runs/shared8k --heads shared \\
        --vocab 8192 --num-heads 3 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from medusa_kernels.checkpoint import load_base_model, save_medusa_heads
from medusa_kernels.heads import MedusaHeads
from medusa_kernels.training.data import load_dataset
from medusa_kernels.training.distill import load_hidden
from medusa_kernels.training.trainer import frequent_tokens, lr_factor
from medusa_kernels.tree import TREES, fit_choices


def load_rows(data: str, num_heads: int, limit_samples: int | None = None):
    """(hidden [N, d] fp16, targets [N, 1 + K] int64 (-1: past the reply), sample of each row,
    samples). Row j of a sample: the state at position P - 1 + j; column c its token c + 1
    places ahead (column 0: the base lm_head's target, i.e. reply token j)."""
    samples, _ = load_dataset(data)
    hidden = load_hidden(data)
    samples = [s for s in samples if s.index in hidden]
    if limit_samples is not None:
        samples = samples[:limit_samples]
    hs, ts, owner = [], [], []
    for n, s in enumerate(samples):
        reply = s.ids[s.prompt_len:].long()
        h = hidden[s.index]
        if h.shape[0] != reply.shape[0]:
            raise ValueError(f"{data}: sample {s.index} has {h.shape[0]} hidden rows for "
                             f"{reply.shape[0]} reply tokens")
        L = reply.shape[0]
        t = torch.full((L, num_heads + 1), -1, dtype=torch.long)
        for c in range(num_heads + 1):
            if L > c:
                t[:L - c, c] = reply[c:]
        hs.append(h)
        ts.append(t)
        owner.append(torch.full((L,), n, dtype=torch.long))
    return torch.cat(hs), torch.cat(ts), torch.cat(owner), samples


def make_heads(kind: str, num_heads: int, layers: int, base, token_map) -> MedusaHeads:
    cfg = base.cfg
    heads = MedusaHeads(num_heads, layers, cfg.hidden_size, cfg.vocab_size, kind=kind,
                        token_map=token_map)
    heads.init_from_lm_head(base.lm_head.weight.detach().float())
    return heads


def loss_terms(heads: MedusaHeads, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-head (CE sum, positions) [K, 2] (the trainer's heads_loss_sums on flat rows)."""
    out = []
    for k in range(heads.num_heads):
        y = t[:, k + 1]
        valid = y >= 0
        logits = heads.head_logits(h[valid], k).float()
        target = heads.token_rows(y[valid])
        ce = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum")
        out.append(torch.stack([ce, valid.sum().to(ce.dtype)]))
    return torch.stack(out)


@torch.no_grad()
def accuracy(heads: MedusaHeads, base, h: torch.Tensor, t: torch.Tensor, topk: int = 10,
             chunk: int = 1024) -> dict:
    """Rank hit rates of every head (and the base lm_head) on rows h, as head_accuracy.json."""
    K = heads.num_heads
    hits = torch.zeros(K + 1, topk, dtype=torch.float64)
    counts = torch.zeros(K + 1, dtype=torch.float64)
    for s in range(0, h.shape[0], chunk):
        hh, tt = h[s:s + chunk].float(), t[s:s + chunk]
        for j in range(K + 1):
            y = tt[:, j]
            valid = y >= 0
            if j == 0:
                idx = base.logits(hh[valid]).topk(topk, dim=-1).indices
            else:
                idx = heads.to_token_ids(
                    heads.head_logits(hh[valid], j - 1).topk(topk, dim=-1).indices)
            hits[j] += (idx == y[valid][:, None]).double().sum(0)
            counts[j] += valid.sum()
    acc = hits / counts.clamp(min=1)[:, None]
    r = lambda x: round(float(x), 4)
    return {"accuracies": [[r(a) for a in row] for row in acc[1:].tolist()],
            "top1": [r(a) for a in acc[1:, 0]], "top5": [r(a) for a in acc[1:, :5].sum(1)],
            "positions": [int(c) for c in counts[1:]], "base_top1": r(acc[0, 0]),
            "topk": topk}


@torch.no_grad()
def simulate_accept(heads: MedusaHeads, h: torch.Tensor, t: torch.Tensor, owner: torch.Tensor,
                    tree: list[list[int]]) -> dict:
    """Greedy Medusa's steps on each held-out reply (see the module doc): mean tokens per step
    (prefill's first token not counted, as ``GenerationResult.mean_accepted``)."""
    width = 1 + max(max(p) for p in tree)
    depth = max(len(p) for p in tree)
    per_prompt, all_counts = [], []
    for n in owner.unique().tolist():
        rows = (owner == n).nonzero()[:, 0]
        hh, tt = h[rows].float(), t[rows]
        L = hh.shape[0]
        ids = heads.topk(hh, width, num_heads=depth)[1]  # [L, depth, width] token ids
        j, counts = 0, []
        while j < L - 1:  # state j: reply token j emitted, its hidden H[j] is the last
            best = 0
            for p in tree:
                d = len(p)
                if d <= best or j + d >= L:
                    continue
                if all(int(ids[j, i, p[i]]) == int(tt[j + 1 + i, 0]) for i in range(d)):
                    best = d
            step = min(best + 1, L - 1 - j)
            counts.append(step)
            j += step
        per_prompt.append(sum(counts) / max(len(counts), 1))
        all_counts += counts
    return {"mean_accepted": round(sum(all_counts) / max(len(all_counts), 1), 4),
            "steps": len(all_counts), "tokens": sum(all_counts), "prompts": len(per_prompt),
            "tree_nodes": len(tree) + 1}


def run_variant(args, base, train_rows, held_rows, out: str) -> dict:
    """Train one kind of heads on ``train_rows`` and measure it on ``held_rows``; writes
    ``out/heads`` and ``out/report.json``."""
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    h, t, owner, samples = train_rows
    hv, tv, ov, _ = held_rows
    n_samples = len(samples)
    if args.fraction < 1:  # the first fraction of the samples (the file's order is random)
        cut = math.ceil(args.fraction * n_samples)
        keep = owner < cut
        h, t, owner, samples = h[keep], t[keep], owner[keep], samples[:cut]
    token_map = None
    if args.vocab:
        token_map = frequent_tokens(samples, base.cfg.vocab_size, args.vocab)
    heads = make_heads(args.heads, args.num_heads, args.layers, base, token_map)
    params = [p for p in heads.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    N = h.shape[0]
    steps = args.steps or max(1, math.ceil(args.epochs * N / args.batch))
    warm = math.ceil(0.1 * steps)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warm, 0.0))
    decay = torch.tensor([args.head_decay ** k for k in range(args.num_heads)])
    print(f"{out}: {args.heads} heads, {args.layers} ResBlock(s), draft vocab "
          f"{heads.draft_vocab}: {n_params} parameters; {len(samples)} samples, {N} positions; "
          f"{steps} steps of {args.batch}", file=sys.stderr, flush=True)
    g = torch.Generator().manual_seed(args.seed)
    perm, pos = torch.randperm(N, generator=g), 0
    t_train, c_train = time.perf_counter(), time.process_time()
    for step in range(steps):
        if pos + args.batch > N:
            perm, pos = torch.randperm(N, generator=g), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        terms = loss_terms(heads, h[idx].float(), t[idx])
        loss = (decay * terms[:, 0] / terms[:, 1].clamp(min=1)).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            ce = (terms[:, 0] / terms[:, 1].clamp(min=1)).tolist()
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} CE "
                  f"{[round(x, 3) for x in ce]} {time.perf_counter() - t_train:.0f}s",
                  file=sys.stderr, flush=True)
    train_s, train_cpu = time.perf_counter() - t_train, time.process_time() - c_train
    heads.eval()
    acc = accuracy(heads, base, hv, tv)
    trees = {"mc_sim_7b_63": fit_choices(TREES["mc_sim_7b_63"], args.num_heads,
                                         heads.draft_vocab)}
    for extra in args.tree or []:
        with open(extra) as f:
            c = json.load(f)
        trees[os.path.basename(extra)] = c["choices"] if isinstance(c, dict) else c
    sim = {name: simulate_accept(heads, hv, tv, ov, tree) for name, tree in trees.items()}
    save_medusa_heads(heads, os.path.join(out, "heads"),
                      base_model_name_or_path=os.path.abspath(args.model), dtype=torch.float16)
    V, d = base.cfg.vocab_size, base.cfg.hidden_size
    report = {
        "heads": args.heads, "num_heads": args.num_heads, "layers": args.layers,
        "draft_vocab": heads.draft_vocab, "trained_parameters": n_params,
        # what one decoding step's heads top-k reads (fp16 weights): the projection rows (K
        # copies for separate heads, one shared pass for shared heads) and the ResBlocks
        "projection_bytes_per_step_fp16": (args.num_heads if args.heads == "separate" else 1)
        * heads.draft_vocab * d * 2,
        "resblock_bytes_per_step_fp16": heads.resblock_bytes() // 2,
        "lm_head_bytes_fp16": V * d * 2,
        "samples": len(samples), "positions": N, "fraction": args.fraction, "steps": steps,
        "batch_positions": args.batch, "epochs": round(steps * args.batch / N, 3),
        "lr": args.lr, "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "heldout_positions": int(hv.shape[0]), "heldout_prompts": int(ov.unique().numel()),
        "accuracy": acc, "accept_sim": sim, "argv": sys.argv,
        "threads": torch.get_num_threads(),
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({"out": out, "positions": N, "steps": steps, "train_cpu_s": round(train_cpu),
                      "top1": acc["top1"], "top5": acc["top5"],
                      "accept": {k: v["mean_accepted"] for k, v in sim.items()}}), flush=True)
    return report


def fresh_report(args, base, held_rows, out: str) -> dict:
    """The untrained heads (Medusa's initialisation: they repeat the base model's guess)."""
    hv, tv, ov, _ = held_rows
    heads = make_heads("shared", args.num_heads, 1, base, None)
    tree = fit_choices(TREES["mc_sim_7b_63"], args.num_heads, heads.draft_vocab)
    rep = {"accuracy": accuracy(heads, base, hv, tv),
           "accept_sim": {"mc_sim_7b_63": simulate_accept(heads, hv, tv, ov, tree)}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)
    print(json.dumps({"out": out, "top1": rep["accuracy"]["top1"],
                      "accept": rep["accept_sim"]["mc_sim_7b_63"]["mean_accepted"]}), flush=True)
    return rep


def train(args) -> None:
    base = load_base_model(args.model, torch.float32, "cpu")
    train_rows = load_rows(args.data, args.num_heads, args.samples)
    held_rows = load_rows(args.heldout, args.num_heads)
    if not args.variant:
        run_variant(args, base, train_rows, held_rows, args.out)
        return
    for spec in args.variant:  # name:kind:vocab:layers:fraction:epochs (vocab 0: all V)
        name, kind, vocab, layers, fraction, epochs = spec.split(":")
        out = os.path.join(args.out, name)
        if os.path.isfile(os.path.join(out, "report.json")):
            print(f"{out}: done already", file=sys.stderr)
            continue
        if kind == "fresh":
            fresh_report(args, base, held_rows, out)
            continue
        v = argparse.Namespace(**vars(args))
        v.heads, v.vocab, v.layers = kind, int(vocab) or None, int(layers)
        v.fraction, v.epochs = float(fraction), float(epochs)
        run_variant(v, base, train_rows, held_rows, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("train")
    a.add_argument("--model", default="/work/data/smollm2-hf")
    a.add_argument("--data", required=True)
    a.add_argument("--heldout", required=True)
    a.add_argument("--samples", type=int, default=None,
                   help="use only the first N samples of --data (the recorded runs: 528)")
    a.add_argument("--out", required=True)
    a.add_argument("--heads", choices=["separate", "shared"], default="shared")
    a.add_argument("--vocab", type=int, default=None)
    a.add_argument("--num-heads", type=int, default=3)
    a.add_argument("--layers", type=int, default=1)
    a.add_argument("--fraction", type=float, default=1.0)
    a.add_argument("--epochs", type=float, default=1.0)
    a.add_argument("--steps", type=int, default=None)
    a.add_argument("--batch", type=int, default=256, help="positions per step")
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--head-decay", type=float, default=0.8)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--tree", action="append", help="also simulate this tree JSON")
    a.add_argument("--variant", action="append",
                   help="name:kind:vocab:layers:fraction:epochs, run in turn into OUT/name "
                        "(kind fresh: the untrained heads); skipped when its report exists")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.cmd == "train":
        train(args)


if __name__ == "__main__":
    main()
