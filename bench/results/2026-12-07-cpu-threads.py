"""Demo model greedy decoding (4 prompts x 64 new tokens, plain and Medusa), torch's default
thread count vs 1 vs 2, interleaved rounds in one process (issue 23, first-hour list).

    PYTHONPATH=$PWD python bench/results/2026-12-07-cpu-threads.py 3   # rounds
(OMP_NUM_THREADS unset, so torch's default applies.) Results: 2026-12-07-cpu-threads.md."""
import os
import sys
import time

import torch

import medusa_kernels as mk

default = torch.get_num_threads()
model = mk.demo.load()
prompts = ["def parse(", "class Stack:", "import os\n", "def main():\n"]
res = {}
def run(n, medusa):
    torch.set_num_threads(n)
    t = time.perf_counter()
    out = mk.generate(model, prompts, max_new_tokens=64, medusa=medusa)
    return time.perf_counter() - t, out.num_tokens if hasattr(out, "num_tokens") else None
for n in (1, default):  # warm
    run(n, True)
    run(n, False)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
for r in range(rounds):
    for n in sorted({default, 1, 2}, reverse=(r % 2 == 1)):
        for medusa in (False, True):
            dt, _ = run(n, medusa)
            key = f"threads={n} {'medusa' if medusa else 'plain'}"
            res.setdefault(key, []).append(round(dt, 3))
print("torch", torch.__version__, "default threads", default, "cpu_count", os.cpu_count(),
      "load", os.getloadavg())
for k, v in res.items():
    print(k, "wall s per round:", v, "median", sorted(v)[len(v)//2])
