"""Reporting for ``python -m medusa_kernels.bench``: metadata, terminal table, JSON, Markdown and
the PNG plot (time vs context length per kernel, with the bandwidth floor).

A run's result (what ``write_json`` writes)::

    {"meta": {...device, dtype, versions, commit, date, argv...}, "copy_gbps": float,
     "sections": {name: {"status": "ok" | "error: ..." | "check failed: ...", "seconds": s,
                         "rows": [row, ...]}},
     "notes": [...], "status": "ok" | "failed"}

Rows are flat dicts (see ``_common.timed_row``). Their keys are sorted into labels (``impl``,
``mode``), case parameters (ints and strings: ``L``, ``B``, ``dtype``...) and results
(measurements, checks: floats, dicts, booleans, ``check*``/``max_err*`` and ``RESULT_KEYS``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Sequence

LABEL_KEYS = ("impl", "mode")
RESULT_KEYS = {
    "median_us", "p20_us", "p80_us", "gbps", "floor_us", "frac_floor", "tokens", "steps",
    "tokens_per_s", "us_per_token", "mean_accepted", "accept_hist", "speedup", "identical",
    "ratio_vs_plain", "flops", "intensity", "tflops", "roofline_us", "frac_roofline", "bound",
    "target", "launches", "total_us", "share",
}  # fmt: skip
# p20/p80 are shown as one column; the generated text sample goes to the notes; the FLOPs are
# in the JSON (the table shows FLOP per byte and TFLOP/s)
HIDDEN_IN_TABLE = {"section", "floor_us", "p20_us", "p80_us", "sample", "flops"}
# results shown first (the rest follow in the order the rows carry them), so the first of the
# narrow tables a terminal gets holds the verdicts
FIRST_RESULTS = ("median_us", "p20-p80", "tokens_per_s", "speedup", "cpu_speedup", "vs_best",
                 "cpu_vs_best", "ratio_vs_plain", "frac_floor", "frac_roofline", "target",
                 "check")
CONTEXT_KEYS = ("L", "context_len")  # the x axis of the plot
CPU_NOTE = (
    "No CUDA GPU: CPU mode. Tiny shapes; every Triton kernel is checked in the Triton "
    "interpreter against its reference (not timed), the times are the PyTorch paths on this "
    "CPU, and the end-to-end part decodes the bundled demo model. GPU numbers need a GPU: run "
    "`python -m medusa_kernels.bench` on a CUDA machine."
)


# --- row keys ------------------------------------------------------------------------------


def is_result_key(key: str, value: object) -> bool:
    if key in RESULT_KEYS or key.startswith(("check", "max_err")):
        return True
    return isinstance(value, (float, dict, list, bool)) or value is None


def case_keys(rows: Iterable[dict]) -> list[str]:
    """Case parameter keys over ``rows`` in first-seen order (no labels, no results)."""
    keys: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k != "section" and k not in LABEL_KEYS and not is_result_key(k, v):
                keys.setdefault(k)
    return list(keys)


def result_keys(rows: Iterable[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k != "section" and k not in LABEL_KEYS and is_result_key(k, v):
                keys.setdefault(k)
    return list(keys)


def check_problems(rows: Iterable[dict]) -> list[str]:
    """Rows whose ``check*`` fields are neither "ok" nor a "not run"/"skipped"/"note" remark."""
    problems = []
    for row in rows:
        for k, v in row.items():
            if k.startswith("check") and isinstance(v, str):
                if v != "ok" and not v.startswith(("not run", "skipped", "note")):
                    problems.append(f"{row.get('impl')} {case_label(row)}: {k} = {v}")
    return problems


def case_label(row: dict, skip: Sequence[str] = ()) -> str:
    keys = case_keys([row])
    return " ".join(f"{k}={row[k]}" for k in keys if k not in skip)


# --- values --------------------------------------------------------------------------------


def jsonable(obj):
    """``obj`` with NaN/inf as None and torch/numpy scalars and dtypes as plain values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors, numpy scalars
        return jsonable(obj.item())
    return str(obj)


def fmt(value: object) -> str:
    """A table cell: about 4 significant digits, None as a dash, dicts as ``k:v`` pairs."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if abs(value) >= 1e4:
            return f"{value:.0f}"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


HEADERS = {
    "median_us": "median us", "gbps": "GB/s", "frac_floor": "of floor", "max_err": "max err",
    "ratio_vs_plain": "x plain", "tokens_per_s": "tok/s", "us_per_token": "us/tok",
    "mean_accepted": "accepted", "accept_hist": "accepted: steps", "roofline_us": "roofline us",
    "frac_roofline": "of roofline", "intensity": "FLOP/B", "tflops": "TFLOP/s",
    "total_us": "total us", "share": "share",
}  # fmt: skip


def table_columns(rows: Sequence[dict]) -> tuple[list[str], str]:
    """(columns, caption) for a table of ``rows``: case keys with one value across all rows
    go to the caption (``key=value`` words), results stay columns."""
    cases = [k for k in case_keys(rows) if k not in HIDDEN_IN_TABLE]
    constant = [k for k in cases if len({str(r.get(k)) for r in rows}) == 1]
    cols = [k for k in LABEL_KEYS if any(k in r for r in rows)]
    cols += [k for k in cases if k not in constant]
    results = [k for k in result_keys(rows) if k not in HIDDEN_IN_TABLE]
    results = [k for k in results if any(r.get(k) is not None for r in rows)]
    if "median_us" in results and any(r.get("p20_us") is not None for r in rows):
        results.insert(results.index("median_us") + 1, "p20-p80")
    first = [k for k in FIRST_RESULTS if k in results]
    results = first + [k for k in results if k not in first]
    caption = " ".join(f"{k}={rows[0].get(k)}" for k in constant)
    return cols + results, caption


CELL_CAP = 32  # a terminal cell folds past this width


def split_columns(cols: Sequence[str], rows: Sequence[dict], width: int) -> list[list[str]]:
    """``cols`` as one or more column lists whose tables fit ``width`` terminal characters:
    each repeats the identifying columns (labels and varying case keys), the results go, in
    order, each to the first table with room (so the first holds the verdicts). Widths as rich
    draws a table without edges: each column's widest cell (at most ``CELL_CAP``) and 3
    characters between columns."""
    ident = set(LABEL_KEYS) | set(case_keys(rows))
    keys = [c for c in cols if c in ident]
    results = [c for c in cols if c not in ident]

    def w(c: str) -> int:
        cells = [len(header(c))] + [len(cell(r, c)) for r in rows]
        return min(max(cells), max(CELL_CAP, len(header(c)))) + 3

    room = width - (sum(w(c) for c in keys) - 3)
    parts: list[list[str]] = []
    left: list[int] = []
    for c in results:  # first fit: each column into the first table with room, in order
        i = next((i for i, n in enumerate(left) if w(c) <= n), None)
        if i is None:
            parts.append([])
            left.append(room)
            i = len(parts) - 1
        parts[i].append(c)
        left[i] -= w(c)
    return [keys + part for part in parts]


def header(col: str) -> str:
    return HEADERS.get(col, col)


def cell(row: dict, col: str) -> str:
    if col == "p20-p80":
        if row.get("p20_us") is None:
            return "-"
        return f"{fmt(row['p20_us'])}-{fmt(row.get('p80_us'))}"
    return fmt(row.get(col))


def row_tables(rows: Sequence[dict]) -> list[list[dict]]:
    """A section's rows as tables: the timed rows (with ``median_us``), then the others grouped
    by their case keys (e.g. generation rows apart from decode rows), in first-seen order."""
    timed = [r for r in rows if "median_us" in r]
    other: dict[tuple[str, ...], list[dict]] = {}
    for r in rows:
        if "median_us" not in r:
            keys = tuple(sorted(k for k in case_keys([r]) if k not in HIDDEN_IN_TABLE))
            other.setdefault(keys, []).append(r)
    return [t for t in (timed, *other.values()) if t]


def tally(records: Iterable[dict]) -> str:
    """"3 met, 2 missed, 1 too short to judge, 4 not measured" for target records (``targets``
    module; the kinds present)."""
    counts: dict[str, int] = {}
    for r in records:
        kind = "met" if r["met"] else "missed" if r["met"] is False else (
            r["verdict"].split(":")[0])  # fmt: skip
        counts[kind] = counts.get(kind, 0) + 1
    order = ("met", "missed", "too short to judge", "no value", "not measured")
    return ", ".join(f"{counts[k]} {k}" for k in order if k in counts) or "none apply"


# --- metadata ------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                             timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def metadata(device, dtype, quick: bool, argv: Sequence[str]) -> dict:
    """Device, versions, commit, date and the command line of this run."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from medusa_kernels import __version__
    from medusa_kernels.ops._backend import cuda_extension, triton_interpreted

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": cpu_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": quick,
        "argv": list(argv),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "medusa_kernels": __version__,
        "cuda_extension": cuda_extension() is not None,
        "triton_interpret": triton_interpreted(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None,
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    if os.environ.get("MEDUSA_KERNELS_COMMIT"):
        # a copy of the tree sent to the lent GPU machine: its .git (if any) may be stale, so
        # the commit typed in there wins
        meta["commit"], meta["dirty"] = os.environ["MEDUSA_KERNELS_COMMIT"], None
    elif meta["commit"] and status is not None:
        meta["dirty"] = bool(status)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["device_name"] = props.name
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["capability"] = f"{props.major}.{props.minor}"
    else:
        meta["note"] = CPU_NOTE
    return meta


def result_stem(meta: dict) -> str:
    """``<date>-<device>[-quick]``, e.g. ``2025-01-31-nvidia-h100-80gb-hbm3``."""
    name = "cpu" if meta["device"] != "cuda" else meta["device_name"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or meta["device"]
    return f"{meta['date'][:10]}-{slug}" + ("-quick" if meta.get("quick") else "")


# --- outputs -------------------------------------------------------------------------------


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(jsonable(result), f, indent=1, allow_nan=False)
        f.write("\n")


def peak_line(result: dict) -> str:
    """The roofline's figures: the peak, its source and the ridge (peak / copy bandwidth)."""
    meta = result["meta"]
    peak, gbps = meta.get("peak_bf16_tflops"), result.get("copy_gbps")
    if not peak:
        return (f"No dense bf16 peak known for {meta.get('device_name')}: no roofline "
                "(`roofline_us` = max(bytes floor, FLOPs / peak) needs one; `--peak-tflops`).")
    ridge = f", ridge {peak * 1e3 / gbps:.0f} FLOP/B" if gbps else ""
    return (f"Roofline: dense bf16 peak {peak:g} TFLOP/s ({meta.get('peak_source')}){ridge}; "
            "`roofline_us` = max(bytes floor, FLOPs / peak).")


def markdown(result: dict) -> str:
    """The run as Markdown: metadata, one table per section, notes."""
    meta = result["meta"]
    commit = (meta.get("commit") or "unknown")[:12] + (" (dirty)" if meta.get("dirty") else "")
    lines = [
        f"# medusa_kernels bench: {meta['device_name']} ({meta['device']}), {meta['date']}",
        "",
        f"dtype {meta.get('dtype')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
        f"CUDA {meta.get('cuda')}, commit {commit}, quick {meta.get('quick')}; copy bandwidth "
        f"{fmt(result.get('copy_gbps'))} GB/s (the floor of every `frac_floor`).",
        "",
        peak_line(result),
        "",
    ]
    if meta.get("note"):
        lines += [f"> {meta['note']}", ""]
    for name, sec in result["sections"].items():
        lines += [f"## {name}: {sec['status']} ({sec.get('seconds', 0):.1f} s)", ""]
        for rows in row_tables(sec["rows"]):
            cols, caption = table_columns(rows)
            if caption:
                lines += [caption, ""]
            lines.append("| " + " | ".join(header(c) for c in cols) + " |")
            lines.append("|" + " --- |" * len(cols))
            lines += ["| " + " | ".join(cell(r, c).replace("|", "\\|") for c in cols) + " |"
                      for r in rows]  # fmt: skip
            lines.append("")
    records = result.get("targets") or []
    if records:
        lines += [f"## Targets: {tally(records)}", "", "| target | row | verdict |",
                  "| --- | --- | --- |"]  # fmt: skip
        lines += [f"| {r['target']} ({r['source']}) | {r['row']} | {r['verdict']} |"
                  for r in records]  # fmt: skip
        lines.append("")
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def print_tables(result: dict, console=None) -> None:
    """One rich table per section (plain Markdown when rich is not installed)."""
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(markdown(result))
        return
    if console is None:
        console = Console()
    if not console.is_terminal:  # CI logs: wide lines beat wrapped cells
        console = Console(width=max(console.width, 160))
    for name, sec in result["sections"].items():
        style = "green" if sec["status"] == "ok" else "bold red"
        console.print(f"[bold]{name}[/bold]: [{style}]{sec['status']}[/{style}] "
                      f"({sec.get('seconds', 0):.1f} s)", highlight=False)  # fmt: skip
        for rows in row_tables(sec["rows"]):
            cols, caption = table_columns(rows)
            parts = split_columns(cols, rows, console.width)
            for i, part in enumerate(parts):
                title = caption + (f" ({i + 1} of {len(parts)})" if len(parts) > 1 else "")
                table = Table(show_edge=False, pad_edge=False, header_style="bold",
                              title=title.strip() or None, title_justify="left")  # fmt: skip
                for c in part:
                    text = (c in LABEL_KEYS or c in ("dtype", "accept_hist", "target", "kernel")
                            or c.startswith("check"))  # fmt: skip
                    table.add_column(header(c), justify="left" if text else "right",
                                     overflow="fold", max_width=max(CELL_CAP, len(header(c))))
                for r in rows:
                    table.add_row(*(cell(r, c) for c in part))
                console.print(table)
    records = result.get("targets") or []
    if records:
        console.print(f"[bold]targets[/bold]: {tally(records)}", highlight=False)
        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        for c in ("target", "row", "verdict"):
            table.add_column(c, overflow="fold")
        for r in records:
            style = "green" if r["met"] else "red" if r["met"] is False else "yellow"
            table.add_row(r["target"], r["row"], Text(r["verdict"], style=style))
        console.print(table)
    for n in result.get("notes", []):
        console.print(f"note: {n}", highlight=False)


def plot_groups(rows: Iterable[dict]) -> dict[str, dict]:
    """Rows with a context length and a median time, grouped for the plot.

    Returns ``{title: {"lines": {label: [(L, median, p20, p80), ...]}, "floor": [(L, us)]}}``:
    one panel per section and case (every case key but the context length), one line per
    implementation (and mode), the floor the smallest ``roofline_us`` (else ``floor_us``) at
    each L (``"roofline"``: whether any row had one).
    """
    groups: dict[str, dict] = {}
    for row in rows:
        ctx_key = next((k for k in CONTEXT_KEYS if isinstance(row.get(k), int)), None)
        if ctx_key is None or row.get("median_us") is None:
            continue
        title = f"{row.get('section', '')} {case_label(row, skip=(ctx_key,))}".strip()
        group = groups.setdefault(title, {"lines": {}, "floor": {}, "x": ctx_key})
        label = "/".join(str(row[k]) for k in LABEL_KEYS if row.get(k) is not None)
        x = row[ctx_key]
        group["lines"].setdefault(label, []).append(
            (x, row["median_us"], row.get("p20_us"), row.get("p80_us"))
        )
        limit = row.get("roofline_us") or row.get("floor_us")  # the roofline where known
        if limit:
            group["floor"][x] = min(group["floor"].get(x, math.inf), limit)
            group["roofline"] = group.get("roofline", False) or bool(row.get("roofline_us"))
    for group in groups.values():
        for points in group["lines"].values():
            points.sort()
        group["floor"] = sorted(group["floor"].items())
    return groups


def plot(result: dict, path: str, max_panels: int = 16) -> str:
    """Write the PNG: median time vs context length per implementation (p20-p80 band) with the
    roofline (or, without a peak, the bandwidth floor) dashed; a bar chart of every median when
    no row has a context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for sec in result["sections"].values() for r in sec["rows"]]
    groups = plot_groups(rows)
    meta = result["meta"]
    suptitle = (
        f"medusa_kernels bench: {meta['device_name']}, {meta['dtype']}, "
        f"{meta['date'][:10]}, copy {fmt(result.get('copy_gbps'))} GB/s"
    )
    if not groups:
        timed = [r for r in rows if r.get("median_us")][:60]
        fig, ax = plt.subplots(figsize=(10, 0.3 * len(timed) + 1.5))
        labels = [f"{r['section']} {r['impl']} {case_label(r)}"[:70] for r in timed]
        ax.barh(range(len(timed)), [r["median_us"] for r in timed])
        ax.set_yticks(range(len(timed)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("median time (us)")
        ax.invert_yaxis()
        if not timed:
            ax.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=ax.transAxes)
    else:
        titles = list(groups)[:max_panels]
        ncols = min(3, len(titles))
        nrows = math.ceil(len(titles) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
        for ax, title in zip(axes.flat, titles, strict=False):
            group = groups[title]
            xs_all = set()
            for label, points in group["lines"].items():
                xs = [p[0] for p in points]
                xs_all.update(xs)
                ax.plot(xs, [p[1] for p in points], marker="o", label=label)
                if all(p[2] is not None and p[3] is not None for p in points):
                    ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points],
                                    alpha=0.2)  # fmt: skip
            if group["floor"]:
                fx, fy = zip(*group["floor"], strict=True)
                ax.plot(fx, fy, "k--", marker="_", markersize=14,
                        label="roofline" if group.get("roofline") else "bandwidth floor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sorted(xs_all), [str(x) for x in sorted(xs_all)])
            ax.set_xlabel(f"context length {group['x']}")
            ax.set_ylabel("median time (us)")
            ax.set_title(title, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(titles) :]:
            ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(result: dict, out_dir: str, make_plot: bool = True,
              name: str | None = None) -> dict[str, str]:
    """JSON, Markdown and (unless ``make_plot`` is False) PNG in ``out_dir``, named ``name`` (by
    default ``result_stem``): their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name or result_stem(result["meta"]))
    paths = {"json": stem + ".json", "md": stem + ".md"}
    if make_plot:
        try:
            paths["png"] = plot(result, stem + ".png")
        except ImportError as e:
            result["notes"].append(f"no plot: {e} (pip install matplotlib)")
        except Exception as e:  # a broken plot must not lose the numbers
            result["notes"].append(f"plot failed: {type(e).__name__}: {e}")
    write_json(paths["json"], result)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    return paths


def main(argv=None) -> int:
    """``python -m medusa_kernels.bench.report RESULT.json``: the tables again, and the Markdown
    and PNG beside the JSON (rewritten as read, plus any plot note), e.g. from the partial JSON
    of a run stopped by a time limit."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m medusa_kernels.bench.report",
                                description=main.__doc__)
    p.add_argument("json", help="a result JSON written by python -m medusa_kernels.bench")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    for key in ("meta", "sections"):
        if key not in result:
            raise SystemExit(f"{args.json}: not a bench result (no {key!r})")
    result.setdefault("notes", [])
    print_tables(result)
    out_dir, name = os.path.split(os.path.splitext(args.json)[0])
    written = write_all(result, out_dir or ".", make_plot=not args.no_plot, name=name)
    written = [path for kind, path in written.items() if kind != "json"]
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
