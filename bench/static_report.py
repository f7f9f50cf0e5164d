"""Static report: every Triton kernel configuration the launchers pick at the benchmark shapes,
compiled for sm_90 (and sm_80) on this machine, no GPU needed, read from the cubin.

    python bench/static_report.py                  # bench/results/<date>-static-sm90.{md,json}
    python bench/static_report.py --out DIR --archs 90,80 --tag before

Per configuration: registers, spills (local memory per thread), shared memory, CTAs per SM
(from the compiled metadata, ``ops._backend.occupancy``) against what the launcher assumed,
the headroom before that number drops, and the load / MMA instructions in the SASS. Per
benchmark case (the heads at d 4096, V 32000 / 128256, N 1-512: launched on meta tensors for an
H100's 132 SMs): the grid, the waves and, for the heads kernels, the bytes of weights in flight
per SM. Nothing here is measured: GPU timings are owed until a GPU runs the benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "python_tests"
sys.path.insert(0, str(TESTS))

import triton_aot  # noqa: E402

H100_SMS = 132
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
CONFIG_KEYS = ("GEMV", "BLOCK_N", "BLOCK_V", "BLOCK_D", "BLOCK_O", "BLOCK_I", "BLOCK_C", "TOPK",
               "STAGES", "SOFTCAP", "G", "HEAD_DIM", "BLOCK_M", "SPLIT", "PAGED", "MASK_PACKED",
               "A_PAD", "BLOCK")  # fmt: skip


def capture(path: str) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    subprocess.run([sys.executable, "gpu_shape_launches.py", path], cwd=TESTS, env=env,
                   check=True)
    with open(path) as f:
        return json.load(f)


def _dtype(spec: dict) -> str:
    if "signature" not in spec:
        return spec["dtype"]
    ptrs = [v[1:] for v in spec["signature"].values() if v.startswith("*fp") or v == "*bf16"]
    return ptrs[0] if ptrs else "-"


def _key(row: dict) -> str:
    """A configuration as the tables tell them apart (the JSON keeps no signatures)."""
    return json.dumps([row["kernel"], row["constexprs"], row["options"], _dtype(row),
                       row["arch"]], sort_keys=True)


def _config(spec: dict) -> str:
    c = spec["constexprs"]
    return " ".join(f"{k}={c[k]}" for k in CONFIG_KEYS if k in c)


def _headroom(regs: int, shared: int, warps: int, arch: int) -> tuple[int, int]:
    """Registers per thread and bytes of shared memory that can still grow before the CTAs per
    SM drop (255 / the per-CTA limit when nothing drops)."""
    from medusa_kernels.ops._backend import SM_LIMITS, occupancy

    occ = occupancy(regs, shared, warps, arch)
    r = regs
    while r < 255 and occupancy(r + 1, shared, warps, arch) >= occ:
        r += 1
    cap = SM_LIMITS[arch]["smem_cta"]
    lo, hi = shared, cap + 1  # largest shared with the same occupancy: binary search
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if occupancy(regs, mid, warps, arch) >= occ else (lo, mid)
    return r - regs, lo - shared


def bytes_in_flight_per_cta(row: dict) -> int | None:
    """Weight bytes a heads program has requested and not yet consumed at steady state: with
    cp.async (LDGSTS in the SASS) ``STAGES - 1`` tiles ahead; without, the one tile whose loads
    are all issued before the first use. None for kernels this does not model."""
    c, elsize = row["constexprs"], ELEMENT_BYTES.get(_dtype(row), 2)
    if row["kernel"] == "_vocab_topk_kernel":
        tile = c["BLOCK_V"] * c["BLOCK_D"] * elsize
    elif row["kernel"] == "_resblock_kernel":
        tile = c["BLOCK_O"] * c["BLOCK_I"] * elsize
    else:
        return None
    sass = row["sass"]
    pipelined = sass["LDGSTS.128 (cp.async 16 B)"] + sass["UTMALDG (TMA load)"] > 0
    stages = c.get("STAGES", row["options"].get("num_stages", 3))
    return tile * (stages - 1) if pipelined else tile


def _instructions(sass: dict) -> str:
    short = {"HGMMA (wgmma)": "HGMMA", "HMMA (mma.sync)": "HMMA", "UTMALDG (TMA load)": "TMA",
             "LDGSTS.128 (cp.async 16 B)": "LDGSTS.128", "LDGSTS <16 B": "LDGSTS<16B",
             "LDG.128": "LDG.128", "LDG <16 B": "LDG<16B", "LDSM": "LDSM", "STG": "STG",
             "LDL/STL (local: spills)": "LDL/STL"}  # fmt: skip
    return ", ".join(f"{short[k]} {sass[k]}" for k in triton_aot.SASS_CLASSES if sass.get(k))


def build(launches: list[dict], archs: tuple[int, ...]) -> list[dict]:
    results = triton_aot.compile_all(launches, archs)
    rows = []
    for launch in launches:
        for v in triton_aot.variants(launch):
            for arch in triton_aot.spec_archs(v, archs):
                r = results[triton_aot.spec_key(v), arch]
                row = {**v, **r}
                if not r["error"]:
                    row["headroom_regs"], row["headroom_shared"] = _headroom(
                        r["regs"], r["shared"], r["num_warps"], arch)
                    row["bytes_in_flight_per_cta"] = bytes_in_flight_per_cta(row)
                rows.append(row)
    return rows


def _config_table(rows: list[dict], arch: int) -> list[str]:
    out = [f"## Configurations, sm_{arch}", "",
           "| kernel | configuration | dtype | warps / stages | regs | spills (B) | shared (B) | "
           "CTAs/SM compiled | CTAs/SM launcher | headroom regs / shared (B) | SASS loads, MMA |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    seen, lines = set(), []
    for r in sorted(rows, key=lambda r: (r["kernel"], _config(r), _dtype(r))):
        key = _key(r)
        if r["arch"] != arch or key in seen:
            continue
        seen.add(key)
        opts = f"{r['options'].get('num_warps', '-')} / {r['options'].get('num_stages', '-')}"
        if r["error"]:
            lines.append(f"| {r['kernel']} | {_config(r)} | {_dtype(r)} | {opts} | FAILED: "
                         f"{r['error']} | | | | | | |")
            continue
        assumed = sorted({x["assumed_ctas_per_sm"] for x in rows
                          if _key(x) == key and x.get("assumed_ctas_per_sm") is not None})
        spills = r["stack"] + r["local"]
        lines.append(
            f"| {r['kernel']} | {_config(r)} | {_dtype(r)} | {opts} | {r['regs']} | "
            f"{spills} | {r['shared']} | {r['ctas_per_sm']} | "
            f"{', '.join(map(str, assumed)) or '-'} | {r['headroom_regs']} / "
            f"{r['headroom_shared']} | {_instructions(r['sass'])} |")
    return out + list(dict.fromkeys(lines)) + [""]  # specialisations that compile alike: once


def _case_table(rows: list[dict], arch: int) -> list[str]:
    out = [f"## Benchmark cases, sm_{arch} ({H100_SMS} SMs)", "",
           "| case | kernel | configuration | grid | CTAs | CTAs/SM | waves | "
           "weight bytes in flight per SM |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    seen = set()
    for r in rows:
        if r["arch"] != arch or not r.get("case") or r["error"]:
            continue
        if _dtype(r) == "fp16" and "bfloat16" in r["case"]:
            continue
        key = (r["case"], r["kernel"], json.dumps(r["grid"]))
        if key in seen:
            continue
        seen.add(key)
        ctas = 1
        for g in r["grid"]:
            ctas *= g
        slots = r["ctas_per_sm"] * H100_SMS
        waves = ctas / slots if slots else float("inf")
        per_cta = r.get("bytes_in_flight_per_cta")
        resident = min(r["ctas_per_sm"], -(-ctas // H100_SMS))
        flight = f"{per_cta * resident / 1024:.0f} KB" if per_cta else "-"
        out.append(f"| {r['case']} | {r['kernel']} | {_config(r)} | {tuple(r['grid'])} | {ctas} | "
                   f"{r['ctas_per_sm']} | {waves:.2f} | {flight} |")
    return out + [""]


def render(rows: list[dict], archs, meta: dict) -> str:
    lines = [f"# Static report: Triton kernels at the benchmark shapes ({meta['tag']})", "",
             f"Generated by `python bench/static_report.py` on {meta['date']}: commit "
             f"{meta['commit']}, Triton {meta['triton']}, ptxas of Triton's bundle "
             f"({meta['ptxas']}); {meta['note']}", "",
             "Read from the compiled cubins on a CPU machine; nothing here is measured (GPU "
             "timings are owed). CTAs/SM compiled: `ops._backend.occupancy` of the cubin's "
             "registers and Triton's shared memory (equal to CUDA's occupancy calculator); "
             "launcher: what the launcher assumed on the CPU for its grid (`-`: the grid does not "
             "depend on it). Headroom: registers per thread / bytes of shared memory the kernel "
             "can grow before CTAs/SM drop. SASS: static instruction counts in the whole kernel "
             "(prologue copies included), not per loop trip. Weight bytes in flight per SM "
             "(heads kernels only): tiles requested and not yet consumed per program (cp.async: "
             "stages - 1 tiles; plain loads: one tile) x resident programs. fp16 launches compile "
             "to the same configurations as their bf16 twins (listed in the tables, not in the "
             "cases).", ""]
    for arch in archs:
        lines += _config_table(rows, arch)
    lines += _case_table(rows, archs[0])
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--archs", default="90,80", help="first one names the files and the cases")
    ap.add_argument("--tag", default="", help="file name suffix and title note, e.g. before")
    ap.add_argument("--note", default="kernels and launchers of that commit.")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--rerender", metavar="JSON", help="render a recorded JSON again, no compile")
    ap.add_argument("--commit", help="the kernels' commit (default: git HEAD of the imported "
                    "medusa_kernels' checkout)")
    args = ap.parse_args(argv)
    import triton

    if args.rerender:
        with open(args.rerender) as f:
            recorded = json.load(f)
        meta, rows = recorded["meta"], recorded["rows"]
        _write(Path(args.out), Path(args.rerender).stem, rows, tuple(meta["archs"]), meta)
        return 0
    archs = tuple(int(a) for a in args.archs.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        launches = capture(os.path.join(tmp, "launches.json"))
    rows = build(launches, archs)
    import medusa_kernels

    commit = args.commit or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=Path(medusa_kernels.__file__).parents[1],
        capture_output=True, text=True).stdout.strip() or "unknown"
    ptxas = subprocess.run([triton_aot._nvidia_tool("ptxas"), "--version"], capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    meta = dict(date=args.date, commit=commit, triton=triton.__version__, ptxas=ptxas,
                tag=args.tag or "current", note=args.note, archs=list(archs))
    stem = f"{args.date}-static-sm{archs[0]}" + (f"-{args.tag}" if args.tag else "")
    _write(Path(args.out), stem, rows, archs, meta)
    failed = sum(1 for r in rows if r["error"])
    print(f"wrote {Path(args.out) / stem}.md/.json: {len(rows)} rows, {failed} failed compiles")
    return 1 if failed else 0


def _write(out: Path, stem: str, rows: list[dict], archs, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(render(rows, archs, meta) + "\n")
    keep = ("kernel", "constexprs", "options", "case", "grid", "assumed_ctas_per_sm", "arch",
            "error", "regs", "stack", "local", "shared", "num_warps", "ctas_per_sm",
            "headroom_regs", "headroom_shared", "bytes_in_flight_per_cta")
    slim = [dict({k: r[k] for k in keep if k in r}, dtype=_dtype(r),
                 sass={k: n for k, n in r.get("sass", {}).items() if n}) for r in rows]
    with open(out / f"{stem}.json", "w") as f:
        f.write('{"meta": ' + json.dumps(meta) + ', "rows": [\n')
        f.write(",\n".join(json.dumps(r, sort_keys=True) for r in slim) + "\n]}\n")


if __name__ == "__main__":
    sys.exit(main())
