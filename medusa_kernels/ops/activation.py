"""Gated activation of the fused gate|up projection output, in one launch.

For each row of gate_up [..., 2I] (gate the first half, up the second)::

    out[..., i] = act(gate_up[..., i]) * gate_up[..., I + i]          i < I

in gate_up's dtype, as transformers computes ``act_fn(gate_proj(x)) * up_proj(x)``: act rounded to
the dtype, then the product. ``ACTIVATIONS`` is transformers' ACT2FN (the same formulas) by the
config's ``hidden_act`` name; the decoder takes its table from here.

Triton kernel: grid (rows, cdiv(I, BLOCK_I)); act in fp32, rounded to the dtype before the
product (so fp16/bf16 results equal the reference's up to the activation's last fp32 bit). It
covers ``TRITON_ACTIVATIONS`` (SiLU, the erf and tanh GELUs, quick GELU, ReLU, ReLU^2); the
tanh GELUs use ``0.5 (1 + tanh(y)) = sigmoid(2 y)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import FLOAT_DTYPES, HAS_TRITON, check_tensor
from .rms_norm import leading3, pick_impl

if HAS_TRITON:
    import triton
    import triton.language as tl


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


ACTIVATIONS = {  # transformers' ACT2FN, the same formulas
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": _gelu_tanh, "gelu_accurate": _gelu_tanh, "gelu_python_tanh": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1 + 0.044715 * x * x))),
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10, 10),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu, "relu2": lambda x: torch.square(F.relu(x)), "relu6": F.relu6,
    "leaky_relu": F.leaky_relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "linear": lambda x: x, "mish": F.mish, "hardswish": F.hardswish,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}  # fmt: skip (hf_config.ACTIVATIONS names the same set: test_config_audit checks it)

# name -> the kernel's ACT code: 0 SiLU, 1 erf GELU, 2 tanh GELU, 3 gelu_fast, 4 quick GELU,
# 5 ReLU, 6 ReLU^2
TRITON_ACTIVATIONS = {
    "silu": 0, "swish": 0, "gelu": 1, "gelu_python": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2,
    "gelu_accurate": 2, "gelu_python_tanh": 2, "gelu_fast": 3, "quick_gelu": 4, "relu": 5,
    "relu2": 6,
}  # fmt: skip
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gated_act_ref(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """Plain PyTorch (the ground truth and the ``torch`` backend): ``act(gate) * up`` in
    gate_up's dtype. gate_up [..., 2I] -> [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


def check_gated_act_args(gate_up, act) -> None:
    """Validate gate_up (float, [..., 2I], last dim contiguous) and the activation name."""
    check_tensor("gate_up", gate_up, dtypes=FLOAT_DTYPES)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2 or gate_up.shape[-1] == 0:
        raise ValueError(
            f"gate_up must be [..., 2I] (gate | up) with an even last dim >= 2, got shape "
            f"{tuple(gate_up.shape)}"
        )
    if gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must have a contiguous last dim, got strides {gate_up.stride()}")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")


if HAS_TRITON:

    @triton.jit
    def _sigmoid(x):
        """1 / (1 + exp(-x)) from exp(-|x|): no overflow at any x."""
        e = tl.exp(-tl.abs(x))
        return tl.where(x >= 0, 1.0, e) / (1.0 + e)

    @triton.jit
    def _gated_act_kernel(
        X_ptr, Y_ptr,
        I, A1, A2, x_s0, x_s1, x_s2,
        ACT: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        """Program (row r = (i0, i1, i2), column block j): Y[r, j-block] (Y contiguous)."""
        i_r = tl.program_id(0).to(tl.int64)
        i2 = i_r % A2
        i1 = (i_r // A2) % A1
        i0 = i_r // A2 // A1
        o_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        m_i = o_i < I
        p_x = X_ptr + i0 * x_s0 + i1 * x_s1 + i2 * x_s2 + o_i
        g = tl.load(p_x, mask=m_i, other=0.0).to(tl.float32)
        u = tl.load(p_x + I, mask=m_i, other=0.0).to(tl.float32)
        if ACT == 0:
            a = g * _sigmoid(g)
        elif ACT == 1:
            a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        elif ACT == 2:
            a = g * _sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
        elif ACT == 3:
            a = g * _sigmoid(2.0 * g * 0.7978845608 * (1.0 + 0.044715 * g * g))
        elif ACT == 4:
            a = g * _sigmoid(1.702 * g)
        elif ACT == 5:
            a = tl.maximum(g, 0.0)
        else:
            a = tl.maximum(g, 0.0)
            a = a * a
        dtype = Y_ptr.dtype.element_ty
        b_y = a.to(dtype).to(tl.float32) * u
        tl.store(Y_ptr + i_r * I + o_i, b_y.to(dtype), mask=m_i)


def gated_act_triton(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """Launcher (arguments as ``gated_act``, already checked). Returns a new contiguous
    [..., I] tensor in gate_up's dtype; no host sync."""
    if act not in TRITON_ACTIVATIONS:
        raise ValueError(
            f"gated_act: the triton backend supports act in {sorted(TRITON_ACTIVATIONS)}, got "
            f"{act!r} (use backend='torch' or 'auto')"
        )
    if gate_up.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"gated_act: the triton backend supports gate_up dtypes "
            f"{[str(d) for d in TRITON_DTYPES]}, got {gate_up.dtype} (use backend='torch')"
        )
    inter = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    x, sizes, strides = leading3(gate_up)
    block = min(1024, triton.next_power_of_2(inter))
    grid = (sizes[0] * sizes[1] * sizes[2], triton.cdiv(inter, block))
    _gated_act_kernel[grid](
        x, out, inter, sizes[1], sizes[2], *strides,
        ACT=TRITON_ACTIVATIONS[act], BLOCK_I=block, num_warps=4 if block >= 512 else 1,
    )  # fmt: skip
    return out


def triton_supports(gate_up: torch.Tensor, act: str) -> bool:
    """Whether "auto" takes the Triton kernel: an activation it covers, fp16/bf16/fp32."""
    return act in TRITON_ACTIVATIONS and gate_up.dtype in TRITON_DTYPES


_IMPLS = {"torch": gated_act_ref}
if HAS_TRITON:
    _IMPLS["triton"] = gated_act_triton


@torch.library.custom_op("medusa_kernels::gated_act", mutates_args=())
def _gated_act_op(gate_up: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    return _IMPLS[backend](gate_up, act).contiguous()


@_gated_act_op.register_fake
def _(gate_up, act, backend):
    shape = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)


def gated_act(gate_up: torch.Tensor, act: str, backend: str = "auto") -> torch.Tensor:
    """``act(gate) * up`` of the fused gate|up projection output, in one launch.

    Args:
        gate_up: [..., 2I] float, gate the first I columns, up the last I; last dim
            contiguous (other strides free).
        act: a key of ``ACTIVATIONS`` (the config's ``hidden_act``).
        backend: "auto" (Triton on CUDA tensors for ``TRITON_ACTIVATIONS`` in fp16/bf16/fp32,
            the reference elsewhere), "torch" (the reference) or "triton" (other activations
            raise a ValueError).
    Returns:
        [..., I] contiguous, in gate_up's dtype.

    Eager calls run the implementation directly; torch.compile traces the registered custom op.
    Inputs that require grad take the reference (the kernel has no backward).

    Example: ``h = w2(gated_act(w13(x), cfg.hidden_act))``.
    """
    check_gated_act_args(gate_up, act)
    impl = pick_impl("gated_act", backend, gate_up.device, _IMPLS, triton_supports(gate_up, act),
                     gate_up)  # fmt: skip
    if not torch.compiler.is_compiling():  # eager: no dispatcher hop (the op is for tracing)
        return _IMPLS[impl](gate_up, act).contiguous()
    return _gated_act_op(gate_up, act, impl)
