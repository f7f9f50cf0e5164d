"""ops.embedding (the decoder's token embedding, Gemma's scale fused): the Triton kernel (in the
interpreter on a CPU) and the reference against a float64 reference, on awkward shapes."""

import pytest
import torch
from conftest import HAS_CUDA

from medusa_kernels.ops import _backend, embedding, embedding_ref

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3)}
BACKENDS = ["torch"] + (["triton"] if HAS_CUDA or _backend.triton_interpreted() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,V,d,scale", [
    pytest.param((3,), 17, 40, None, id="N3-V17-d40"),
    pytest.param((2, 5), 101, 64, 8.0, id="B2-T5-V101-d64-scaled"),
    pytest.param((1, 1), 7, 1300, 45.25, id="B1-T1-d1300-scaled"),
])  # fmt: skip
def test_matches_float64_reference(backend, dtype, shape, V, d, scale):
    g = torch.Generator().manual_seed(V + d)
    weight = torch.randn(V, d, generator=g).to(dtype).to(DEVICE)
    tokens = torch.randint(0, V, shape, generator=g).to(DEVICE)
    tokens.view(-1)[0] = V - 1  # the last row too
    got = embedding(tokens, weight, scale, backend=backend)
    want = weight.double()[tokens] * (1.0 if scale is None else scale)
    assert got.dtype == dtype and got.shape == (*shape, d)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    # the product is rounded once, as transformers' ``embed(ids) * normalizer``
    assert torch.equal(got, embedding_ref(tokens, weight, scale))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    w = torch.randn(5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V = 5\)"):
        embedding(torch.tensor([0, 5], device=DEVICE), w, backend=backend)
    with pytest.raises(TypeError, match="tokens must have dtype"):
        embedding(torch.tensor([0.0], device=DEVICE), w, backend=backend)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        embedding(torch.tensor([0], device=DEVICE), w, float("nan"), backend=backend)
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        embedding(torch.tensor([0], device=DEVICE), w[0], backend=backend)
