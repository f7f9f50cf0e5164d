"""Benchmark section: decoding throughput at several batch sizes (``throughput``).

At each B in ``BATCHES`` (1, 4, 16, 64; ``--quick``: 1, 4, 16 and fewer tokens), B held-out
prompts of the demo (or of ``--model``'s checkpoint: random ids) are decoded greedily to
``max_new_tokens`` four ways, in turns (each mode first in turn), ``repeats`` times each (CPU:
15 / sqrt(B), at least 5; GPU 3; quick 1):

- ``plain``: plain decoding;
- ``fixed``: Medusa with one tree at every step, the device's default (``tree.default_tree``:
  the checkpoint's calibrated tree for the device; ``--tree NAME|FILE`` replaces it);
- ``adaptive``: Medusa with the device's tree policy (``policy.py``): the checkpoint's shipped
  table (``tree.default_policy_file``; ``--tree TABLE.json`` replaces it), else, on a device
  without one, a table calibrated in this run from the head accuracies the checkpoint's
  calibrated tree records (``calibrate.policy_table``). It picks the tree before each step from
  the rows the step computes (finished rows are dropped as the batch drains,
  ``decoding.KEEP_FRACTION``: every mode does that).
- ``online``: ``generate``'s default, the online policy (``policy.OnlinePolicy``: it times
  its steps and counts what they accept, the checkpoint's table its prior), its estimates
  carried over from call to call on the model as a user's calls would (the warm-up is its
  first call).

Row: ``tokens_per_s`` (the fastest run: a busy machine only slows a run down; new tokens after
prefill and the first step, whose CUDA graph capture is not timed, over their decode time),
``tokens_per_s_runs`` (every run), ``mean_accepted`` (tokens per step per running sequence),
``steps``, ``trees`` (tree nodes -> steps: 1 is a plain step), ``speedup`` (over plain, same
B); adaptive and online rows also ``vs_best``: over the faster of plain and fixed; online
rows ``vs_table``: over adaptive (the table); adaptive rows
``same_work_as_fixed``: the policy verified the fixed tree at every step (then ``vs_best``
measures the machine's noise). On a CPU with one torch
thread (the CPU mode) the same with the process's CPU time instead of wall-clock time
(``tokens_per_cpu_s``, ``cpu_speedup``, ``cpu_vs_best``): other processes on a shared machine
inflate wall-clock times, hardly CPU times. ``check``: the four outputs are identical (greedy
decoding is lossless; in bf16/fp16 a difference is a note). On a CPU the section decodes on
the CPU's eager path (``model.CPU_FAST_PATH`` "on"), which ``generate`` takes on a CPU: the
bench's CPU mode runs under TRITON_INTERPRET=1 (to check the kernels), where "auto" would time
the ops' path instead (until 2026-12-07 it did: plain decoding of the demo at half its speed).

``python -m medusa_kernels.bench.throughput --out DIR`` (``trace``): one long greedy generation
of the demo with the online policy (B 16 by default, 512 new tokens), written as
``online_trace.json`` (per step: rows, tree nodes, accepted tokens) and ``online_trace.png``
(the tree size it chose at each step, and the rows still computed).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import torch

from medusa_kernels import model as model_module
from medusa_kernels.checkpoint import load_model
from medusa_kernels.decoding import generate
from medusa_kernels.policy import TreePolicy, is_table_file, policy_label
from medusa_kernels.tree import (
    default_policy_file,
    default_tree,
    fit_choices,
    load_tree,
    tree_label,
)

from ._common import BenchContext, case_wanted

SECTION = "throughput"
BATCHES = (1, 4, 16, 64)
QUICK_BATCHES = (1, 4, 16)
MODES = ("plain", "fixed", "adaptive", "online")


def _settings(ctx: BenchContext) -> tuple[tuple[int, ...], int]:
    """(batches, max_new_tokens)."""
    return (QUICK_BATCHES, 16) if ctx.quick else (BATCHES, 128)


def repeats(ctx: BenchContext, batch: int) -> int:
    """Runs per mode: on a CPU 15 / sqrt(B), at least 5 (short runs are the noisiest and the
    cheapest); 3 on a GPU; 1 with --quick."""
    if ctx.quick:
        return 1
    return 3 if ctx.cuda else max(5, round(15 / batch**0.5))


def _model(ctx: BenchContext):
    dtype = ctx.dtype if ctx.cuda else torch.float32
    if ctx.model_dir is None:
        from medusa_kernels.demo import path as demo_path

        model_dir, heads_dir = demo_path()
        return load_model(model_dir, medusa=heads_dir, dtype=dtype, device=ctx.device), "demo"
    model = load_model(ctx.model_dir, medusa=ctx.medusa_dir, dtype=dtype, device=ctx.device)
    return model, os.path.basename(os.path.normpath(ctx.model_dir))


def _prompts(ctx: BenchContext, model, n: int, demo: bool) -> list[list[int]]:
    if demo:
        from medusa_kernels.demo import prompts as demo_prompts

        return demo_prompts(model, n=n)
    ctx.notes.append(f"{SECTION}: random 24-token prompts for {model.model_dir}")
    g = torch.Generator().manual_seed(0)
    return torch.randint(model.base.cfg.vocab_size, (n, 24), generator=g).tolist()


def _policy(ctx: BenchContext, model, max_new: int, batches) -> tuple[object, str]:
    """The adaptive run's policy and where it came from."""
    if ctx.tree is not None and is_table_file(ctx.tree):
        return TreePolicy.load(ctx.tree), f"--tree {ctx.tree}"
    shipped = default_policy_file(model.device, model.model_dir)
    if shipped is not None:
        return TreePolicy.load(shipped), f"shipped {os.path.basename(shipped)}"
    # none for this device: calibrate one now from the accuracies the calibrated tree records
    from medusa_kernels.calibrate import AUTO_NODES, max_nodes, policy_table

    source = default_tree(model.device, model.model_dir)
    if not os.path.isfile(source):
        raise ValueError(f"{SECTION}: no tree policy for {model.device.type} and no calibrated "
                         f"tree with accuracies next to {model.model_dir}: pass --tree TABLE")
    with open(source) as f:
        acc = json.load(f)["accuracies"][: model.heads.num_heads]
    sizes = [n for n in AUTO_NODES if n <= max_nodes(acc)]
    policy = policy_table(model, acc, sizes, batches, 24 + max_new // 2, quick=ctx.quick,
                          meta={"source": f"calibrated in this run from {source}"})
    return policy, f"calibrated in this run ({os.path.basename(source)} accuracies)"


def _decode(model, prompts, max_new: int, eos, mode: str, fixed, policy):
    """(tokens, result, new tokens after the first step, their seconds, their CPU seconds)."""
    kwargs = {"plain": dict(medusa=False), "fixed": dict(tree=fixed),
              "adaptive": dict(tree=policy), "online": dict(tree="online")}[mode]
    stream = generate(model, prompts, max_new_tokens=max_new, eos_token_id=eos, stream=True,
                      **kwargs)
    first = last = None
    tokens = 0
    for i, new in enumerate(stream):
        now = (time.perf_counter(), time.process_time())
        if i == 1:  # after prefill (0) and the first step (graph capture, warm-up)
            first = now
        elif i > 1:
            tokens += sum(len(t) for t in new)
            last = now
    if last is None:
        return stream.result.tokens, stream.result, 0, 0.0, 0.0
    return (stream.result.tokens, stream.result, tokens, last[0] - first[0],
            last[1] - first[1])


def _best(values: list[float]) -> float:
    """The fastest run (a busy machine only slows a run down)."""
    finite = [v for v in values if v == v]
    return max(finite) if finite else float("nan")


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 1) for v in values]


def run(ctx: BenchContext, batches: tuple[int, ...] | None = None) -> list[dict]:
    """The section's rows (module doc); ``batches`` replaces the batch sizes (tests)."""
    saved = model_module.CPU_FAST_PATH
    if not ctx.cuda:  # what generate runs on a CPU, also under the interpreter (module doc)
        model_module.CPU_FAST_PATH = "on"
    try:
        return _run(ctx, batches)
    finally:
        model_module.CPU_FAST_PATH = saved


def _run(ctx: BenchContext, batches: tuple[int, ...] | None) -> list[dict]:
    default_batches, max_new = _settings(ctx)
    batches = batches or default_batches
    model, label = _model(ctx)
    if model.heads is None:
        ctx.notes.append(f"{SECTION}: {label} has no Medusa heads: section skipped")
        return []
    demo = label == "demo"
    if ctx.tree is not None and not is_table_file(ctx.tree):
        fixed_label, fixed = tree_label(ctx.tree), ctx.tree  # used whole
    else:  # what generate uses without a policy: the device's default, cut to the model
        source = default_tree(model.device, model.model_dir)
        fixed_label = tree_label(source)
        fixed = fit_choices(load_tree(source), model.heads.num_heads, model.base.cfg.vocab_size)
    policy, policy_source = _policy(ctx, model, max_new, batches)
    eos = model.eos_token_id()
    dtype = str(model.dtype).removeprefix("torch.")
    # one CPU thread: also the process's CPU time, which other processes on a shared machine
    # do not inflate (the wall-clock figures they do)
    cpu_time = not ctx.cuda and torch.get_num_threads() == 1
    rows: list[dict] = []
    for B in batches:
        case = dict(model=label, B=B, max_new_tokens=max_new, dtype=dtype,
                    mode="graph" if ctx.cuda else "eager")
        if not case_wanted(ctx, case):
            continue
        prompts = _prompts(ctx, model, B, demo)
        for tree in [fixed, *policy.trees()]:  # warm-up: first calls, Triton compilation
            generate(model, prompts, max_new_tokens=4, eos_token_id=eos, tree=tree or None,
                     medusa=bool(tree))
        generate(model, prompts, max_new_tokens=max_new, eos_token_id=eos, tree="online")
        runs: dict[str, list] = {m: [] for m in MODES}
        for r in range(repeats(ctx, B)):  # in turns, each first in turn: drift hits all alike
            for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
                runs[mode].append(_decode(model, prompts, max_new, eos, mode, fixed, policy))
        by_mode = {}
        for mode in MODES:
            wall = [r[2] / r[3] if r[3] > 0 else float("nan") for r in runs[mode]]
            outs, result = runs[mode][0][:2]
            row = dict(section=SECTION, impl=mode, **case,
                       tree={"plain": "-", "fixed": fixed_label,
                             "adaptive": policy_label(policy), "online": "online"}[mode],
                       tokens=sum(len(t) for t in outs), steps=result.steps,
                       tokens_per_s=_best(wall), tokens_per_s_runs=_rounded(wall),
                       mean_accepted=result.mean_accepted,
                       trees={str(k): v for k, v in sorted(Counter(result.step_nodes).items())})
            if cpu_time:
                cpu = [r[2] / r[4] if r[4] > 0 else float("nan") for r in runs[mode]]
                row["tokens_per_cpu_s"], row["tokens_per_cpu_s_runs"] = _best(cpu), _rounded(cpu)
            by_mode[mode] = (row, outs)
            rows.append(row)
        plain_row, plain_outs = by_mode["plain"]
        for mode in ("fixed", "adaptive", "online"):
            row, outs = by_mode[mode]
            row["speedup"] = row["tokens_per_s"] / plain_row["tokens_per_s"]
            if cpu_time:
                row["cpu_speedup"] = row["tokens_per_cpu_s"] / plain_row["tokens_per_cpu_s"]
            row["identical"] = outs == plain_outs
            if row["identical"]:
                row["check"] = "ok"
            elif model.dtype in (torch.float32, torch.float64):
                row["check"] = f"FAIL: {mode} output differs from plain greedy"
            else:
                row["check"] = f"note: {mode} differs from plain ({dtype} rounding, near-tie)"
        adaptive, fixed_row = by_mode["adaptive"][0], by_mode["fixed"][0]
        # the policy verified the fixed tree at every step: the same work, so the two runs'
        # ratio is the machine's noise
        adaptive["same_work_as_fixed"] = \
            runs["adaptive"][0][1].step_trees == runs["fixed"][0][1].step_trees
        online = by_mode["online"][0]
        for key, ratio in (("tokens_per_s", "vs_best"), ("tokens_per_cpu_s", "cpu_vs_best")):
            if key in adaptive:
                for row in (adaptive, online):
                    row[ratio] = row[key] / max(plain_row[key], fixed_row[key])
        online["vs_table"] = online["tokens_per_s"] / adaptive["tokens_per_s"]
        if cpu_time:
            online["cpu_vs_table"] = online["tokens_per_cpu_s"] / adaptive["tokens_per_cpu_s"]
        if ctx.on_row is not None:
            for mode in MODES:
                ctx.on_row(by_mode[mode][0])
    ctx.notes.append(f"{SECTION}: fixed tree {fixed_label}; adaptive policy "
                     f"{policy_source}: " + ", ".join(
                         f"B={b}: {len(policy.choose(b)) + 1} nodes" for b in batches))
    return rows


def trace(batch: int = 16, max_new_tokens: int = 512, model=None) -> dict:
    """One greedy generation of ``batch`` demo prompts with the online policy (a fresh one):
    per step the rows computed, the tree's nodes (1: a plain step) and the tokens gained."""
    from medusa_kernels.decoding import online_policy
    from medusa_kernels.demo import load
    from medusa_kernels.demo import prompts as demo_prompts

    model = model or load()
    prompts = demo_prompts(model, n=batch)
    policy = online_policy(model)
    result = generate(model, prompts, max_new_tokens=max_new_tokens, tree=policy, eos_token_id=[])
    plain = generate(model, prompts, max_new_tokens=max_new_tokens, medusa=False,
                     eos_token_id=[])
    rows = [r for r, _, _ in policy.log]
    return {"batch": batch, "max_new_tokens": max_new_tokens, "steps": result.steps,
            "identical_to_plain": result.tokens == plain.tokens,
            "tokens_per_s": result.tokens_per_second, "plain_tokens_per_s":
            plain.tokens_per_second, "step_rows": rows, "step_nodes": result.step_nodes,
            "step_tokens": [sum(a) for a in result.accepted_per_step],
            "tree_steps": result.tree_steps, "torch_threads": torch.get_num_threads()}


def plot_trace(data: dict, path: str) -> str:
    """The PNG: the tree size chosen at each step (1 = a plain step), and the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    steps = range(1, len(data["step_nodes"]) + 1)
    ax.step(steps, data["step_nodes"], where="mid", color="C0", lw=1)
    ax.scatter(steps, data["step_nodes"], s=6, color="C0")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel("tree nodes (1 = plain step)", color="C0")
    other = ax.twinx()
    other.plot(steps, data["step_rows"], color="C1", lw=1)
    other.set_ylabel("rows computed", color="C1")
    other.set_ylim(0, data["batch"] * 1.05)
    ax.set_title(f"online tree policy, demo, B {data['batch']}, {data['max_new_tokens']} new "
                 f"tokens: {data['tokens_per_s']:.0f} tokens/s, plain "
                 f"{data['plain_tokens_per_s']:.0f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m medusa_kernels.bench.throughput",
                                description="the online policy's trace over a long generation")
    p.add_argument("--out", default="bench_out", help="output directory (created)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = trace(args.batch, args.max_new_tokens)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "online_trace.json"), "w") as f:
        json.dump(data, f)
    print(plot_trace(data, os.path.join(args.out, "online_trace.png")), data["tree_steps"],
          "identical" if data["identical_to_plain"] else "DIFFERS from plain")
    return 0 if data["identical_to_plain"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
