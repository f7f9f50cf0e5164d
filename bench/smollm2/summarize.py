"""Collect the heads experiment's reports (``heads_experiment.py``) and the speed runs
(``speed.py``) into one JSON and a markdown table.

    python bench/smollm2/summarize.py --runs /work/data/runs --speed speed.json \\
        --json bench/results/2026-12-07-smollm2-heads.json > table.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True)
    p.add_argument("--speed", action="append", default=[])
    p.add_argument("--json", required=True)
    a = p.parse_args()
    runs = {}
    for path in sorted(glob.glob(os.path.join(a.runs, "*", "report.json"))):
        runs[os.path.basename(os.path.dirname(path))] = json.load(open(path))
    speed = [json.load(open(s)) for s in a.speed if os.path.isfile(s)]
    with open(a.json, "w") as f:
        json.dump({"runs": runs, "speed": speed}, f, indent=1)
    print("| run | heads | ResBlocks | draft vocab | trained params | positions (epochs) | "
          "train CPU s | top-1 h1/h2/h3 | top-5 h1/h2/h3 | accepted/step mc_sim_7b_63 (sim) | "
          "others (sim) | head bytes/step (fp16) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in runs.items():
        acc = r["accuracy"]
        sim = r["accept_sim"]
        others = ", ".join(f"{k}: {v['mean_accepted']:.2f} ({v['tree_nodes']} nodes)"
                           for k, v in sim.items() if k != "mc_sim_7b_63")
        f3 = lambda xs: " / ".join(f"{x:.3f}" for x in xs)
        if "heads" not in r:  # fresh heads
            print(f"| {name} | fresh (init = lm_head) | - | 49152 | 0 | 0 | 0 | "
                  f"{f3(acc['top1'])} | {f3(acc['top5'])} | "
                  f"{sim['mc_sim_7b_63']['mean_accepted']:.3f} | | - |")
            continue
        byts = r["projection_bytes_per_step_fp16"] + r["resblock_bytes_per_step_fp16"]
        print(f"| {name} | {r['heads']} | {r['layers']} | {r['draft_vocab']} | "
              f"{r['trained_parameters'] / 1e6:.2f} M | {r['positions']} ({r['epochs']}) | "
              f"{r['train_cpu_seconds']:.0f} | {f3(acc['top1'])} | {f3(acc['top5'])} | "
              f"{sim['mc_sim_7b_63']['mean_accepted']:.3f} | {others} | "
              f"{byts / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
