"""The bench's arithmetic and reporting, without running a bench: the roofline (issue 26), the
targets' verdicts and the narrow terminal tables (issue 23), the step profile (issue 22)."""

from __future__ import annotations

import io
import json
import math
import os

import pytest
import torch

from medusa_kernels.bench import _common, report, step_profile, targets
from medusa_kernels.bench.tree_attention import _bytes, _flops
from medusa_kernels.tree import TREES, build_tree

H200_COPY_GBPS = 4246.0  # the copy bandwidth the 2026-11-30 H200 run measured


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.05),
    ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("AMD EPYC 7B13", None),
    ("NVIDIA GeForce RTX 4090", None)])  # fmt: skip
def test_peak_table(name, peak):
    got = _common.peak_bf16_tflops(name)
    assert (got and got[0]) == peak
    if got:
        assert "datasheet" in got[1]


def test_roofline_of_tree_attention_at_hkv8_is_compute_bound():
    """Issue 26's figures: T 64, Hkv 8, L 16k on an H200 is 256 FLOP per KV byte, above the
    ridge (about 233): the roofline is the tensor-core time (about 17.4 us), not the bytes
    (about 16 us), and the 52 us measured on 2026-11-30 is about 0.33 of it."""
    mask = build_tree(TREES["mc_sim_7b_63"]).tree_mask
    B, L, T, Hq, D = 1, 16384, 64, 32, 128
    peak = _common.peak_bf16_tflops("NVIDIA H200")[0]
    assert peak * 1e3 / H200_COPY_GBPS == pytest.approx(233, abs=1)  # the ridge, FLOP/B
    hkv8 = _common.roofline(_bytes(B, L, T, Hq, 8, D, 2), _flops(B, L, Hq, D, mask),
                            H200_COPY_GBPS, peak, median_us=52.0)  # fmt: skip
    kv_bytes = 2 * B * L * 8 * D * 2
    assert 4 * B * Hq * D * T * L / kv_bytes == 256  # the prefix's FLOP per KV byte
    assert hkv8["bound"] == "compute" and hkv8["intensity"] > 233
    assert hkv8["floor_us"] == pytest.approx(16.05, abs=0.01)
    assert hkv8["roofline_us"] == pytest.approx(17.37, abs=0.01)
    assert hkv8["frac_roofline"] == pytest.approx(0.334, abs=0.001)
    assert hkv8["frac_floor"] == pytest.approx(hkv8["floor_us"] / 52.0)
    assert hkv8["tflops"] == pytest.approx(hkv8["flops"] / 52e-6 / 1e12)
    # Hkv 32: four times the bytes for the same FLOPs, memory-bound: the roofline is the floor
    hkv32 = _common.roofline(_bytes(B, L, T, Hq, 32, D, 2), _flops(B, L, Hq, D, mask),
                             H200_COPY_GBPS, peak, median_us=85.8)  # fmt: skip
    assert hkv32["bound"] == "memory" and hkv32["intensity"] < 70
    assert hkv32["roofline_us"] == hkv32["floor_us"]
    assert hkv32["frac_roofline"] == hkv32["frac_floor"] == pytest.approx(0.74, abs=0.01)
    # the visible tree pairs count: more than the diagonal, fewer than the full T x T
    assert T < int(mask.sum()) < T * T


def test_roofline_without_peak_or_flops():
    mb = 10**6  # 10 us at 100 GB/s
    none = _common.roofline(mb, None, 100.0, 989.4, median_us=20.0)
    assert none == {"floor_us": 10.0, "frac_floor": 0.5}  # no FLOPs stated: no roofline keys
    cpu = _common.roofline(mb, 4 * mb, 100.0, None, median_us=20.0)
    assert cpu["roofline_us"] is None and cpu["frac_roofline"] is None and cpu["bound"] is None
    assert cpu["intensity"] == 4.0 and cpu["tflops"] == pytest.approx(4 * mb / 20e-6 / 1e12)
    copy = _common.roofline(mb, 0, 100.0, 989.4, median_us=20.0)  # a copy: the floor
    assert copy["roofline_us"] == 10.0 and copy["bound"] == "memory"
    assert "intensity" not in copy and "tflops" not in copy


def test_timed_row_carries_the_roofline(monkeypatch):
    ctx = _common.BenchContext(device=torch.device("cpu"), dtype=torch.float32, copy_gbps=1000.0,
                               peak_tflops=100.0)  # fmt: skip
    monkeypatch.setattr(_common, "measure", lambda fn, ctx: (10.0, 9.0, 11.0))
    # 1 MB: a 1 us floor; 500 MFLOP at 100 TFLOP/s: 5 us
    row = _common.timed_row(ctx, "s", "ours", lambda: None, 10**6, flops=5 * 10**8, L=3)
    assert row["roofline_us"] == pytest.approx(5.0) and row["bound"] == "compute"
    assert row["frac_roofline"] == pytest.approx(0.5) and row["frac_floor"] == pytest.approx(0.1)
    assert row["L"] == 3 and "flops" not in report.case_keys([row])
    cols, _ = report.table_columns([row])
    assert {"roofline_us", "frac_roofline", "intensity"} <= set(cols) and "flops" not in cols
    assert cols.index("frac_roofline") == cols.index("frac_floor") + 1
    from medusa_kernels.bench.compact_kv import _per_call

    copy = _per_call(_common.timed_row(ctx, "compact_kv", "t", lambda: None, 20 * 10**6,
                                       flops=0), 20)  # fmt: skip
    assert copy["roofline_us"] == copy["floor_us"] == pytest.approx(1.0)
    assert copy["frac_roofline"] == copy["frac_floor"] == pytest.approx(2.0)


def test_markdown_states_the_peak_and_the_ridge():
    meta = {"device": "cuda", "device_name": "NVIDIA H200", "date": "2026-12-07T00:00:00",
            "peak_bf16_tflops": 989.4, "peak_source": "NVIDIA H200 datasheet"}  # fmt: skip
    md = report.markdown({"meta": meta, "copy_gbps": H200_COPY_GBPS, "sections": {}})
    assert "dense bf16 peak 989.4 TFLOP/s (NVIDIA H200 datasheet), ridge 233 FLOP/B" in md
    meta["peak_bf16_tflops"] = None
    assert "no roofline" in report.markdown({"meta": meta, "copy_gbps": 1.0, "sections": {}})


# --- targets ---------------------------------------------------------------------------------


def _kernel(impl, median, T=64, Hkv=32, L=16384, **extra):
    return dict(section="tree_attention", impl=impl, mode="graph", L=L, B=1, T=T, Hq=32,
                Hkv=Hkv, D=128, dtype="bfloat16", median_us=median, **extra)  # fmt: skip


def _throughput(impl, B, new, runs, **results):
    return dict(section="throughput", impl=impl, model="demo", B=B, max_new_tokens=new,
                dtype="float32", mode="eager", tree="t", tokens_per_s=100.0,
                tokens_per_s_runs=[100.0] * runs, **results)  # fmt: skip


def test_verdicts_met_missed_and_against_a_peer():
    rows = [_kernel("triton", 85.8, frac_floor=0.74), _kernel("triton", 30.0, L=4096,
            frac_floor=0.71), _kernel("triton", 52.0, Hkv=8, frac_roofline=0.334),
            _kernel("triton", 83.2, T=1, frac_floor=0.76), _kernel("sdpa_nomask", 79.3, T=1),
            _kernel("triton", 40.0, T=1, Hkv=8), _kernel("sdpa_nomask", 45.0, T=1, Hkv=8),
            _kernel("triton", 1.0, T=1, L=65536)]  # fmt: skip
    records = targets.judge("tree_attention", rows, "cuda")
    cells = [r.get("target") for r in rows]
    assert cells[0] == "missed: of floor 0.74 >= 0.8"
    assert cells[1] == "met: of floor 0.71 >= 0.7"
    assert cells[2] == "missed: of roofline 0.334 >= 0.55"
    assert cells[3] == "missed: median us 1.049x sdpa_nomask's <= 1x"  # 83.2 / 79.3
    assert cells[4] is None  # the peer itself is not judged
    assert cells[5].startswith("met: median us 0.8889x")
    assert cells[7] is None  # L 64k decode: no target
    assert [r["met"] for r in records] == [False, True, False, False, True]
    assert targets.judge("tree_attention", [dict(r, target=None) for r in rows], "cpu") == []


def test_throughput_quick_runs_are_too_short_to_judge():
    """`bench --quick` decoded 16 tokens once and printed Medusa at 0.65x plain as "ok": its
    ratio is now "too short to judge"; a full run's 0.65x is "missed"."""
    quick = [_throughput("fixed", 1, 16, 1, speedup=0.65),
             _throughput("adaptive", 4, 16, 1, speedup=0.65, vs_best=0.9, check="ok")]
    targets.judge("throughput", quick, "cuda")
    assert quick[0]["target"] == "too short to judge: 16 new tokens a sequence < 64"
    assert quick[1]["target"] == quick[0]["target"]  # once, though two targets judge it
    full = [_throughput("fixed", 1, 128, 3, speedup=0.65),
            _throughput("adaptive", 64, 128, 3, speedup=1.2, vs_best=0.9),
            _throughput("adaptive", 4, 128, 2, speedup=1.2, vs_best=1.0),
            _throughput("fixed", 64, 128, 3, speedup=0.8)]  # fmt: skip
    targets.judge("throughput", full, "cuda")
    assert full[0]["target"] == "missed: speedup 0.65 >= 1"
    assert full[1]["target"] == "met: speedup 1.2 >= 1; missed: vs_best 0.9 >= 0.95"
    assert full[2]["target"] == "too short to judge: 2 runs < 3"
    assert "target" not in full[3]  # the fixed tree at B 64: no stated target
    cpu = [_throughput("adaptive", 1, 128, 5, speedup=0.9, cpu_speedup=1.1, cpu_vs_best=1.0)]
    targets.judge("throughput", cpu, "cpu")  # CPU: judged on CPU time
    assert cpu[0]["target"] == "met: cpu_speedup 1.1 >= 1; met: cpu_vs_best 1 >= 0.95"


def test_summary_lists_every_applicable_target():
    rows = [_kernel("triton", 85.8, frac_floor=0.81)]
    result = {"meta": {"device": "cuda"}, "sections": {"tree_attention": {"rows": rows},
              "throughput": {"rows": [_throughput("fixed", 1, 16, 1, speedup=2.0)]}}}
    records = targets.summary(result)
    by = {(r["target"].split(":")[0], r["verdict"].split(":")[0]) for r in records}
    assert ("tree_attention impl=triton mode=graph B=1 T=64 Hkv=32 L=16384", "met") in by
    assert ("throughput impl=fixed B=1", "too short to judge") in by
    not_measured = [r for r in records if r["verdict"] == "not measured"]
    assert len(not_measured) == len([t for t in targets.TARGETS if t.device == "cuda" and
             t.section in ("tree_attention", "throughput")]) - 2  # fmt: skip
    assert all(t.section in ("tree_attention", "throughput") for t in targets.TARGETS
               if t.name() in {r["target"] for r in records})  # only the sections run
    assert "target" not in rows[0]  # the summary judges copies
    tally = report.tally(records)
    assert tally.startswith("1 met, 1 too short to judge,") and tally.endswith("not measured")
    md = report.markdown({"meta": {"device": "cuda", "device_name": "x", "date": "d"},
                          "sections": {}, "targets": records})  # fmt: skip
    assert f"## Targets: {tally}" in md and "| not measured |" in md


# --- narrow tables ---------------------------------------------------------------------------


def _wide_rows() -> list[dict]:
    """Throughput-like rows: 19 columns, some cells long."""
    rows = []
    for B in (1, 4, 16, 64):
        for impl in ("plain", "fixed", "adaptive"):
            rows.append(_throughput(impl, B, 128, 5, tokens=128 * B, steps=40 + B,
                                    mean_accepted=3.1234, trees={"1": 3, "8": 40 + B},
                                    tokens_per_cpu_s=123.4 * B, tokens_per_cpu_s_runs=[1.5] * 5,
                                    speedup=1.234, cpu_speedup=1.1, identical=True, check="ok",
                                    vs_best=0.99, cpu_vs_best=1.01, same_work_as_fixed=False,
                                    target="missed: cpu_vs_best 0.9 >= 0.95"))  # fmt: skip
    return rows


@pytest.mark.parametrize("width", [80, 120])
def test_wide_tables_split_to_the_terminal_width(width):
    from rich.console import Console

    rows = _wide_rows()
    cols, _ = report.table_columns(rows)
    assert len(cols) >= 19
    parts = report.split_columns(cols, rows, width)
    assert len(parts) > 1
    keys = ["impl", "mode", "B"]
    assert all(part[:3] == keys for part in parts)  # each part names its rows
    assert sorted({c for p in parts for c in p}) == sorted(cols)  # every column somewhere
    assert parts[0][3:5] == ["tokens_per_s", "speedup"]  # the verdicts come first
    assert "target" in parts[0] + parts[1]
    console = Console(file=io.StringIO(), width=width, force_terminal=True, record=True)
    report.print_tables({"sections": {"throughput": {"status": "ok", "seconds": 1.0,
                                                     "rows": rows}}}, console)  # fmt: skip
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    assert f"(1 of {len(parts)})" in text and f"({len(parts)} of {len(parts)})" in text
    for c in cols:
        assert report.header(c)[:8] in text  # every header printed (long ones fold)
    # a wide terminal: one table; Markdown (files) keeps every column in one table
    assert len(report.split_columns(cols, rows, 1000)) == 1
    md = report.markdown({"meta": {"device": "cpu", "device_name": "x", "date": "d"},
                          "sections": {"throughput": {"status": "ok", "rows": rows}}})
    header_line = next(line for line in md.splitlines() if line.startswith("| impl"))
    assert header_line.count("|") == len(cols) + 1


# --- step profile ----------------------------------------------------------------------------


def test_profile_aggregate_per_step():
    events = [("gemv", 10.0), ("norm", 1.0), ("gemv", 12.0), ("norm", 1.0), ("Memset", 0.5)] * 4
    table = step_profile.aggregate(events, reps=4)
    assert [e["kernel"] for e in table] == ["gemv", "norm", "Memset"]  # by time, largest first
    gemv = table[0]
    assert gemv["launches"] == 2 and gemv["total_us"] == pytest.approx(22.0)
    assert gemv["share"] == pytest.approx(22 / 24.5)
    assert math.isclose(sum(e["share"] for e in table), 1.0)


def test_step_profile_section_on_the_cpu(tmp_path):
    """The section's CPU path: the tiny model's eager steps profiled (CPU ops, labelled so),
    rows in the bench, the full tables in <stem>-profile.json / .md beside the JSON."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = _common.BenchContext(device=torch.device("cpu"), dtype=torch.float32, quick=True,
                                   out_dir=str(tmp_path), stem="run",
                                   meta={"device": "cpu", "device_name": "test"})  # fmt: skip
        rows = step_profile.run(ctx)
    finally:
        torch.set_num_threads(threads)
    totals = [r for r in rows if r["kernel"].startswith("(all")]
    assert [r["impl"] for r in totals] == ["plain_step", "medusa_step"]
    for total in totals:
        assert total["unit"] == "cpu op" and total["kernel"] == "(all cpu ops, self time)"
        assert total["launches"] > 10 and total["total_us"] > 0 and total["step_us"] > 0
        mine = [r for r in rows if r["impl"] == total["impl"] and r is not total]
        assert 0 < len(mine) <= step_profile.TOP
        assert sum(r["share"] for r in mine) <= 1.0 + 1e-9
    # the Medusa step runs more ops than the plain one (heads, tree, acceptance, compaction)
    assert totals[1]["launches"] > totals[0]["launches"]
    data = json.loads((tmp_path / "run-profile.json").read_text())
    assert [p["impl"] for p in data["profiles"]] == ["plain_step", "medusa_step"]
    names = {e["kernel"] for p in data["profiles"] for e in p["entries"]}
    assert "medusa_kernels::tree_attention" in names and "aten::mm" in names
    md = (tmp_path / "run-profile.md").read_text()
    assert "## tiny medusa_step (eager, B 1, L 64" in md and "CPU ops (self time" in md
    assert any(os.path.basename(str(tmp_path / "run-profile.md")) in n for n in ctx.notes)


def test_cuda_profile_counts_device_events(monkeypatch):
    """The CUDA branch keeps the GPU's kernels, memcpys and memsets (device events), not the
    CPU ops that launched them: checked with a fake profiler on the CPU."""
    from torch.autograd import DeviceType

    class Ev:
        def __init__(self, name, device_type, us):
            self.name, self.device_type, self.self_cpu_time_total = name, device_type, us
            self.time_range = type("R", (), {"elapsed_us": lambda s: us})()

    class Prof:
        def __init__(self, activities):
            self.activities = activities

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return [Ev("cudaGraphLaunch", DeviceType.CPU, 30.0), Ev("gemv", DeviceType.CUDA, 9.0),
                    Ev("Memset (Device)", DeviceType.CUDA, 1.0)]  # fmt: skip

    import torch.profiler

    monkeypatch.setattr(torch.profiler, "profile", Prof)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    got = step_profile.profiled_events(lambda: None, 2, cuda=True)
    assert got == [("gemv", 9.0), ("Memset (Device)", 1.0)]
    assert step_profile.profiled_events(lambda: None, 2, cuda=False) == [("cudaGraphLaunch", 30.0)]
