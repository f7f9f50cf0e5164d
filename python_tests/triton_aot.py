"""Ahead-of-time compilation of every Triton kernel the tests launch, for real GPU targets,
on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as NumPy code and accepts programs that the
compiler refuses (or compiles differently). This closes that gap:

1. ``capture``: run under the interpreter with ``MEDUSA_CAPTURE_LAUNCHES=FILE`` set; every
   launch is recorded as (module, kernel, argument types, constexpr values, num_warps,
   num_stages, maxnreg), deduplicated, and written to FILE as JSON when the process exits.
   Launches captured while ``CAPTURE_ARCHS`` is set were planned for those GPUs only (a
   launcher that picks its configuration by compute capability) and compile only for them.
2. ``python triton_aot.py FILE``: without the interpreter, imports each kernel and compiles it
   with ``triton.compile`` for sm_90 (``MEDUSA_AOT_ARCHS=80,90`` for more; fp16 launches also
   as bf16, the GPU's dtype), down to a cubin. Prints one line per failure and exits non-zero if any.
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import json
import os
import sys

DTYPES = {
    "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32",
    "torch.float64": "fp64", "torch.int8": "i8", "torch.uint8": "u8", "torch.int16": "i16",
    "torch.int32": "i32", "torch.int64": "i64", "torch.bool": "i1",
}  # fmt: skip
TARGETS = tuple(int(a) for a in os.environ.get("MEDUSA_AOT_ARCHS", "90").split(","))
CAPTURE_ARCHS: tuple[int, ...] | None = None  # set while capturing launches planned for these


def _arg_type(value) -> str:
    if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
        return "*" + DTYPES[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _spec(fn, args, kwargs) -> dict:
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip((p.name for p in params), args, strict=False))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    bound.update(kwargs)
    signature, constexprs, div16 = {}, {}, []
    for p in params:
        value = bound[p.name] if p.name in bound else p.default
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if "constexpr" in str(p.annotation) or (is_int and value == 1):
            signature[p.name] = "constexpr"  # Triton's launcher turns ints equal to 1 into these
            constexprs[p.name] = value
        else:
            signature[p.name] = _arg_type(value)
            # and specialises on 16-byte aligned pointers and ints divisible by 16
            aligned = (value.data_ptr() % 16 == 0 if signature[p.name].startswith("*")
                       else is_int and value % 16 == 0)
            if aligned:
                div16.append(p.name)
    archs = {"archs": list(CAPTURE_ARCHS)} if CAPTURE_ARCHS else {}  # else every target
    return dict(module=fn.__module__, kernel=fn.__name__, signature=signature,
                constexprs=constexprs, options=options, div16=div16, **archs)


def install_capture(path: str) -> None:
    """Record every interpreted launch; write the unique ones to ``path`` at exit."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = _spec(self.fn, args, dict(kwargs))
        seen.setdefault(json.dumps(spec, sort_keys=True), spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run

    def dump():
        with open(path, "w") as f:
            json.dump(list(seen.values()), f, indent=1)

    atexit.register(dump)


def variants(spec: dict):
    yield spec
    if "*fp16" in spec["signature"].values():  # the GPU's main dtype; the CPU tests use fp16
        sig = {k: "*bf16" if v == "*fp16" else v for k, v in spec["signature"].items()}
        yield dict(spec, signature=sig)


def _resources(cubin: bytes) -> str:
    """Registers / spills / shared memory of a kernel's cubin (cuobjdump -res-usage)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    return " ".join(x.strip() for x in out.stdout.splitlines() if "REG" in x) or out.stderr[-200:]


def compile_one(variant: dict) -> list[str]:
    """Compile one launch spec for every target; the failures as lines."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(variant["module"]), variant["kernel"])
    names = list(variant["signature"])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in variant.get("div16", [])}
    failures = []
    for arch in (a for a in TARGETS if a in variant.get("archs", TARGETS)):
        src = ASTSource(fn=fn, signature=variant["signature"], constexprs=variant["constexprs"],
                        attrs=attrs)
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=variant["options"])
            assert compiled.asm.get("cubin"), "no cubin"
            if os.environ.get("MEDUSA_AOT_RESOURCES"):
                print(variant["kernel"], f"sm_{arch}", variant["constexprs"], variant["options"],
                      _resources(compiled.asm["cubin"]), flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, then fail
            first = str(e).strip().splitlines()[:3]
            failures.append(f"{variant['kernel']} sm_{arch} {variant['signature']} "
                            f"{variant['constexprs']}: {type(e).__name__}: {first}")
    return failures


def compile_all(specs: list[dict]) -> list[str]:
    from concurrent.futures import ProcessPoolExecutor

    unique = {json.dumps(v, sort_keys=True): v for s in specs for v in variants(s)}
    with ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        failures = [line for lines in pool.map(compile_one, unique.values()) for line in lines]
    print(f"compiled {len(unique)} kernel variants for sm_{TARGETS}, {len(failures)} failures")
    return failures


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run the compile step without TRITON_INTERPRET=1")
    with open(sys.argv[1]) as f:
        problems = compile_all(json.load(f))
    for line in problems:
        print(line)
    sys.exit(1 if problems else 0)
