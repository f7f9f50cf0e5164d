"""The weight products of a CPU decode step, side by side: GB/s of weight read per call at
1-8 rows (a token; a tree's nodes) for F.linear on the row-major weight, ``x @ w.T`` on a
column-major copy (the layout the CPU path kept until 2026-12-07) and ``ops._linear.linear``
(``w @ x.T`` where its rule says, one row sent as two).

    python bench/cpu_linear.py --threads 1 --out RESULT.json
    python bench/cpu_linear.py --model DIR --heads DIR --out RESULT.json   # whole steps

With ``--model``: the decode step of a real checkpoint, plain and Medusa with chains of 1-3
heads (2-4 nodes), the weights read as ``linear`` reads them (row-major, ``w @ x.T``) against
the layout the CPU path used before (column-major, ``F.linear``), in turns in one process:
milliseconds per step of ``generate`` (prefill left out), the median of ``--rounds``.

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


def steps(model_dir: str, heads: str, rounds: int) -> list[dict]:
    """ms per step of plain and chain-tree decoding, streaming layout against the old one."""
    import statistics

    from medusa_kernels import generate, load_model

    model = load_model(model_dir, medusa=heads, dtype=torch.float32)
    base = model.base
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    trees = {"plain": None, "2 nodes": [[0]], "3 nodes": [[0], [0, 0]],
             "4 nodes": [[0], [0, 0], [0, 0, 0]]}
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        layouts = ("linear", "column-major") if r % 2 == 0 else ("column-major", "linear")
        for layout in layouts:
            base._stream = layout == "linear"  # False: the column-major copy, F.linear
            for name, tree in trees.items():
                kw = dict(medusa=False) if tree is None else dict(tree=tree)
                generate(model, prompt, max_new_tokens=2, eos_token_id=[], **kw)  # layout
                res = generate(model, prompt, max_new_tokens=24, eos_token_id=[], **kw)
                ms = (res.wall_time - res.prefill_time) / res.steps * 1e3
                times.setdefault((layout, name), []).append(ms)
    out = []
    print("| step | linear (ms) | column-major, F.linear (ms) | ratio |")
    print("| --- | --- | --- | --- |")
    for name in trees:
        new, old = (statistics.median(times[(lay, name)]) for lay in ("linear", "column-major"))
        out.append({"step": name, "linear_ms": new, "column_major_ms": old,
                    "runs": {lay: times[(lay, name)] for lay in ("linear", "column-major")}})
        print(f"| {name} | {new:.1f} | {old:.1f} | {old / new:.2f}x |", flush=True)
    base._stream = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="a checkpoint: time its whole steps")
    p.add_argument("--heads", default=None, help="its Medusa heads (with --model)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        rows = steps(args.model, args.heads, args.rounds)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"machine": f"{platform.processor() or platform.machine()}, "
                                      f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                           "threads": args.threads, "torch": torch.__version__,
                           "model": args.model, "heads": args.heads, "steps": rows}, f,
                          indent=1)
        return
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
                calls = {  # the layers' weights stream: linear(..., stream=True), as a step
                    "F.linear": lambda x=x, ws=ws: [F.linear(x, w) for w in ws],
                    "column-major": lambda x=x, cols=cols: [x @ w.t() for w in cols],
                    "linear": lambda x=x, ws=ws: [linear(x, w, stream=True) for w in ws],
                }
                rates = {k: gb / _median_seconds(fn) for k, fn in calls.items()}
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
