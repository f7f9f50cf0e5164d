"""csrc/ compiles where nvcc exists, even without a GPU or a CUDA build of torch.

- csrc/*.cu: ``nvcc -c`` for sm_80 and sm_90 with warnings as errors (the kernels include only
  csrc/compact_kv.h, no torch) and ``-Xptxas -v``: every kernel must compile without a stack
  frame or a spill (issue 19: the old per-A variants spilled up to 3.8 KB). Then a tiny host
  program linked against the object checks the launcher's host-side logic (access width,
  refused sizes) without touching a GPU.
- csrc/bindings.cpp: syntax-checked by nvcc's host compiler against the installed torch's headers
  (the CPU wheel ships the c10/cuda headers but not the generated cuda_cmake_macros.h, for which
  a one-line stand-in is written).
The compiles run in parallel (about 20 s on 2 cores). Skipped, with the reason, without nvcc.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
if NVCC is not None and not os.path.exists(NVCC):
    NVCC = None
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (PATH or CUDA_HOME): the CUDA sources are not compiled"
)
ARCH = ["-gencode", "arch=compute_80,code=sm_80"]
KERNEL_ARCHS = [*ARCH, "-gencode", "arch=compute_90,code=sm_90"]
TIMEOUT = 300


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)


def _finish(proc: subprocess.Popen, what: str) -> str:
    """Fail the test with the compiler's output if ``proc`` failed; else return that output."""
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what}: timed out after {TIMEOUT} s")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{out[-6000:]}")
    proc.output = out  # a second _finish of the same job returns it again
    return out


def _output(proc: subprocess.Popen, what: str) -> str:
    return proc.output if hasattr(proc, "output") else _finish(proc, what)


def ptxas_resources(log: str) -> list[dict]:
    """Per compiled kernel in an ``-Xptxas -v`` log: name, arch, stack frame and spill bytes,
    registers."""
    kernels = []
    for m in re.finditer(r"Compiling entry function '(\S+)' for '(sm_\d+)'", log):
        rest = log[m.end():]
        nxt = re.search(r"Compiling entry function", rest)
        block = rest[: nxt.start() if nxt else len(rest)]
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                          r"spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        assert frame and regs, f"no resource line for {m.group(1)}:\n{block}"
        kernels.append(dict(name=m.group(1), arch=m.group(2), stack=int(frame.group(1)),
                            spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)),
                            registers=int(regs.group(1))))
    return kernels


def _torch_flags(tmp: Path) -> list[str]:
    import torch.utils.cpp_extension as ext

    flags = [f"-I{p}" for p in ext.include_paths()]
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(p, macros)) for p in ext.include_paths()):
        stub = tmp / "stub" / macros
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags.append(f"-I{tmp / 'stub'}")
    return flags + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}",
                    "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Start every compile at once; each test waits for its own."""
    tmp = tmp_path_factory.mktemp("csrc")
    jobs = {}
    objects = []
    for cu in sorted(CSRC.glob("*.cu")):
        obj = tmp / (cu.stem + ".o")
        objects.append(obj)
        jobs[cu.name] = _start([NVCC, "-std=c++17", "-O3", *KERNEL_ARCHS, "-Xptxas", "-v",
                                "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
                                "-c", str(cu), "-o", str(obj)])
    try:
        torch_flags = _torch_flags(tmp)
    except ImportError as e:
        torch_flags = e
    if not isinstance(torch_flags, Exception):
        for cpp in sorted(CSRC.glob("*.cpp")):
            jobs[cpp.name] = _start([NVCC, "-std=c++20", "-Xcompiler", "-fsyntax-only",
                                     *torch_flags, "-c", str(cpp), "-o", str(tmp / "unused.o")])
    yield {"tmp": tmp, "jobs": jobs, "objects": objects, "torch": torch_flags}
    for proc in jobs.values():
        if proc.poll() is None:
            proc.kill()


def test_sources_exist():
    assert (CSRC / "compact_kv.cu").exists() and (CSRC / "bindings.cpp").exists()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "csrc/*.cu" in cmake and "csrc/*.cpp" in cmake  # the same globs as setup.py


def test_kernels_compile(builds):
    for name in [n for n in builds["jobs"] if n.endswith(".cu")]:
        _output(builds["jobs"][name], f"nvcc -c csrc/{name}")


def test_kernels_do_not_spill(builds):
    """Issue 19 item 7: no kernel of csrc/ has a stack frame or spills, on sm_80 and sm_90."""
    for name in [n for n in builds["jobs"] if n.endswith(".cu")]:
        kernels = ptxas_resources(_output(builds["jobs"][name], f"nvcc -c csrc/{name}"))
        assert {k["arch"] for k in kernels} == {"sm_80", "sm_90"}, name
        if name == "compact_kv.cu":  # one kernel per access width (16, 8, 4, 2 bytes) and arch
            assert len(kernels) == 8, [k["name"] for k in kernels]
        bad = [k for k in kernels if k["stack"] or k["spill_stores"] or k["spill_loads"]]
        assert not bad, f"csrc/{name}: stack frames or spills: {bad}"


def test_ptxas_resources_parses_a_spill():
    """The parser itself: the old kMaxA = 64 variant's line must read as a spill."""
    log = ("ptxas info    : Compiling entry function '_Zkernel' for 'sm_90'\n"
           "ptxas info    : Function properties for _Zkernel\n"
           "    3832 bytes stack frame, 5940 bytes spill stores, 6056 bytes spill loads\n"
           "ptxas info    : Used 32 registers, used 1 barriers, 3832 bytes cumulative stack\n")
    assert ptxas_resources(log) == [dict(name="_Zkernel", arch="sm_90", stack=3832,
                                         spill_stores=5940, spill_loads=6056, registers=32)]


HOST_CHECK = r"""
#include <cstdio>
#include "compact_kv.h"
using medusa_kernels::CompactKVParams;
#define EXPECT(c) do { if (!(c)) { std::printf("FAILED: %s\n", #c); return 1; } } while (0)
int main() {
  alignas(16) static char buf[4096];
  CompactKVParams p{};
  p.k = buf; p.v = buf + 1024; p.row_bytes = 256; p.k_stride_pos = p.v_stride_pos = 256;
  p.k_stride_batch = p.v_stride_batch = 2048; p.num_layers = 1; p.batch = 1; p.max_accept = 4;
  EXPECT(medusa_kernels::compact_kv_vector_bytes(p) == 16);
  p.row_bytes = 40; EXPECT(medusa_kernels::compact_kv_vector_bytes(p) == 8);
  p.v = buf + 2; EXPECT(medusa_kernels::compact_kv_vector_bytes(p) == 2);
  p.max_accept = 65; EXPECT(medusa_kernels::launch_compact_kv(p, 0) == cudaErrorInvalidValue);
  p.max_accept = 4; p.batch = 70000;
  EXPECT(medusa_kernels::launch_compact_kv(p, 0) == cudaErrorInvalidValue);
  p.batch = 1; p.block_table = reinterpret_cast<const int32_t*>(buf); p.page_size = 16;
  p.capacity = 2147483648LL;  // 2^31 paged positions: the kernel divides in 32 bits
  EXPECT(medusa_kernels::launch_compact_kv(p, 0) == cudaErrorInvalidValue);
  p.page_size = 0; p.capacity = 16;
  EXPECT(medusa_kernels::launch_compact_kv(p, 0) == cudaErrorInvalidValue);
  p.block_table = nullptr;
  p.batch = 0; EXPECT(medusa_kernels::launch_compact_kv(p, 0) == cudaSuccess);  // nothing to do
  std::printf("ok\n");
  return 0;
}
"""


def test_host_side_launcher_logic(builds):
    """Link a tiny host program against the kernels' object and run it (no GPU needed)."""
    _output(builds["jobs"]["compact_kv.cu"], "nvcc -c csrc/compact_kv.cu")
    tmp = builds["tmp"]
    (tmp / "host_check.cpp").write_text(HOST_CHECK)
    exe = tmp / "host_check"
    _finish(_start([NVCC, "-std=c++17", *ARCH, f"-I{CSRC}", str(tmp / "host_check.cpp"),
                    str(tmp / "compact_kv.o"), "-o", str(exe)]), "linking the host check")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def test_bindings_compile_against_torch_headers(builds):
    if isinstance(builds["torch"], Exception):
        pytest.skip(f"torch headers unavailable: {builds['torch']}")
    for name in [n for n in builds["jobs"] if n.endswith(".cpp")]:
        _finish(builds["jobs"][name], f"nvcc -fsyntax-only csrc/{name} (torch headers)")


def test_a_compile_error_fails(tmp_path):
    """The harness itself: a broken source must fail, with the compiler's message."""
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(int* x) { x[0] = undeclared_name; }\n")
    proc = _start([NVCC, *ARCH, "-c", str(bad), "-o", str(tmp_path / "bad.o")])
    with pytest.raises(pytest.fail.Exception, match="undeclared_name"):
        _finish(proc, "nvcc -c bad.cu")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
