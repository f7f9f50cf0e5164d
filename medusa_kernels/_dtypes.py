"""The dtype names every entry point takes: ``load_model(dtype=)`` and every command's
``--dtype`` (``generate``, ``train``, ``bench``) share this one table and this one error.

No torch import at module level (the CLIs check their flags before torch loads).
"""

from __future__ import annotations

# name -> the torch attribute it stands for
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}  # fmt: skip
DTYPE_CHOICES = sorted(DTYPE_NAMES)


def dtype_error(name: str, value, torch_dtype_too: bool = False) -> str:
    """The message for a dtype that is not one of the names (``name``: the argument or flag)."""
    alt = " or a floating torch.dtype" if torch_dtype_too else ""
    return f"{name} must be one of {DTYPE_CHOICES}{alt}, got {value!r}"


def dtype_flag(value: str) -> str:
    """argparse ``type=`` of a ``--dtype`` flag: the canonical name, or argparse's one-line
    error ``argument --dtype: must be one of [...], got 'x'``."""
    import argparse

    if value not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(dtype_error("", value).lstrip())
    return DTYPE_NAMES[value]


def to_torch_dtype(value, name: str = "dtype"):
    """None -> None; a name of ``DTYPE_NAMES`` or a floating ``torch.dtype`` -> the torch.dtype;
    anything else: a ValueError (an unknown name) or TypeError naming ``name``."""
    import torch

    if value is None:
        return None
    if isinstance(value, str):
        if value not in DTYPE_NAMES:
            raise ValueError(dtype_error(name, value, torch_dtype_too=True))
        return getattr(torch, DTYPE_NAMES[value])
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    raise TypeError(f"{name} must be None, a floating torch.dtype or one of {DTYPE_CHOICES}, "
                    f"got {value!r}")
