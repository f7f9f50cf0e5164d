"""Every Triton kernel compiles for a real GPU (sm_90) with the installed Triton, in every launch
configuration it takes at GPU shapes, also where there is no GPU: the interpreter alone would
not catch programs that only the compiler refuses. See triton_aot.py and gpu_shape_launches.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _has_cuda_backend(), reason="this Triton has no NVIDIA backend")
def test_every_kernel_config_compiles_for_sm90(tmp_path):
    specs = tmp_path / "launches.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "gpu_shape_launches.py", str(specs)], cwd=HERE,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    kernels = {line.split('"kernel": ')[1] for line in specs.read_text().splitlines()
               if '"kernel": ' in line}
    assert len(kernels) >= 5, kernels  # every op's kernels were launched
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    run = subprocess.run([sys.executable, "triton_aot.py", str(specs)], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert " 0 failures" in run.stdout
