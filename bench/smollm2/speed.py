"""Side by side on one CPU thread: plain greedy, greedy Medusa (each tree given) and
transformers' ``generate`` on the same chat prompts, one prompt at a time (batch 1), in
interleaved rounds; tokens/s from process CPU time (a shared machine's other processes hardly
change it) and wall time. Checks that every Medusa output and transformers' output equal plain
greedy's, token for token.

    python bench/smollm2/speed.py --model /work/data/smollm2-hf --medusa HEADS \\
        --prompts /work/data/prompts_heldout.jsonl --n 8 --max-new-tokens 96 \\
        --tree mc_sim_7b_63 --tree tree_cpu.json --out speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import medusa_kernels as mk
from medusa_kernels.tree import fit_choices, resolve_choices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--medusa", required=True)
    p.add_argument("--prompts", required=True, help=".jsonl with input_ids")
    p.add_argument("--skip", type=int, default=0, help="skip the first N prompts")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tree", action="append", default=[], help="name or JSON file (repeatable)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in open(a.prompts)][a.skip:a.skip + a.n]
    prompts = [r["input_ids"] for r in rows]
    model = mk.load_model(a.model, medusa=a.medusa)
    K, R = model.heads.num_heads, model.heads.draft_vocab
    trees = {}
    for t in a.tree:
        c = resolve_choices(t)
        trees[t.rsplit("/", 1)[-1]] = fit_choices(c, K, R) if t == "mc_sim_7b_63" else c
    eos = model.eos_token_id()
    hf = None
    if not a.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()

    def run(name: str, prompt: list[int]):
        c0, w0 = time.process_time(), time.perf_counter()
        acc = None
        if name == "plain":
            out = mk.generate(model, [prompt], max_new_tokens=a.max_new_tokens, medusa=False,
                              eos_token_id=eos).tokens[0]
        elif name == "transformers":
            with torch.inference_mode():
                ids = hf.generate(torch.tensor([prompt]), max_new_tokens=a.max_new_tokens,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos)
            out = ids[0, len(prompt):].tolist()
        else:
            r = mk.generate(model, [prompt], max_new_tokens=a.max_new_tokens, medusa=True,
                            tree=trees[name], eos_token_id=eos)
            out = r.tokens[0]
            acc = [n for step in r.accepted_per_step for n in step if n > 0]
        return out, time.process_time() - c0, time.perf_counter() - w0, acc

    methods = ["plain", *trees] + ([] if hf is None else ["transformers"])
    cpu = {m: [] for m in methods}
    wall = {m: [] for m in methods}
    outs: dict[str, list] = {m: [None] * len(prompts) for m in methods}
    accepted: dict[str, list[int]] = {m: [] for m in trees}
    ntok = [0] * len(prompts)
    for rnd in range(a.rounds):
        for i, prompt in enumerate(prompts):
            order = methods if (rnd + i) % 2 == 0 else methods[::-1]
            for m in order:
                out, c, w, acc = run(m, prompt)
                outs[m][i] = out
                ntok[i] = len(outs["plain"][i]) if outs["plain"][i] is not None else len(out)
                cpu[m].append((len(out), c))
                wall[m].append((len(out), w))
                if acc is not None and rnd == 0:
                    accepted[m] += acc
            print(f"round {rnd} prompt {i}: " + ", ".join(
                f"{m} {cpu[m][-1][0] / cpu[m][-1][1]:.1f} tok/s" for m in methods),
                file=sys.stderr, flush=True)
    same = {m: all(outs[m][i] == outs["plain"][i] for i in range(len(prompts)))
            for m in methods if m != "plain"}
    tps = {m: sum(n for n, _ in cpu[m]) / sum(c for _, c in cpu[m]) for m in methods}
    tps_wall = {m: sum(n for n, _ in wall[m]) / sum(c for _, c in wall[m]) for m in methods}
    res = {
        "prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "rounds": a.rounds,
        "tokens": sum(ntok), "threads": torch.get_num_threads(),
        "tokens_per_second_cpu_time": {m: round(v, 2) for m, v in tps.items()},
        "tokens_per_second_wall": {m: round(v, 2) for m, v in tps_wall.items()},
        "speedup_vs_plain_cpu_time": {m: round(tps[m] / tps["plain"], 3) for m in methods},
        "mean_accepted": {m: round(statistics.fmean(v), 4) if v else None
                          for m, v in accepted.items()},
        "tree_nodes": {m: len(t) + 1 for m, t in trees.items()},
        "identical_to_plain_greedy": same,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "argv": sys.argv,
    }
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
