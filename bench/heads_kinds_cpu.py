"""CPU cost of the Medusa heads kinds at SmolLM2-135M's shape (d 576, V 49152, 30 layers, tied
embeddings), random weights, fp32, one thread: the heads' top-k alone and a whole Medusa step
(``calibrate.step_times``: plain and Medusa steps taking turns, ratios per round) for separate
heads, shared heads, and shared / separate heads over a trimmed vocabulary.

    OMP_NUM_THREADS=1 python bench/heads_kinds_cpu.py [--context 256] [--tree small_7]

Prints a markdown table (times, ratio to separate heads, weight bytes the heads read per step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medusa_kernels import MedusaHeads
from medusa_kernels.bench.e2e import random_model
from medusa_kernels.calibrate import step_times
from medusa_kernels.model import ModelConfig
from medusa_kernels.tree import TREES

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--tree", default="small_7")
    p.add_argument("--heads", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig(**SMOLLM2)
    K, d, V = args.heads, cfg.hidden_size, cfg.vocab_size
    model = random_model(cfg, K, torch.float32, "cpu")
    lm = model.base.lm_head.weight.detach()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(V, generator=g)
    variants = {}
    for name, kind, R in [("separate", "separate", None), ("shared", "shared", None),
                          ("shared R 16384", "shared", 16384), ("shared R 8192", "shared", 8192),
                          ("separate R 8192", "separate", 8192)]:
        tmap = None if R is None else order[:R].sort().values
        heads = MedusaHeads(K, 1, d, V, kind=kind, token_map=tmap)
        heads.init_from_lm_head(lm)
        with torch.no_grad():
            heads.w1.normal_(0, 0.02, generator=g)
        variants[name] = heads.eval()
    hidden = torch.randn(1, d, generator=g)
    topk = {n: [] for n in variants}
    with torch.inference_mode():
        for _ in range(7):
            for name, heads in variants.items():
                t = time.perf_counter()
                for _ in range(3):
                    heads.topk(hidden, 10)
                topk[name].append((time.perf_counter() - t) / 3)
    tree = TREES[args.tree]
    steps = {}
    for name, heads in variants.items():
        model.heads = heads
        plain_s, (medusa_s,) = step_times(model, [tree], context=args.context)
        steps[name] = (plain_s, medusa_s)
    sep_topk = statistics.median(topk["separate"])
    sep_step = steps["separate"][1]
    print(f"| heads ({K}) | bytes read (fp32) | heads top-k ms | vs separate | Medusa step ms "
          f"({args.tree}, context {args.context}) | vs separate | plain step ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, heads in variants.items():
        mb = (heads.projection_bytes() + heads.resblock_bytes()) / 1e6
        t = statistics.median(topk[name])
        plain_s, medusa_s = steps[name]
        print(f"| {name} | {mb:.1f} MB | {t * 1e3:.2f} | {t / sep_topk:.3f} | "
              f"{medusa_s * 1e3:.1f} | {medusa_s / sep_step:.3f} | {plain_s * 1e3:.1f} |")


if __name__ == "__main__":
    main()
