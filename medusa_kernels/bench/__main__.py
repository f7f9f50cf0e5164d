"""``python -m medusa_kernels.bench``: every kernel against its peers, then the whole loop.

    python -m medusa_kernels.bench                   # everything, results in bench_out/
    python -m medusa_kernels.bench --quick           # fewer shapes (CI: a CPU, < 3 minutes)
    python -m medusa_kernels.bench --only tree_attention,compact_kv --shapes "L=4096 B=1"
    python -m medusa_kernels.bench --only e2e --model vicuna-7b/ --medusa medusa-vicuna-7b/

Sections: tree_attention, heads_topk, compact_kv, e2e, step_profile, throughput (in this
order). The copy bandwidth is measured first: each row's ``frac_floor`` is its minimum traffic
over that bandwidth divided by its median time; ``frac_roofline`` is the roofline (the larger of
that floor and the row's FLOPs at the GPU's dense bf16 peak) over its median. Rows a stated
target judges get a ``target`` cell (met / missed / too short to judge), summarised at the end.
A section that cannot be imported, raises, or whose kernel check fails is recorded as failed in
the JSON and the command exits with status 1 once everything has run; a missed target does not
change the exit status.
On the GPU a case, capture or peer that raises becomes a row ("FAIL: ..." for ours, "not run:
..." for a peer) and the other rows are kept; the JSON is rewritten after every section, so a
run stopped by a time limit keeps what it measured.

Without a CUDA GPU this is the CPU mode: TRITON_INTERPRET=1 is set (the command restarts itself
once when medusa_kernels was already imported without it), the Triton kernels are checked in
the interpreter at tiny shapes, the PyTorch paths are timed, and the bundled demo model is
decoded end to end. GPU numbers need a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
import traceback

import torch

from .._cli import exit_process
from .._dtypes import DTYPE_CHOICES, dtype_flag
from . import SECTIONS

_CHILD = "MEDUSA_KERNELS_BENCH_CHILD"  # set in the restarted process: never restart twice


def _sections(values: list[str] | None, parser: argparse.ArgumentParser) -> list[str]:
    if not values:
        return list(SECTIONS)
    wanted = {name.strip() for v in values for name in v.split(",") if name.strip()}
    unknown = sorted(wanted - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    return [s for s in SECTIONS if s in wanted]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m medusa_kernels.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="KERNEL",
        help=f"run only these sections (repeat or comma-separate): {list(SECTIONS)}",
    )
    p.add_argument(
        "--shapes",
        default=None,
        help='keep cases matching key=value words, e.g. "L=4096 B=1" or "model=tiny"',
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes and shorter timings")
    p.add_argument("--out", default="bench_out", help="output directory (created)")
    p.add_argument(
        "--dtype",
        type=dtype_flag,
        default=None,
        metavar="DTYPE",
        help=f"one of {DTYPE_CHOICES} (load_model's names); default bf16 on CUDA, fp32 on the CPU",
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="default cuda when available (cpu forces the CPU mode)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="e2e: a real base model dir (HF layout); default the bundled demo model",
    )
    p.add_argument("--medusa", default=None, help="e2e: its Medusa heads dir")
    p.add_argument("--tree", default=None, help="e2e: tree name or JSON file (mc_sim_7b_63)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (CPU mode default 1: the shapes are tiny, and one "
        "thread keeps timings steady on a busy machine)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak in TFLOP/s, for the roofline (default: the "
        "datasheet figure of a known GPU; none on a CPU)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error(f"--peak-tflops: expected a positive number of TFLOP/s, got {args.peak_tflops}")
    args.sections = _sections(args.only, p)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def import_seconds(module: str, runs: int = 1) -> float | None:
    """Seconds ``import module`` takes in a fresh interpreter: ``python -X importtime -c
    "import module"``'s cumulative figure on the module's own line, the median of ``runs``
    fresh interpreters (the README's figure is measured so), or None when it cannot be
    measured."""
    cmd = [sys.executable, "-X", "importtime", "-c", f"import {module}"]
    seconds = []
    for _ in range(runs):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            return None
        for line in reversed(out.stderr.splitlines()):  # the outermost import is reported last
            parts = line.split("|")
            if len(parts) == 3 and parts[2].strip() == module:
                seconds.append(int(parts[1]) / 1e6)
                break
        else:
            return None
    return sorted(seconds)[(len(seconds) - 1) // 2]


def _check_paths(args: argparse.Namespace) -> str | None:
    """One line naming a --model/--medusa/--tree path that is not there, or None."""
    from medusa_kernels.tree import TREES

    for flag, path in (("--model", args.model), ("--medusa", args.medusa)):
        if path is not None and not os.path.isdir(path):
            return f"{flag} {path}: no such directory"
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        return f"--model {args.model}: no config.json in it (an HF model directory is expected)"
    if args.tree is not None and args.tree not in TREES and not os.path.isfile(args.tree):
        return f"--tree {args.tree!r}: neither a known tree {sorted(TREES)} nor a file"
    return None


def _interpreter_ready(device: torch.device) -> bool | None:
    """CPU mode: make Triton kernels run in the interpreter. Returns False when the process
    must restart for it (the kernels were already decorated without TRITON_INTERPRET=1)."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return True
    from medusa_kernels.ops._backend import HAS_TRITON

    if not HAS_TRITON:
        return None  # nothing to interpret: checks report "not run"
    os.environ["TRITON_INTERPRET"] = "1"
    already = any(m.startswith("medusa_kernels.ops") for m in sys.modules)
    return not already or os.environ.get(_CHILD) == "1"


class _Progress:
    """A bar over the sections whose text follows the rows as they come (rich, else tqdm)."""

    def __init__(self, total: int, console):
        self.rows = 0
        self._rich = console is not None
        if self._rich:
            from rich import progress as rp

            columns = (rp.TextColumn("[bold]{task.description}"), rp.BarColumn(),
                       rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                       rp.TextColumn("{task.fields[case]}"))  # fmt: skip
            # a live bar only on a terminal; logs (CI) get the one line per section below
            self.bar = rp.Progress(*columns, console=console, disable=not console.is_terminal)
            self.task = self.bar.add_task("bench", total=total, case="")
        else:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="section", file=sys.stderr)

    def __enter__(self):
        if self._rich:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self._rich:
            self.bar.stop()
        else:
            self.bar.close()

    def section(self, name: str) -> None:
        if self._rich:
            self.bar.update(self.task, description=name, case="")
        else:
            self.bar.set_description(name)

    def row(self, row: dict) -> None:
        from .report import case_label

        self.rows += 1
        text = f"{row.get('impl')} {row.get('mode', '')} {case_label(row)}"[:60]
        if self._rich:
            self.bar.update(self.task, case=f"{self.rows} rows, {text}")
        else:
            self.bar.set_postfix_str(text)

    def done(self, line: str) -> None:
        if self._rich:
            self.bar.console.print(line, highlight=False, markup=False)
            self.bar.advance(self.task)
        else:
            self.bar.write(line)
            self.bar.update()


def _console():
    try:
        from rich.console import Console
    except ImportError:
        return None
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))


def _run_section(name: str, ctx) -> dict:
    from .report import check_problems

    start = time.perf_counter()
    out: dict = {"status": "ok", "rows": []}
    try:
        module = importlib.import_module(f"medusa_kernels.bench.{name}")
        out["rows"] = list(module.run(ctx))
        problems = check_problems(out["rows"])
        if problems:
            out["status"] = f"check failed: {len(problems)} row(s)"
            out["problems"] = problems
    except Exception as e:  # recorded; the run goes on and exits non-zero at the end
        out["status"] = f"error: {type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    if ctx.cuda:
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError as e:  # a sticky CUDA error: later sections will report it too
            out["status"] = f"error: {type(e).__name__}: {e}"
    out["seconds"] = time.perf_counter() - start
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    bad = _check_paths(args)
    rank = int(os.environ.get("RANK", "0")) if os.environ.get("WORLD_SIZE", "1") != "1" else 0
    if bad is None and os.environ.get("WORLD_SIZE", "1") != "1" and args.sections != ["e2e"]:
        bad = "under torchrun (tensor parallelism) only --only e2e runs"
    if rank:  # torchrun: rank 0 reports; the others write their JSON to OUT/rank<r>, quietly
        args.out, sys.stdout = os.path.join(args.out, f"rank{rank}"), open(os.devnull, "w")
    if bad is not None:  # one line, before anything runs (under torchrun: rank 0's)
        if not rank:
            print(f"python -m medusa_kernels.bench: error: {bad}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and os.environ.get("WORLD_SIZE", "1") != "1":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
    ready = _interpreter_ready(device)
    if ready is False:  # restart with TRITON_INTERPRET=1 in place before any kernel import
        env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD: "1"})
        cmd = [sys.executable, "-m", "medusa_kernels.bench", *argv]
        return subprocess.call(cmd, env=env)

    from . import report, targets
    from ._common import BenchContext, copy_bandwidth_gbps, peak_bf16_tflops

    t0 = time.perf_counter()
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(max(args.threads or 1, 1))
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)  # fmt: skip
    ctx = BenchContext(device=device, dtype=dtype, quick=args.quick, shapes=args.shapes,
                       model_dir=args.model, medusa_dir=args.medusa, tree=args.tree)  # fmt: skip
    console = _console()

    def say(text: str, markup: bool = True) -> None:
        if console is None:
            print(text, flush=True)
        else:
            console.print(text, highlight=False, markup=markup)

    meta = report.metadata(device, dtype, args.quick, argv)
    meta["sections"] = args.sections
    known = peak_bf16_tflops(meta["device_name"]) if device.type == "cuda" else None
    if args.peak_tflops is not None:
        known = (args.peak_tflops, "--peak-tflops")
    meta["peak_bf16_tflops"], meta["peak_source"] = known or (None, None)
    ctx.peak_tflops, ctx.meta = meta["peak_bf16_tflops"], meta
    # start-up cost: the package alone (lazy: no torch, no Triton; the median of 5 runs, as the
    # README's figure) and the decoding stack (one run: it imports torch, about 1 s)
    for module, runs in (("medusa_kernels", 5), ("medusa_kernels.decoding", 1)):
        meta[f"import_{module.replace('.', '_')}_s"] = import_seconds(module, runs)
    say(f"medusa_kernels bench on {meta['device_name']} ({device.type}, {meta['dtype']}), "
        f"torch {meta['torch']}, triton {meta['triton']}", markup=False)  # fmt: skip
    if device.type != "cuda":
        say(f"[yellow]{report.CPU_NOTE}[/yellow]" if console else report.CPU_NOTE)
        if ready is None:
            ctx.notes.append("triton is not installed: Triton kernel checks not run")

    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        ctx.notes.append("TRITON_INTERPRET=1 on a GPU: Triton rows time the interpreter")
        say("[bold red]TRITON_INTERPRET=1 is set: Triton timings are the interpreter's[/]")
    ctx.copy_gbps = copy_bandwidth_gbps(ctx)
    say(f"copy bandwidth {ctx.copy_gbps:.1f} GB/s (the floor of every frac_floor)")
    say(report.peak_line({"meta": meta, "copy_gbps": ctx.copy_gbps}), markup=False)
    sections: dict[str, dict] = {}
    # the JSON so far after every row and section: a run stopped by a time limit keeps what it
    # measured
    os.makedirs(args.out, exist_ok=True)
    ctx.out_dir, ctx.stem = args.out, report.result_stem(meta)
    partial_path = os.path.join(args.out, ctx.stem + ".json")

    def write_partial(running: dict | None = None) -> None:
        partial = {"meta": meta, "copy_gbps": ctx.copy_gbps,
                   "sections": {**sections, **(running or {})}, "notes": ctx.notes,
                   "status": f"partial: {len(sections)} of {len(args.sections)} sections"}
        partial["targets"] = targets.summary(partial)
        report.write_json(partial_path, partial)  # fmt: skip

    with _Progress(len(args.sections), console) as progress:
        for name in args.sections:
            progress.section(name)
            live: list[dict] = []

            def on_row(row: dict, name=name, live=live) -> None:
                progress.row(row)
                live.append(row)
                # a run stopped by a time limit mid-section keeps these rows
                write_partial({name: {"status": "stopped mid-section", "rows": live}})

            ctx.on_row = on_row
            sections[name] = _run_section(name, ctx)
            sec = sections[name]
            judged = targets.judge(name, sec["rows"], device.type)
            verdicts = f"; targets: {report.tally(judged)}" if judged else ""
            progress.done(f"{name}: {sec['status']}, {len(sec['rows'])} rows, "
                          f"{sec['seconds']:.1f} s{verdicts}")  # fmt: skip
            write_partial()
    ctx.on_row = None

    failed = [n for n, s in sections.items() if s["status"] != "ok"]
    meta["seconds"] = time.perf_counter() - t0
    result = {
        "meta": meta,
        "copy_gbps": ctx.copy_gbps,
        "sections": sections,
        "notes": ctx.notes,
        "status": "failed" if failed else "ok",
    }
    result["targets"] = targets.summary(result)
    report.print_tables(result, console)
    paths = report.write_all(result, args.out, make_plot=not args.no_plot)
    for kind, path in paths.items():
        say(f"wrote {kind}: {path}", markup=False)
    for name in failed:
        sec = sections[name]
        say(f"FAILED {name}: {sec['status']}", markup=False)
        for problem in sec.get("problems", [])[:10]:
            say(f"  {problem}", markup=False)
    if device.type != "cuda":
        say("CPU mode: these are CPU times at tiny shapes. GPU numbers need a GPU.")
    say(f"done in {meta['seconds']:.1f} s: " + ("all sections ok" if not failed else
        f"{len(failed)} section(s) failed: {', '.join(failed)}") +
        f"; targets: {report.tally(result['targets'])}", markup=False)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    exit_process(main())
