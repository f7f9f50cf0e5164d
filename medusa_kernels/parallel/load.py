"""Read only this rank's slices of a safetensors checkpoint.

``safe_open(...).get_slice(name)[rows]`` / ``[:, cols]`` reads the slice out of the file's memory
map without the whole tensor: a rank never holds a full split tensor in its own memory. What it
holds is exactly its slices (``ReadStats`` counts them); what the kernel pages in from the files
is its row slices (about 1/N of those tensors) and, for the column slices of o_proj and
down_proj, up to the whole tensor through readahead, as page cache that the ranks of a node
share (each file is read from disk once), not per-process memory.

Heads stored as ``medusa_lm_head.pt`` cannot be sliced on disk: load them whole and cut them
with ``Shard.take``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from .layout import TPLayout, VocabLayout


@dataclass
class ReadStats:
    """Bytes one rank copied out of the files (``read``) against the bytes of the full tensors
    they came from (``full``); ``split_*`` counts the split tensors alone."""

    tensors: int = 0
    read: int = 0
    full: int = 0
    split_read: int = 0
    split_full: int = 0

    def add(self, local: torch.Tensor, full_numel: int, split: bool) -> None:
        size = local.element_size()
        self.tensors += 1
        self.read += local.numel() * size
        self.full += full_numel * size
        if split:
            self.split_read += local.numel() * size
            self.split_full += full_numel * size


def iter_shards(
    files: Iterable[str | os.PathLike],
    layout: TPLayout | VocabLayout,
    keep: Callable[[str], bool] | None = None,
    stats: ReadStats | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, this rank's tensor) for every tensor of ``files`` that ``keep``
    accepts, one at a time (copy each to its device before asking for the next to keep the
    host's peak at one tensor). Tensors are CPU, contiguous, the file's dtype, shaped
    ``layout.shard(name, shape).local_shape(shape)``, and own their memory (no view of the
    file). A tensor no rule covers, or whose shape does not fit the layout, raises a
    ValueError naming it; a name in two files too, and an unreadable file (naming it).
    ``layout``: a ``TPLayout``, or a ``VocabLayout`` for Medusa heads alone."""
    seen = {}
    for path in files:
        path = os.fspath(path)
        try:
            f = safe_open(path, framework="pt")
            names = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        with f:
            for name in names:
                if keep is not None and not keep(name):
                    continue
                if name in seen:
                    raise ValueError(f"tensor {name} is in both {seen[name]} and {path}")
                seen[name] = path
                try:
                    view = f.get_slice(name)
                    shape = tuple(view.get_shape())
                    shard = layout.shard(name, shape)
                    if shard.replicated:
                        local = f.get_tensor(name).clone()
                    else:
                        lead = (slice(None),) * shard.dim
                        parts = [view[lead + (slice(start, stop),)] for start, stop in shard.ranges]
                        local = torch.cat(parts, dim=shard.dim)  # a copy: owns its memory
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{path}: tensor {name} is not readable ({e})") from None
                if stats is not None:
                    stats.add(local, _numel(shape), split=not shard.replicated)
                yield name, local


def read_shards(
    files: Iterable[str | os.PathLike],
    layout: TPLayout,
    keep: Callable[[str], bool] | None = None,
    stats: ReadStats | None = None,
) -> dict[str, torch.Tensor]:
    """``iter_shards`` gathered into a dict (name -> this rank's tensor)."""
    return dict(iter_shards(files, layout, keep, stats))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
