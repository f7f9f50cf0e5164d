"""Every Triton kernel configuration the launchers pick at the benchmark shapes compiles for a
real GPU (sm_90 and sm_80) with the installed Triton, also where there is no GPU (the interpreter
alone would not catch programs that only the compiler refuses), without spills, within the
resources the launchers' occupancy logic assumes. See triton_aot.py and gpu_shape_launches.py.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medusa_kernels.ops._backend import SM_LIMITS, occupancy

HERE = Path(__file__).resolve().parent
ARCHS = (90, 80)
# headroom of the benchmark configurations whose grid follows their CTAs/SM on sm_90: the
# number must survive a compiler that needs this many more registers / bytes of shared memory
REG_SLACK, SMEM_SLACK = 8, 4096
MODULES = ("heads_topk", "tree_attention", "compact_kv", "acceptance", "rms_norm", "rotary",
           "activation")


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    """Every launch of gpu_shape_launches.py compiled for sm_90 and sm_80 (fp16 also as bf16):
    one row per (launch, variant, arch) with its registers, spills, shared memory, CTAs/SM."""
    if not _has_cuda_backend():
        pytest.skip("this Triton has no NVIDIA backend")
    tmp = tmp_path_factory.mktemp("aot")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "gpu_shape_launches.py", str(tmp / "launches.json")],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "triton_aot.py", str(tmp / "launches.json"),
                          "--archs", ",".join(map(str, ARCHS)), "--no-sass",
                          "--json", str(tmp / "compiled.json")],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0 and " 0 failures" in run.stdout, \
        run.stdout[-5000:] + run.stderr[-3000:]
    return json.loads((tmp / "compiled.json").read_text())


def _rows(compiled, module):
    rows = [r for r in compiled if r["module"].endswith("." + module)]
    assert rows, f"no {module} kernel was launched"
    return rows


def _name(r) -> str:
    consts = {k: v for k, v in r["constexprs"].items() if k.isupper()}
    dtypes = sorted({v for v in r["signature"].values() if v in ("*fp16", "*bf16", "*fp32")})
    return f"{r['kernel']} sm_{r['arch']} {dtypes} {consts} {r['options']} {r.get('case', '')}"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("module", MODULES)
def test_every_launch_compiles_without_spills(compiled, module, arch):
    rows = [r for r in _rows(compiled, module) if r["arch"] == arch]
    assert rows, f"nothing of {module} compiled for sm_{arch}"
    spills = sorted({f"{_name(r)}: {r['stack']} B stack, {r['local']} B local" for r in rows
                     if r["stack"] or r["local"]})
    assert not spills, "\n".join(spills)


@pytest.mark.parametrize("module", MODULES)
def test_resources_fit_the_occupancy_the_launchers_assume(compiled, module):
    """Every configuration fits an SM of each arch (registers <= 255, shared memory <= the
    per-CTA limit: at least one CTA); where a launcher planned its grid with a CTAs/SM number
    (off the GPU: the static sm_90 value), that number is what the sm_90 compile gives, and on
    sm_80 what the launcher derives at run time is by construction the compile's number."""
    wrong = []
    for r in _rows(compiled, module):
        derived = occupancy(r["regs"], r["shared"], r["num_warps"], r["arch"])
        if derived != r["ctas_per_sm"] or derived < 1 or r["regs"] > 255 \
                or r["shared"] > SM_LIMITS[r["arch"]]["smem_cta"]:
            wrong.append(f"{_name(r)}: does not fit ({r['regs']} regs, {r['shared']} B)")
        assumed = r.get("assumed_ctas_per_sm")
        if r["arch"] == 90 and assumed is not None and assumed != derived:
            wrong.append(f"{_name(r)}: launcher assumes {assumed} CTAs/SM, compiled {derived} "
                         f"({r['regs']} regs, {r['shared']} B shared)")
    assert not wrong, "\n".join(sorted(set(wrong)))


@pytest.mark.parametrize("module", MODULES)
def test_benchmark_grids_have_occupancy_headroom(compiled, module):
    """The configurations of the benchmark cases (bf16, k 1 / 10) whose grid follows their
    CTAs/SM keep that number on sm_90 if the compiler needs REG_SLACK more registers per thread
    or SMEM_SLACK more bytes of shared memory."""
    rows = [r for r in _rows(compiled, module) if r["arch"] == 90 and r.get("case")
            and r.get("assumed_ctas_per_sm") is not None and "*bf16" in r["signature"].values()
            and " k=32 " not in r["case"] + " "]
    if not rows:
        pytest.skip(f"no {module} launcher plans its grid with an occupancy yet")
    tight = sorted({_name(r) + f": {r['regs']} regs, {r['shared']} B shared" for r in rows
                    if occupancy(r["regs"] + REG_SLACK, r["shared"] + SMEM_SLACK,
                                 r["num_warps"], 90) < r["ctas_per_sm"]})
    assert not tight, "\n".join(tight)


def test_the_launches_cover_the_benchmark_shapes(compiled):
    cases = {r["case"] for r in compiled if r.get("case")}
    for V in (32000, 128256):
        for N in (1, 8, 64, 512):
            for k in (1, 10):
                for op in ("heads K=5", "heads K=4", "lm_head"):
                    if op == "heads K=4" and k == 1:
                        continue
                    assert f"{op} N={N} V={V} d=4096 k={k} bfloat16" in cases


OCC_CPP = r"""
// Reads "arch regs shared warps" lines; prints cudaOccMaxActiveBlocksPerMultiprocessor's CTAs/SM
// for a kernel with that many registers and dynamic shared memory (opt-in limit, as Triton sets).
#include <cstdio>
#include "cuda_occupancy.h"
int main() {
    int arch, regs, warps, smem_sm, smem_cta; size_t shared;
    while (scanf("%d %d %zu %d %d %d", &arch, &regs, &shared, &warps, &smem_sm, &smem_cta) == 6) {
        cudaOccDeviceProp p;
        p.computeMajor = arch / 10; p.computeMinor = arch % 10; p.warpSize = 32;
        p.maxThreadsPerBlock = 1024; p.maxThreadsPerMultiprocessor = arch == 89 ? 1536 : 2048;
        p.regsPerBlock = 65536; p.regsPerMultiprocessor = 65536; p.numSms = 132;
        p.sharedMemPerBlock = 49152; p.reservedSharedMemPerBlock = 1024;
        p.sharedMemPerMultiprocessor = smem_sm; p.sharedMemPerBlockOptin = smem_cta;
        cudaOccFuncAttributes a;
        a.maxThreadsPerBlock = 1024; a.numRegs = regs; a.sharedSizeBytes = 0;
        a.partitionedGCConfig = PARTITIONED_GC_OFF; a.shmemLimitConfig = FUNC_SHMEM_LIMIT_OPTIN;
        a.maxDynamicSharedSizeBytes = smem_cta; a.numBlockBarriers = 1; a.virtualResourceCount = 0;
        cudaOccDeviceState state;
        cudaOccResult r;
        cudaOccError e = cudaOccMaxActiveBlocksPerMultiprocessor(&r, &p, &a, &state, warps * 32, shared);
        printf("%d\n", e == CUDA_OCC_SUCCESS ? r.activeBlocksPerMultiprocessor : -1);
    }
}
"""


def _occupancy_header() -> Path | None:
    try:
        import triton
    except ImportError:
        triton = None
    places = [Path(triton.__file__).parent / "backends/nvidia/include"] if triton else []
    places += sorted(Path("/usr/local").glob("cuda*/include"))
    return next((p for p in places if (p / "cuda_occupancy.h").exists()), None)


@pytest.mark.skipif(shutil.which("g++") is None or _occupancy_header() is None,
                    reason="needs g++ and CUDA's cuda_occupancy.h (shipped with Triton)")
def test_occupancy_equals_cuda_occupancy_calculator(tmp_path):
    """ops._backend.occupancy against NVIDIA's own calculator (cuda_occupancy.h, host-only code)
    over registers 16-255, shared memory up to and past the per-CTA limit, 1-16 warps."""
    (tmp_path / "occ.cpp").write_text(OCC_CPP)
    subprocess.run(["g++", "-O1", f"-I{_occupancy_header()}", "occ.cpp", "-o", "occ"],
                   cwd=tmp_path, check=True, capture_output=True)
    cases = [(arch, regs, shared, warps)
             for arch in SM_LIMITS for regs in [*range(16, 256, 3), 255]
             for shared in (0, 16, 16896, 49152, 65536, 73728, 100000, 115712, 166912, 166913,
                            200000, 232448, 232449)
             for warps in (1, 2, 4, 8, 16)]  # fmt: skip
    lines = [f"{a} {r} {s} {w} {SM_LIMITS[a]['smem']} {SM_LIMITS[a]['smem_cta']}"
             for a, r, s, w in cases]
    out = subprocess.run([str(tmp_path / "occ")], input="\n".join(lines), capture_output=True,
                         text=True, check=True).stdout.split()
    assert len(out) == len(cases)
    wrong = [(c, int(o)) for c, o in zip(cases, out, strict=True)
             if occupancy(c[1], c[2], c[3], c[0]) != max(int(o), 0)]
    assert not wrong, wrong[:10]


def test_ctas_per_sm_derives_once_per_configuration_on_cuda(monkeypatch):
    """On CUDA the launchers' CTAs/SM come from the compiled kernel (registers, shared memory,
    the device's compute capability), compiled once per configuration and cached; elsewhere the
    static value; the AOT capture sees what was used."""
    from types import SimpleNamespace

    import torch

    from medusa_kernels.ops import _backend

    compiled = []

    class FakeKernel:
        fn = SimpleNamespace(__name__="_fake_kernel")

        def warmup(self, *args, grid, **kwargs):
            compiled.append((args, kwargs))
            regs = 100 if kwargs["BLOCK"] == 64 else 200
            return SimpleNamespace(_init_handles=lambda: None, n_regs=regs,
                                   metadata=SimpleNamespace(shared=50000, num_warps=4))

    monkeypatch.setattr(_backend, "triton_interpreted", lambda: False)
    monkeypatch.setattr(_backend, "_DERIVED_OCCUPANCY", {})
    monkeypatch.setattr(_backend, "cuda_arch", lambda device: 80)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    log = {}
    monkeypatch.setattr(_backend, "CAPTURE_OCCUPANCY", log)
    cuda, kernel = torch.device("cuda", 0), FakeKernel()
    x = torch.empty(4, dtype=torch.float16)
    for _ in range(3):
        assert _backend.ctas_per_sm(kernel, (x, 16), dict(BLOCK=64, num_warps=4), 7, cuda) == \
            occupancy(100, 50000, 4, 80) == 3
    assert len(compiled) == 1 and log == {"_fake_kernel": 3}
    assert _backend.ctas_per_sm(kernel, (x, 16), dict(BLOCK=128, num_warps=4), 7, cuda) == \
        occupancy(200, 50000, 4, 80) == 2
    assert _backend.ctas_per_sm(kernel, (x, 17), dict(BLOCK=128, num_warps=4), 7, cuda) == 2
    assert len(compiled) == 3  # another specialisation of an int (17 is not 16-divisible)
    assert _backend.ctas_per_sm(kernel, (x, 16), dict(BLOCK=64, num_warps=4), 7,
                                torch.device("cpu")) == 7
    assert len(compiled) == 3 and log == {"_fake_kernel": 7}
