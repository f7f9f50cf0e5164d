"""Side by side on a real model (SmolLM2-135M-Instruct, CPU, 1 thread): plain decoding, fixed
trees and ``generate``'s default (the online tree policy), greedy, held-out chat prompts one at a
time, each prompt decoded by every mode in turn (each first in turn: the machine's drift hits
all alike), tokens per second of process CPU time per round and mode, and per prompt the
online policy over plain decoding (and over the faster of the others) paired: the modes of
one prompt run back to back, so the median of these ratios shrugs off the shared machine's
slow spells, which a round's totals carry into whichever mode they hit.

    OMP_NUM_THREADS=1 python bench/online_policy_cpu.py --model /work/data/smollm2-hf \\
        --heads fresh --rounds 3 --out RESULT.json
    OMP_NUM_THREADS=1 python bench/online_policy_cpu.py --model DIR --heads HEADS_DIR ...

``--heads fresh``: three heads made from the lm_head (ResBlocks zero, projection = lm_head:
each predicts the base model's next token again, so a guess is right only when the text
repeats a token; they never help). The online policy's estimates carry over from call to call
on the loaded model (what a user's calls get); its first call (round 0) starts from the prior.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch

from medusa_kernels import generate, load_model
from medusa_kernels.checkpoint import save_medusa_heads
from medusa_kernels.heads import MedusaHeads

CHAINS = {"chain_1": [[0]], "chain_2": [[0], [0, 0]], "chain_3": [[0], [0, 0], [0, 0, 0]]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--heads", required=True, help="'fresh' or a heads dir")
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--prompts", default="/work/data/prompts_heldout.jsonl")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fixed", default="fixed", help="comma-separated trees: names or chain_N")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # the code this run imports
    heads = args.heads
    if heads == "fresh":
        base = load_model(args.model, dtype=torch.float32)
        h = MedusaHeads(args.num_heads, 1, base.base.cfg.hidden_size, base.base.cfg.vocab_size)
        h.init_from_lm_head(base.base.lm_head.weight.detach())
        heads = tempfile.mkdtemp(prefix="fresh_heads_")
        save_medusa_heads(h, heads, args.model)
        del base, h
    model = load_model(args.model, medusa=heads, dtype=torch.float32)
    with open(args.prompts) as f:
        prompts = [json.loads(line)["input_ids"] for line in f][: args.n]
    modes = {"plain": dict(medusa=False)}
    for name in filter(None, args.fixed.split(",")):
        modes[name] = dict(tree=CHAINS.get(name, name))
    modes["online"] = {}
    runs: dict[str, list[float]] = {m: [] for m in modes}
    # per prompt: each mode's tokens per CPU-s, the modes run back to back (the same moment
    # of the machine): online over plain, and over the faster of the others, per prompt
    paired: dict[str, list[float]] = {"plain": [], "faster": []}
    info: dict[str, dict] = {}
    outputs: dict[str, list] = {}
    names = list(modes)
    for r in range(args.rounds):  # per prompt, the modes in turns (each first in turn)
        tokens = dict.fromkeys(names, 0)
        cpu = dict.fromkeys(names, 0.0)
        steps = dict.fromkeys(names, 0)
        trees: dict[str, dict] = {m: {} for m in names}
        out: dict[str, list] = {m: [] for m in names}
        for j, prompt in enumerate(prompts):
            k = (r * len(prompts) + j) % len(names)
            rate = {}
            for name in names[k:] + names[:k]:
                t0 = time.process_time()
                res = generate(model, [prompt], max_new_tokens=args.max_new_tokens,
                               eos_token_id=[], **modes[name])
                dt = time.process_time() - t0
                cpu[name] += dt  # the whole call, prefill too
                rate[name] = res.num_tokens / dt
                tokens[name] += res.num_tokens
                steps[name] += res.steps
                for n, c in res.tree_steps.items():
                    trees[name][n] = trees[name].get(n, 0) + c
                out[name].append(res.tokens[0])
            paired["plain"].append(rate["online"] / rate["plain"])
            paired["faster"].append(rate["online"] / max(v for m, v in rate.items()
                                                         if m != "online"))
        for name in names:
            runs[name].append(tokens[name] / cpu[name])
            info.setdefault(name, {})[f"round{r}"] = {"steps": steps[name], "trees": trees[name]}
            outputs.setdefault(name, out[name])
            print(f"round {r} {name}: {tokens[name] / cpu[name]:.2f} tokens/CPU-s, "
                  f"{steps[name]} steps, trees {trees[name]}", flush=True)
    identical = {m: outputs[m] == outputs["plain"] for m in modes}
    best = {m: max(v) for m, v in runs.items()}
    faster = max(v for m, v in best.items() if m != "online")  # plain or a fixed tree
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"1 torch thread, load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "commit": commit,
        "args": vars(args), "runs": runs, "best": best, "info": info, "identical": identical,
        "online_vs_plain_best": best["online"] / best["plain"],
        "online_vs_faster_best": best["online"] / faster,
        "online_vs_plain_per_round": [o / p for o, p in zip(runs["online"], runs["plain"],
                                                            strict=True)],
        # per round: online over the faster of plain and the fixed trees in that round
        "online_vs_faster_per_round": [
            runs["online"][r] / max(runs[m][r] for m in names if m != "online")
            for r in range(args.rounds)],
        # per prompt, paired (module doc): the median and quartiles of all rounds' prompts,
        # and each round's median
        "online_vs_plain_paired": _spread(paired["plain"]),
        "online_vs_faster_paired": _spread(paired["faster"]),
        "online_vs_plain_paired_per_round": [
            statistics.median(paired["plain"][r * len(prompts):(r + 1) * len(prompts)])
            for r in range(args.rounds)],
        "online_vs_faster_paired_per_round": [
            statistics.median(paired["faster"][r * len(prompts):(r + 1) * len(prompts)])
            for r in range(args.rounds)],
    }
    print(json.dumps({k: summary[k] for k in ("best", "identical", "online_vs_plain_best",
                                               "online_vs_faster_best",
                                               "online_vs_plain_per_round",
                                               "online_vs_faster_per_round",
                                               "online_vs_plain_paired",
                                               "online_vs_faster_paired",
                                               "online_vs_plain_paired_per_round",
                                               "online_vs_faster_paired_per_round")},
                     indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


def _spread(values: list[float]) -> dict:
    """The median and quartiles of paired ratios."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q25": q[0], "q75": q[2], "n": len(values)}


if __name__ == "__main__":
    main()
