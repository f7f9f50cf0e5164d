"""The online tree policy against the demo's shipped table and plain decoding, paired: at each
batch size B, B demo prompts decoded greedily (128 new tokens, the demo's EOS) by the three
modes in turns (each first in turn), round after round until the online / table ratio is known
to +-``--ci`` (or ``--max-seconds`` have passed); tokens per second of process CPU time (1
thread).

    OMP_NUM_THREADS=1 python bench/online_policy_demo.py --out RESULT.json

Why so many rounds: on this shared 2-core VM a call's CPU time differs from the next
identical call's by about 10% (one standard deviation of the log ratio at B 1, measured with
two identical modes over 240 rounds), so 12 or 30 rounds judge a 3% target by noise: two
identical modes came out at 0.97 to 1.01 in blocks of 30 rounds. The target (online at least
the table's throughput minus 3%) is judged on the geometric mean of the per-round paired
ratios online / table (the same moment of the machine), given with its 95% interval
(mean +- 2 standard errors of the log ratios). The online policy's estimates carry over from
call to call (a user's calls), its first call not timed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time

import torch

from medusa_kernels import generate, load_model
from medusa_kernels.demo import path as demo_path
from medusa_kernels.demo import prompts as demo_prompts

MODES = {"plain": dict(medusa=False), "table": dict(tree="table"), "online": dict(tree="online")}


def paired(online: list[float], table: list[float]) -> tuple[float, float, float]:
    """Geometric mean of the per-round ratios and its 95% interval (mean +- 2 standard
    errors of the log ratios)."""
    logs = [math.log(o / t) for o, t in zip(online, table, strict=True)]
    mean = statistics.mean(logs)
    half = 2 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.inf
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def quarters(ratios: list[float]) -> list[float]:
    """The geometric mean of the paired ratios in each quarter of the rounds, in order: the
    online policy learns a new batch size in its first calls."""
    q = len(ratios) / 4
    parts = [ratios[round(i * q):round((i + 1) * q)] for i in range(4)]
    return [math.exp(statistics.mean(map(math.log, p))) for p in parts if p]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--min-rounds", type=int, default=12)
    p.add_argument("--ci", type=float, default=0.015,
                   help="stop once the 95%% interval of online / table is within +- this")
    p.add_argument("--max-seconds", type=float, default=240.0, help="per batch size")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    model_dir, heads_dir = demo_path()
    model = load_model(model_dir, medusa=heads_dir, dtype=torch.float32)
    eos = model.eos_token_id()
    results = []
    for B in (int(b) for b in args.batches.split(",")):
        prompts = demo_prompts(model, n=B)
        for kw in MODES.values():  # warm-up; the online policy's first call
            generate(model, prompts, max_new_tokens=args.max_new_tokens, eos_token_id=eos, **kw)
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        tokens = dict.fromkeys(MODES, 0)
        trees: dict[str, collections.Counter] = {m: collections.Counter() for m in MODES}
        outputs = {}
        names = list(MODES)
        start, r = time.perf_counter(), 0
        while True:
            for mode in names[r % 3:] + names[:r % 3]:
                t0 = time.process_time()
                res = generate(model, prompts, max_new_tokens=args.max_new_tokens,
                               eos_token_id=eos, **MODES[mode])
                cpu[mode].append(time.process_time() - t0)
                tokens[mode] = res.num_tokens  # the same each round (greedy)
                trees[mode].update(len(t) + 1 for t in res.step_trees)
                outputs.setdefault(mode, res.tokens)
            r += 1
            rate = {m: [tokens[m] / c for c in cpu[m]] for m in MODES}
            ratio, lo, hi = paired(rate["online"], rate["table"])
            if r >= args.min_rounds and (hi / lo <= (1 + args.ci) / (1 - args.ci) or
                                         time.perf_counter() - start > args.max_seconds):
                break
        ratios = [o / t for o, t in zip(rate["online"], rate["table"], strict=True)]
        row = {"B": B, "rounds": r,
               "tokens_per_cpu_s": {m: tokens[m] * r / sum(cpu[m]) for m in MODES},
               "online_vs_table": ratio, "online_vs_table_ci95": [lo, hi],
               "online_vs_table_paired_median": statistics.median(ratios),
               "online_vs_table_paired_range": [min(ratios), max(ratios)],
               "online_vs_table_sums": sum(cpu["table"]) / sum(cpu["online"]),
               "online_vs_plain": paired(rate["online"], rate["plain"])[0],
               "table_vs_plain": paired(rate["table"], rate["plain"])[0],
               "online_vs_table_quarters": quarters(ratios),
               "trees": {m: dict(sorted(trees[m].items())) for m in MODES},
               "identical": all(outputs[m] == outputs["plain"] for m in MODES)}
        results.append(row)
        print(f"B {B}, {r} rounds: tokens/CPU-s " + ", ".join(
            f"{m} {v:.0f}" for m, v in row["tokens_per_cpu_s"].items())
            + f"; online/table {ratio:.3f} ({lo:.3f}-{hi:.3f}), online/plain "
              f"{row['online_vs_plain']:.3f}, table/plain {row['table_vs_plain']:.3f}; "
              f"online trees {row['trees']['online']}; identical {row['identical']}",
              flush=True)
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(),
                       "commit": commit + (" (with uncommitted changes)" if dirty else ""),
                       "machine": f"{platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} cores, 1 torch thread, load "
                                  f"{os.getloadavg()[0]:.1f}",
                       "torch": torch.__version__, "args": vars(args), "rows": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
