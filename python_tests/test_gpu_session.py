"""bench/gpu_session.sh, the lent GPU's two stages, checked on a CPU: its syntax, its steps and,
with DRY_RUN=1, what it runs, skips (saying so) and leaves in $OUT."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_session.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args, timeout=240, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, PY=sys.executable, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **env)
    full.pop("TRITON_INTERPRET", None)  # the bench sets it itself in CPU mode
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_syntax():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_verify_says_what_it_skips(tmp_path):
    """Every step of stage 1 but csrc (test_csrc_build.py is CPU work, nvcc: it would run here,
    and CI runs it anyway)."""
    proc = _run("verify", DRY_RUN="1", OUT=str(tmp_path), STEPS="install tests memcheck racecheck")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "steps install tests memcheck racecheck (dry run)" in out
    for step in ("install", "tests", "memcheck", "racecheck"):
        assert f"dry run: skipped '{step}' (needs a GPU)" in out
    assert "test_exact_sampling_in_cuda_graphs_is_plain_sampling" in out  # the GPU test list
    assert "compute-sanitizer --tool racecheck" in out
    assert "budget 540 s" in out  # each stage fits a device call of 10 minutes
    assert os.listdir(tmp_path) == []  # nothing ran


def test_steps_and_usage_are_checked(tmp_path):
    bad = _run("verify", DRY_RUN="1", OUT=str(tmp_path), STEPS="racecheck bench")
    assert bad.returncode == 2 and "stage verify has no step 'bench'" in bad.stdout
    assert _run("warp", DRY_RUN="1", OUT=str(tmp_path)).returncode == 2
    one = _run("verify", DRY_RUN="1", OUT=str(tmp_path), STEPS="racecheck")
    assert one.returncode == 0 and "skipped 'racecheck'" in one.stdout
    assert "skipped 'memcheck'" not in one.stdout and "skipped 'tests'" not in one.stdout
    if not torch.cuda.is_available():  # without DRY_RUN a CPU machine is refused, by name
        proc = _run("verify", OUT=str(tmp_path))
        assert proc.returncode == 2 and "no CUDA GPU here" in proc.stdout


def test_dry_run_bench_leaves_the_bench_and_profile_files(tmp_path):
    """Stage 2 on a CPU: the full GPU bench is skipped (said), a short CPU bench runs instead
    and leaves what the stage brings back: the JSON, Markdown, the step profile, the log; at
    most 8 files (the device tool brings back 8)."""
    proc = _run("bench", DRY_RUN="1", OUT=str(tmp_path))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "dry run: skipped 'bench' (needs a GPU)" in out
    files = sorted(os.listdir(tmp_path))
    assert len(files) <= 8, files
    stem = next(f[: -len(".json")] for f in files if f.endswith("-quick.json"))
    for suffix in (".json", ".md", "-profile.json", "-profile.md"):
        assert stem + suffix in files, files
    assert "bench.log" in files and "no step profile" not in out
    assert "step_profile: ok" in (tmp_path / "bench.log").read_text()
