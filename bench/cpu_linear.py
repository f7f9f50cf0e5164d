"""The weight products of a CPU decode step, side by side: GB/s of weight read per call at
1-8 rows (a token; a tree's nodes) for F.linear on the row-major weight, ``x @ w.T`` on a
column-major copy (the layout the CPU path kept until 2026-12-07) and ``ops._linear.linear``
(``w @ x.T`` where its rule says, one row sent as two).

    python bench/cpu_linear.py --threads 1 --out RESULT.json

Shapes: SmolLM2-135M's (q|k|v, o, gate|up, down, lm_head, 8192 draft rows) and a 1024-wide
Llama's, each repeated over enough layers to leave the caches (as a decode step does). Medians
of 9 timings of 5 calls; the modes in turns within each shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from medusa_kernels.ops._linear import linear

SHAPES = {  # name: (N, K, copies: about 60 MB of weights or one matrix)
    "smollm2 q|k|v": (960, 576, 30), "smollm2 o": (576, 576, 30),
    "smollm2 gate|up": (3072, 576, 30), "smollm2 down": (576, 1536, 30),
    "smollm2 lm_head": (49152, 576, 1), "smollm2 heads (8192 rows)": (8192, 576, 3),
    "llama-1024 q|k|v": (3072, 1024, 12), "llama-1024 gate|up": (5632, 1024, 6),
    "llama-1024 down": (1024, 2816, 6), "llama-1024 lm_head": (32000, 1024, 1),
}
ROWS = (1, 2, 3, 4, 8)


def _median_seconds(fn) -> float:
    fn()
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        times.append((time.perf_counter() - t0) / 5)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows_out = []
    print("| shape | rows | F.linear | column-major x @ w.T | linear | linear / best other |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (N, K, copies) in SHAPES.items():
        ws = [torch.randn(N, K, generator=g) for _ in range(copies)]
        cols = [w.t().contiguous().t() for w in ws]
        gb = N * K * 4 * copies / 1e9
        for rows in ROWS:
            x = torch.randn(rows, K, generator=g)
            with torch.inference_mode():
                rates = {
                    "F.linear": gb / _median_seconds(lambda: [F.linear(x, w) for w in ws]),
                    "column-major": gb / _median_seconds(lambda: [x @ w.t() for w in cols]),
                    "linear": gb / _median_seconds(lambda: [linear(x, w) for w in ws]),
                }
            best_other = max(rates["F.linear"], rates["column-major"])
            rows_out.append({"shape": name, "N": N, "K": K, "rows": rows, "GB/s": rates})
            print(f"| {name} | {rows} | {rates['F.linear']:.1f} | {rates['column-major']:.1f} | "
                  f"{rates['linear']:.1f} | {rates['linear'] / best_other:.2f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": f"{platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                       "threads": args.threads, "torch": torch.__version__,
                       "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
