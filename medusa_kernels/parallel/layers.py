"""The one layer rule tensor parallelism adds: a row-parallel linear reduces before its bias.

Column-parallel layers (q/k/v, gate/up, each on this rank's rows) are plain ``F.linear`` with
the rank's weight slice and bias slice: no communication. Row-parallel layers (o_proj,
down_proj: this rank's columns) give partial sums that an all-reduce completes; their bias is
held whole on every rank and added once, after the reduction.
"""

from __future__ import annotations

import torch

from ..ops._linear import linear
from .group import TPGroup


def row_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp: TPGroup,
    stream: bool | None = None,
) -> torch.Tensor:
    """``x @ full_weight.T + bias`` from this rank's columns: x [*S, in / world] (this rank's
    part of the input features), weight [out, in / world], bias [out] (whole) or None ->
    [*S, out], the same on every rank. World 1: ``F.linear(x, weight, bias)``, unchanged (each
    product through ``ops._linear.linear``: on a CPU, its fast call at a few rows; ``stream``
    as there)."""
    if tp.world == 1:
        return linear(x, weight, bias, stream)
    out = tp.all_reduce(linear(x, weight, stream=stream))
    return out if bias is None else out + bias
