"""Benchmark section: where one decode step's time goes, kernel by kernel (``step_profile``).

CUDA: the e2e section's random models (Vicuna-7B and Llama-3.2-1B shapes, ``ctx.dtype``), B 1,
L 1024, the default tree; one plain step and one Medusa step, each captured in a CUDA graph
and replayed ``REPS`` times under ``torch.profiler``. Per kernel (memcpy / memset included):
its name, ``launches`` per step, ``total_us`` per step and its ``share`` of the step's kernel
time; per step a "(all kernels)" row with the totals, the replay's median time (``step_us``,
timed apart from the profiler) and ``busy`` = kernel time / step time (the rest is idle gaps
between kernels). When the profiler sees no kernel inside the graph replays, the eager step is
profiled instead, with a note (``mode`` says which).
CPU: the tiny e2e model, fp32, L 64, eager steps; the profiler's CPU ops with their self time
(``unit`` "cpu op": what a CPU runs, not a GPU's kernels), so this code path is tested here.

Rows: the "(all ...)" row and the ``TOP`` largest entries per step (names cut to 90
characters); every entry, full names, goes to ``<stem>-profile.json`` and ``.md`` beside the
bench JSON (``ctx.out_dir``), so the next change can be planned from it without a GPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import torch

from medusa_kernels.model import ModelConfig
from medusa_kernels.tree import build_tree, resolve_choices

from ._common import BenchContext, case_wanted, cuda_usable, graphed, measure
from .e2e import SHAPES, _param_count, random_model, step_fns

SECTION = "step_profile"
REPS = 5  # profiled steps (graph replays) per step kind
TOP = 12  # entries per step in the bench's rows (all of them in the profile files)


def aggregate(events: Iterable[tuple[str, float]], reps: int) -> list[dict]:
    """Per-name totals of ``(name, microseconds)`` events over ``reps`` steps, largest first:
    ``{"kernel", "launches" (per step), "total_us" (per step), "share" (of the sum)}``."""
    table: dict[str, list[float]] = {}
    for name, us in events:
        entry = table.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    total = sum(us for _, us in table.values()) or 1.0
    out = [{"kernel": name, "launches": n / reps, "total_us": us / reps, "share": us / total}
           for name, (n, us) in table.items()]  # fmt: skip
    return sorted(out, key=lambda e: -e["total_us"])


def profiled_events(fn: Callable[[], object], reps: int, cuda: bool) -> list[tuple[str, float]]:
    """(name, us) of every GPU kernel, memcpy and memset ``reps`` calls of ``fn`` ran (CUDA), or
    of every CPU op with its self time (CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                if e.device_type == DeviceType.CUDA]  # fmt: skip
    return [(e.name, e.self_cpu_time_total) for e in prof.events()
            if e.device_type == DeviceType.CPU and not e.name.startswith("[")]  # fmt: skip


def _profile_one(ctx: BenchContext, case: dict, impl: str, fn) -> dict:
    """The profile of one step kind: its entries and totals (graph replay on CUDA)."""
    mode, unit = ("graph", "kernel") if ctx.cuda else ("eager", "cpu op")
    run = graphed(fn) if ctx.cuda else fn
    for _ in range(2):  # warm: first-call costs stay out of the profile
        run()
    events = profiled_events(run, REPS, ctx.cuda)
    if ctx.cuda and not events:  # the profiler saw nothing inside the replays
        ctx.notes.append(f"{SECTION}: no kernels seen in {impl}'s graph replays: the eager step "
                         "is profiled instead")  # fmt: skip
        mode, run = "eager", fn
        events = profiled_events(run, REPS, ctx.cuda)
    entries = aggregate(events, REPS)
    step_us = measure(run, ctx)[0]
    kernel_us = sum(e["total_us"] for e in entries)
    # busy: the kernels' share of a replay; CPU ops' self times carry the profiler's overhead
    busy = kernel_us / step_us if step_us and ctx.cuda else None
    return {"impl": impl, "mode": mode, "unit": unit, **case, "step_us": step_us,
            "kernel_us": kernel_us, "busy": busy,
            "launches": sum(e["launches"] for e in entries), "entries": entries}  # fmt: skip


def _rows(profile: dict) -> list[dict]:
    base = {"section": SECTION, "impl": profile["impl"], "mode": profile["mode"],
            **{k: profile[k] for k in ("model", "B", "L", "tree", "dtype")},
            "unit": profile["unit"]}  # fmt: skip
    what = "kernels" if profile["unit"] == "kernel" else "cpu ops, self time"
    rows = [{**base, "kernel": f"(all {what})", "launches": profile["launches"],
             "total_us": profile["kernel_us"], "share": 1.0, "step_us": profile["step_us"],
             "busy": profile["busy"]}]  # fmt: skip
    rows += [{**base, **e, "kernel": e["kernel"][:90]} for e in profile["entries"][:TOP]]
    return rows


def markdown(profiles: list[dict], meta: dict | None = None) -> str:
    """The profile files' Markdown: one table per step, every entry."""
    lines = ["# Decode-step profile", ""]
    if meta:
        lines += [f"{meta.get('device_name')} ({meta.get('device')}), {meta.get('date')}, "
                  f"torch {meta.get('torch')}, commit {(meta.get('commit') or '?')[:12]}", ""]
    for p in profiles:
        what = "kernels" if p["unit"] == "kernel" else "CPU ops (self time; a GPU lists kernels)"
        lines += [f"## {p['model']} {p['impl']} ({p['mode']}, B {p['B']}, L {p['L']}, tree "
                  f"{p['tree']}, {p['dtype']})", "",
                  f"{what}: {p['launches']:.0f} per step, {p['kernel_us']:.1f} us per step "
                  f"(profiled); the step takes {p['step_us']:.1f} us unprofiled"
                  + (f" (busy {p['busy']:.2f})" if p["busy"] is not None else ""), "",
                  "| kernel | launches | total us | share |", "| --- | --- | --- | --- |"]
        lines += [f"| `{e['kernel'].replace('|', '/')}` | {e['launches']:g} | "
                  f"{e['total_us']:.2f} | {e['share']:.3f} |" for e in p["entries"]]
        lines.append("")  # fmt: skip
    return "\n".join(lines)


def write_files(ctx: BenchContext, profiles: list[dict], meta: dict | None = None) -> list[str]:
    """``<stem>-profile.json`` and ``.md`` in ``ctx.out_dir`` (nothing without one)."""
    if not ctx.out_dir or not profiles:
        return []
    stem = os.path.join(ctx.out_dir, f"{ctx.stem or 'bench'}-profile")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "reps": REPS, "profiles": profiles}, f, indent=1)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(markdown(profiles, meta))
    return [stem + ".json", stem + ".md"]


def _model_profiles(ctx: BenchContext, name: str, L: int, B: int = 1) -> list[dict]:
    cfg = ModelConfig(**SHAPES[name])
    dtype = ctx.dtype if ctx.cuda else torch.float32
    choices = resolve_choices(ctx.tree)
    num_heads = max(max((len(p) for p in choices), default=0), 1)
    tree_name = os.path.basename(str(ctx.tree)) if ctx.tree is not None else "mc_sim_7b_63"
    case = dict(model=name, B=B, L=L, tree=tree_name, dtype=str(dtype).removeprefix("torch."))
    if not case_wanted(ctx, case):
        return []
    if ctx.cuda:
        need = (_param_count(cfg, num_heads) + 2 * cfg.num_layers * B * (L + 128)
                * cfg.num_kv_heads * cfg.head_dim) * torch.finfo(dtype).bits // 8 + (3 << 30)
        free = torch.cuda.mem_get_info(ctx.device)[0]
        if free < need:
            ctx.notes.append(f"{SECTION}: {name} skipped: needs ~{need / 2**30:.1f} GiB, "
                             f"{free / 2**30:.1f} GiB free")  # fmt: skip
            return []
    model = random_model(cfg, num_heads, dtype, ctx.device)
    tree = build_tree(choices, num_heads, None, model.device)
    plain, medusa = step_fns(model, [tree], B, L)
    with torch.inference_mode():
        return [_profile_one(ctx, case, impl, fn)
                for impl, fn in (("plain_step", plain), ("medusa_step", medusa))]  # fmt: skip


def run(ctx: BenchContext) -> list[dict]:
    models = (("llama-1b", 1024), ("vicuna-7b", 1024)) if ctx.cuda else (("tiny", 64),)
    profiles: list[dict] = []
    for name, L in models:
        try:
            profiles += _model_profiles(ctx, name, L)
        except Exception as e:  # on the GPU the other model still runs; the CPU raises
            if not ctx.cuda:
                raise
            ctx.notes.append(f"{SECTION}: {name} failed: {type(e).__name__}: {e}"[:400])
        if ctx.cuda and not cuda_usable(ctx):
            break
    for path in write_files(ctx, profiles, ctx.meta):
        ctx.notes.append(f"{SECTION}: wrote {path}")
    return [row for p in profiles for row in _rows(p)]
