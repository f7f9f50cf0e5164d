"""Ahead-of-time compilation of every Triton kernel configuration the launchers pick, for real GPU
targets, on a machine without a GPU, and what the compiled code shows (registers, spills, shared
memory, CTAs per SM, the load and MMA instructions).

The interpreter (TRITON_INTERPRET=1) runs kernels as NumPy code and accepts programs that the
compiler refuses (or compiles differently). This closes that gap:

1. ``capture``: with ``install_capture(FILE)`` every launch under the interpreter is recorded as
   (module, kernel, argument types, constexpr values, num_warps, num_stages, maxnreg) plus its
   grid, the
   benchmark case it belongs to (``case("...")``) and the CTAs per SM the launcher assumed for it
   (``ops._backend.ctas_per_sm``), and written to FILE as JSON when the process exits. A launch
   whose tensors are on the ``meta`` device is recorded and not run: the launchers are called at
   the real benchmark shapes (V 128256, d 4096) without allocating or computing anything.
2. ``python triton_aot.py FILE [--archs 80,90] [--json OUT]``: without the interpreter, compiles
   each configuration with ``triton.compile`` for each target down to a cubin (fp16 launches also
   as bf16, the GPU's dtype), in parallel, and reads the cubin with cuobjdump; prints one line
   per failure and exits non-zero if any; ``--json`` writes every result (``analyse``).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

DTYPES = {
    "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32",
    "torch.float64": "fp64", "torch.int8": "i8", "torch.uint8": "u8", "torch.int16": "i16",
    "torch.int32": "i32", "torch.int64": "i64", "torch.bool": "i1",
}  # fmt: skip
DEFAULT_ARCHS = (80, 90)
# set while capturing launches that a launcher planned for these GPUs only (it picks its
# configuration by compute capability): they compile only for them
CAPTURE_ARCHS: tuple[int, ...] | None = None
_CASE: list[str] = [""]


@contextlib.contextmanager
def case(label: str):
    """Tag the launches inside the block with a benchmark case (``"heads N=1 V=32000 k=10"``)."""
    _CASE.append(label)
    try:
        yield
    finally:
        _CASE.pop()


def _is_tensor(value) -> bool:
    return hasattr(value, "dtype") and hasattr(value, "data_ptr")


def _arg_type(value) -> str:
    if _is_tensor(value):
        return "*" + DTYPES[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _aligned(value) -> bool:
    if value.device.type == "meta":  # fresh allocations are 256-byte aligned; views keep offsets
        return value.storage_offset() * value.element_size() % 16 == 0
    return value.data_ptr() % 16 == 0


def _spec(fn, args, kwargs, do_not_specialize=()) -> dict:
    """The compile-time identity of one launch, as Triton's launcher specialises it: constexprs,
    ints equal to 1 (turned into constexprs), 16-divisible ints and 16-byte aligned pointers
    (``tt.divisibility``), except the parameters the kernel marks ``do_not_specialize``."""
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip((p.name for p in params), args, strict=False))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    bound.update(kwargs)
    plain = {params[i].name if isinstance(i, int) else i for i in do_not_specialize}
    signature, constexprs, div16 = {}, {}, []
    for p in params:
        value = bound[p.name] if p.name in bound else p.default
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if "constexpr" in str(p.annotation) or (is_int and value == 1 and p.name not in plain):
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        else:
            signature[p.name] = _arg_type(value)
            if p.name in plain:
                continue
            if _aligned(value) if _is_tensor(value) else is_int and value % 16 == 0:
                div16.append(p.name)
    archs = {"archs": list(CAPTURE_ARCHS)} if CAPTURE_ARCHS else {}  # else every target
    return dict(module=fn.__module__, kernel=fn.__name__, signature=signature,
                constexprs=constexprs, options=options, div16=div16, **archs)


def spec_key(spec: dict) -> str:
    return json.dumps({k: spec.get(k) for k in ("module", "kernel", "signature", "constexprs",
                                                "options", "div16", "archs")}, sort_keys=True)


def spec_archs(spec: dict, archs) -> list[int]:
    """The targets among ``archs`` that ``spec`` compiles for (a launch planned for some GPUs
    only: those)."""
    return [a for a in archs if a in spec.get("archs", archs)]


def install_capture(path: str) -> None:
    """Record every interpreted launch (and run it unless its tensors are on ``meta``); write the
    distinct (configuration, grid, case) triples to ``path`` at exit."""
    from triton.runtime.interpreter import InterpretedFunction

    from medusa_kernels.ops import _backend

    seen: dict[str, dict] = {}
    pending: dict[str, int] = {}  # kernel name -> CTAs/SM its launcher just assumed
    _backend.CAPTURE_OCCUPANCY = pending
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = _spec(self.fn, args, dict(kwargs), self.kwargs.get("do_not_specialize") or ())
        launch = dict(spec, grid=list(grid) if not callable(grid) else None, case=_CASE[-1],
                      assumed_ctas_per_sm=pending.pop(self.fn.__name__, None))
        seen.setdefault(json.dumps(launch, sort_keys=True), launch)
        if any(_is_tensor(a) and a.device.type == "meta" for a in (*args, *kwargs.values())):
            return None
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run

    def dump():
        with open(path, "w") as f:
            json.dump(list(seen.values()), f, indent=1)

    atexit.register(dump)


def variants(spec: dict):
    """The spec, and its bf16 twin when it has fp16 pointers (the tests run fp16; GPUs run bf16)."""
    yield spec
    if "*fp16" in spec["signature"].values():
        sig = {k: "*bf16" if v == "*fp16" else v for k, v in spec["signature"].items()}
        yield dict(spec, signature=sig)


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_nvidia_tool("cuobjdump"), *flags, f.name], capture_output=True,
                             text=True, check=True)
    finally:
        os.unlink(f.name)
    return out.stdout


# SASS instruction classes worth counting (static counts in the whole kernel, not per loop trip)
SASS_CLASSES = {
    "HGMMA (wgmma)": r"HGMMA\.",
    "HMMA (mma.sync)": r"HMMA\.",
    "UTMALDG (TMA load)": r"UTMALDG|UBLKCP",
    "LDGSTS.128 (cp.async 16 B)": r"LDGSTS\.E(\.BYPASS)?(\.LTC128B)?\.128",
    "LDGSTS <16 B": r"LDGSTS\.E(?!(\.BYPASS)?(\.LTC128B)?\.128)",
    "LDG.128": r"LDG\.E(\.[A-Z_]+)*\.128",
    "LDG <16 B": r"LDG\.E(?!(\.[A-Z_]+)*\.128)",
    "LDSM": r"LDSM\.",
    "STG": r"STG\.",
    "LDL/STL (local: spills)": r"LDL|STL",
}
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def count_sass(sass: str) -> dict[str, int]:
    ops = collections.Counter(_SASS_OP.findall(sass))
    return {name: sum(n for op, n in ops.items() if re.match(pattern, op))
            for name, pattern in SASS_CLASSES.items()}


def compile_spec(spec: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    names = list(spec["signature"])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.get("div16", [])}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])


def analyse(spec: dict, arch: int, sass: bool = True) -> dict:
    """Compile one configuration for sm_<arch>; its resources and instruction counts (or the
    error): regs, stack (bytes of local memory per thread: spills), shared (Triton's dynamic
    shared memory), ctas_per_sm (``ops._backend.occupancy``), num_warps, sass counts (only
    with ``sass``: disassembling costs about as much as compiling)."""
    from medusa_kernels.ops._backend import occupancy

    try:
        compiled = compile_spec(spec, arch)
        cubin = compiled.asm["cubin"]
        res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                        _cuobjdump(cubin, "-res-usage"))
        regs, stack, static_shared, local = (int(x) for x in res.groups())
        shared = compiled.metadata.shared + static_shared
        warps = compiled.metadata.num_warps
        return dict(arch=arch, regs=regs, stack=stack, local=local, shared=shared,
                    num_warps=warps, ctas_per_sm=occupancy(regs, shared, warps, arch),
                    sass=count_sass(_cuobjdump(cubin, "-sass")) if sass else {}, error=None)
    except Exception as e:  # noqa: BLE001 - report every failure, then fail
        first = str(e).strip().splitlines()[:3]
        return dict(arch=arch, error=f"{type(e).__name__}: {first}")


def _analyse_job(job):
    return analyse(*job)


def compile_all(specs: list[dict], archs=DEFAULT_ARCHS, workers: int | None = None,
                sass: bool = True) -> dict:
    """{(spec_key, arch): analyse(...)} over the distinct configurations of ``specs`` and their
    variants, compiled in parallel (``workers``: default the CPU count). Compiles land in
    Triton's cache (``TRITON_CACHE_DIR``, keyed by source, options, target and compiler), so a
    second run only reads them back."""
    from concurrent.futures import ProcessPoolExecutor

    unique = {spec_key(v): v for s in specs for v in variants(s)}
    jobs = [(spec, arch, sass) for spec in unique.values() for arch in spec_archs(spec, archs)]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        results = list(map(_analyse_job, jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_analyse_job, jobs, chunksize=1))
    return {(spec_key(spec), arch): r for (spec, arch, _), r in zip(jobs, results, strict=True)}


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("launches", help="JSON written by install_capture")
    ap.add_argument("--archs", default=os.environ.get("MEDUSA_AOT_ARCHS", "80,90"))
    ap.add_argument("--json", help="write every launch with its compiled resources here")
    ap.add_argument("--no-sass", action="store_true", help="skip the instruction counts")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run the compile step without TRITON_INTERPRET=1")
    with open(args.launches) as f:
        launches = json.load(f)
    archs = tuple(int(a) for a in args.archs.split(","))
    results = compile_all(launches, archs, sass=not args.no_sass)
    failures = [f"{key} sm_{arch}: {r['error']}" for (key, arch), r in results.items()
                if r["error"]]
    print(f"compiled {len(results)} kernel variants x archs for sm_{archs}, "
          f"{len(failures)} failures")
    for line in failures:
        print(line)
    if args.json:
        rows = [{**v, **results[spec_key(v), arch]} for launch in launches
                for v in variants(launch) for arch in spec_archs(v, archs)]
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
