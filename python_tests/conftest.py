"""Test setup: without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1 must
be set before triton.jit sees them, so before medusa_kernels is imported)."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def poison(shape, dtype, device):
    """An output buffer full of NaN (or -1 for ints) so unwritten elements fail loudly."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)

