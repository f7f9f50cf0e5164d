"""Where a batch's time goes, the online tree policy against the demo's shipped table: B demo
prompts decoded greedily (128 new tokens) by the two modes in turns, after the demo bench's
history (B 1 and B 4 calls, so the online policy starts at B as it does there); each loop
iteration's thread CPU time (from one ``choose`` to the next: the step and its host work)
summed per (rows band, tree nodes, exploration or choice).

    OMP_NUM_THREADS=1 python bench/online_policy_decomp.py --batch 16 --rounds 40

Besides the measured ratio it prints a modeled one: every mode's steps priced at the mean time
of its (rows band, tree) over both modes. On this VM a mode's call time wanders by +-3% over
40 rounds, so the measured ratio judges the choices by noise; the modeled one compares only
the trees chosen and the steps they took (the B 16 of the seventh round: table 66 steps of
the 2-node tree at 16 rows a call; the old policy also ran 14 of its 4-node tree there).
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import time

import torch

from medusa_kernels import decoding, generate, load_model
from medusa_kernels.demo import path as demo_path
from medusa_kernels.demo import prompts as demo_prompts
from medusa_kernels.policy import TreePolicy
from medusa_kernels.tree import default_policy_file


class Probe:
    """A policy's calls timed: each loop iteration's thread time, keyed by the choice."""

    def __init__(self, policy, batch: int):
        self.policy, self.batch = policy, batch
        self.spent = collections.defaultdict(lambda: [0, 0.0])  # key -> [steps, seconds]
        self.last = None
        if hasattr(policy, "observe"):
            self.observe = policy.observe

    def trees(self):
        return self.policy.trees()

    def band(self, rows: int) -> str:
        if rows == self.batch:
            return str(rows)
        lo = 1 << (rows.bit_length() - 1)  # a power of two up to the next, below the batch
        hi = min(2 * lo - 1, self.batch - 1)
        return f"{lo}-{hi}" if hi > lo else str(lo)

    def choose(self, rows: int, context: int | None = None):
        now = time.thread_time()
        self.end(now)
        tree = self.policy.choose(rows, context)
        explored = bool(getattr(self.policy, "_explored", False))
        self.last = ((self.band(rows), len(tree) + 1, "x" if explored else "."), now)
        return tree

    def end(self, now: float | None = None) -> None:
        if self.last is not None:
            now = time.thread_time() if now is None else now
            entry = self.spent[self.last[0]]
            entry[0] += 1
            entry[1] += now - self.last[1]
        self.last = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--history", default="1x40,4x60", help="B x calls of the online policy first")
    args = p.parse_args()
    torch.set_num_threads(1)
    model_dir, heads_dir = demo_path()
    model = load_model(model_dir, medusa=heads_dir, dtype=torch.float32)
    eos = model.eos_token_id()
    online = decoding.online_policy(model)
    for item in filter(None, args.history.split(",")):
        b, n = map(int, item.split("x"))
        prompts = demo_prompts(model, n=b)
        for _ in range(n):
            generate(model, prompts, max_new_tokens=128, eos_token_id=eos, tree=online)
    B, R = args.batch, args.rounds
    table = TreePolicy.load(default_policy_file(model.device, model_dir))
    probes = {"table": Probe(table, B), "online": Probe(online, B)}
    prompts = demo_prompts(model, n=B)
    cpu: dict[str, list[float]] = {m: [] for m in probes}
    for probe in probes.values():  # warm-up, not counted
        generate(model, prompts, max_new_tokens=128, eos_token_id=eos, tree=probe)
        probe.end()
        probe.spent.clear()
    for r in range(R):
        for m in (("table", "online") if r % 2 == 0 else ("online", "table")):
            t0 = time.thread_time()
            generate(model, prompts, max_new_tokens=128, eos_token_id=eos, tree=probes[m])
            cpu[m].append(time.thread_time() - t0)
            probes[m].end()
    logs = [math.log(t / o) for o, t in zip(cpu["online"], cpu["table"], strict=True)]
    half = 2 * statistics.stdev(logs) / math.sqrt(R)
    print(f"B {B}, {R} rounds: online / table throughput {math.exp(statistics.mean(logs)):.3f} "
          f"(+-{half:.3f}); ms a call: " + ", ".join(
              f"{m} {1e3 * statistics.mean(c):.1f}" for m, c in cpu.items()))
    pool: dict[tuple[str, int], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for probe in probes.values():
        for (band, nodes, _), (n, t) in probe.spent.items():
            pool[(band, nodes)][0] += n
            pool[(band, nodes)][1] += t
    modeled = {m: sum(n * pool[k[:2]][1] / pool[k[:2]][0] for k, (n, _) in pr.spent.items())
               for m, pr in probes.items()}
    print(f"modeled online / table: {modeled['table'] / modeled['online']:.4f} (each mode's "
          "steps at the mean time of their (rows, tree) over both modes)")
    print(f"{'rows, nodes, kind':22}" + "".join(f"{m + ' steps':>14}{m + ' ms':>11}"
                                                for m in probes) + "   (a call)")
    for key in sorted(set().union(*(pr.spent for pr in probes.values())),
                      key=lambda k: (-int(k[0].split("-")[0]), k[1], k[2])):
        row = "".join(f"{pr.spent[key][0] / R:14.2f}{1e3 * pr.spent[key][1] / R:11.1f}"
                      if key in pr.spent else f"{0:14.2f}{0:11.1f}" for pr in probes.values())
        print(f"{str(key):22}{row}")


if __name__ == "__main__":
    main()
