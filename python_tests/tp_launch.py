"""Start N ranks of a test worker with torchrun's environment, under a hard timeout.

``run_ranks(world, workdir, worker)`` starts ``python WORKER WORKDIR`` ``world`` times with
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = 127.0.0.1 and a free MASTER_PORT
(what torchrun sets), waits for all of them (a hang fails the test; the first rank to fail stops
the others) and returns each rank's ``WORKDIR/rank{r}.pt``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, HERE]), **extra)


def run_ranks(world: int, workdir, worker: str, device: str = "cpu", timeout: float = 120) -> list:
    """Start ``world`` workers; their rank{r}.pt results (a failure or hang fails the test
    with every rank's log tail)."""
    port, procs, logs = free_port(), [], []
    for rank in range(world):
        env = torchrun_env(rank, world, port, MK_TEST_DEVICE=device)
        logs.append(open(os.path.join(workdir, f"log{rank}.txt"), "w"))
        procs.append(subprocess.Popen([sys.executable, worker, str(workdir)], env=env, cwd=ROOT,
                                      stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline, hung = time.monotonic() + timeout, False
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one rank failed: the others would wait for it
            if time.monotonic() > deadline:
                hung = True
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    if any(p.returncode != 0 for p in procs):
        tails = []
        for rank in range(world):
            with open(os.path.join(workdir, f"log{rank}.txt")) as f:
                tails.append(f"--- rank {rank} (exit {procs[rank].returncode}):\n"
                             f"{f.read()[-2500:]}")
        why = f"hung: killed after {timeout} s" if hung else "a rank failed"
        pytest.fail(f"{world} ranks: {why}\n" + "\n".join(tails))
    return [torch.load(os.path.join(workdir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]
