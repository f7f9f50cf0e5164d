"""This rank's place in a tensor-parallel group, and the collectives the decoder calls.

``TPGroup(rank, world, group)`` is a small frozen value. ``SINGLE`` (world 1, no group) is one
process: every collective returns its input untouched without calling torch.distributed, so the
model calls ``tp.all_reduce(x)`` unconditionally and a single-device run pays nothing.

``init_tp()`` makes one: it wraps a process group the caller already has (a TP subgroup of a
larger mesh, or the default group), or, under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment, with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), creates the
default group itself: NCCL when this rank's device is CUDA (``cuda:LOCAL_RANK``), gloo on CPUs.
Without either it returns ``SINGLE``.

Collectives are synchronous (stream-ordered on CUDA), shapes static, no host reads: a decode
step that calls them can be captured in a CUDA graph where the backend allows it (NCCL does,
once its communicator exists: ``init_tp`` creates it eagerly via ``device_id``; run one
collective before capturing). gloo runs eagerly.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """out [world * x.numel()] <- every rank's x, in rank order (``all_gather_single`` from
    torch 2.13, ``all_gather_into_tensor`` before; gloo wants the flat output)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


@dataclass(frozen=True)
class TPGroup:
    """Rank ``rank`` of ``world`` in the process group ``group`` (None only when world is 1).

    ``owned``: ``init_tp`` created the default process group for this object; ``close()``
    destroys it then and only then.
    """

    rank: int = 0
    world: int = 1
    group: dist.ProcessGroup | None = field(default=None, repr=False)
    owned: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self):
        for name in ("rank", "world"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TPGroup.{name} must be an int, got {value!r}")
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"TPGroup needs world >= 1 and 0 <= rank < world, got rank "
                             f"{self.rank}, world {self.world}")
        if self.world > 1 and self.group is None:
            raise ValueError(f"TPGroup with world {self.world} needs its process group, got None")

    @property
    def parallel(self) -> bool:
        """More than one rank: the collectives communicate."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x`` (world 1: ``x`` untouched).
        x: any shape, contiguous (as NCCL needs)."""
        if self.world == 1:
            return x
        if not x.is_contiguous():
            raise ValueError(f"all_reduce needs a contiguous tensor, got shape "
                             f"{tuple(x.shape)} with strides {x.stride()}")
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (same shape and dtype on every rank), stacked in rank order:
        x [*S] -> [world, *S] (world 1: a view of ``x``)."""
        if self.world == 1:
            return x.unsqueeze(0)
        out = x.new_empty(self.world * x.numel())
        _all_gather_flat(out, x.contiguous().view(-1), self.group)
        return out.view(self.world, *x.shape)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank, in place; returns ``x`` (world 1: untouched)."""
        if self.world == 1:
            return x
        dist.broadcast(x, dist.get_global_rank(self.group, src), group=self.group)
        return x

    @property
    def backend(self) -> str | None:
        """The process group's backend ("nccl", "gloo"; None for world 1)."""
        return None if self.world == 1 else str(dist.get_backend(self.group))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def close(self, sync: bool = True) -> None:
        """Destroy the default process group if ``init_tp`` created it for this object (see
        ``destroy_group``; ``sync=False`` on an error path, where a peer may never arrive)."""
        if self.owned:
            destroy_group(sync)


@contextlib.contextmanager
def group_ending(owned: bool = True):
    """Run the block, then destroy the default process group when ``owned``: after a barrier
    when the block finished, at once when it raised (a peer may never reach the barrier)."""
    try:
        yield
    except BaseException:
        if owned:
            destroy_group(sync=False)
        raise
    if owned:
        destroy_group()


def destroy_group(sync: bool = True) -> None:
    """Destroy the default process group, if any; with ``sync``, after a barrier, so that no
    rank tears its connections down while a peer is still finishing (gloo aborts a rank whose
    peer hangs up under it: "terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    try:
        if sync and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


SINGLE = TPGroup()


def rank_device(device: str | torch.device | None = None) -> torch.device:
    """This rank's device: None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU;
    a bare "cuda" becomes ``cuda:LOCAL_RANK`` (LOCAL_RANK from torchrun, 0 without it); any
    other device is kept as given."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    return device


def launched_world() -> int:
    """``WORLD_SIZE`` from the environment (torchrun sets it; 1 without it)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an int, got {raw!r}") from None


def check_device(tp: TPGroup, device: torch.device) -> None:
    """The tensors of a tensor-parallel model must live where its backend communicates: NCCL
    on CUDA, gloo on CPUs (gloo on CUDA tensors is refused: it cannot run inside a captured
    CUDA graph, and NCCL is the backend for GPUs). A ValueError naming both otherwise."""
    backend = tp.backend
    if backend is None:
        return
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group's backend is nccl, which needs CUDA tensors; the "
                         f"model's device is {device}: use a cuda device or a gloo group")
    if backend == "gloo" and device.type == "cuda":
        raise ValueError(f"the process group's backend is gloo but the model's device is "
                         f"{device}: tensor parallelism on GPUs runs on nccl (init_tp picks it "
                         f"for a cuda device)")
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        raise ValueError(f"rank {tp.rank}'s model is on {device} but its current CUDA device is "
                         f"cuda:{torch.cuda.current_device()}: one GPU per rank, "
                         f"cuda:LOCAL_RANK (rank_device)")


def sync_random_state(tp: TPGroup, device: torch.device) -> None:
    """Give every rank rank 0's torch random state (the CPU generator's, and ``device``'s when
    it is CUDA): unseeded sampling then draws the same numbers on every rank, so the ranks
    accept the same tokens. Ranks seeded alike keep their state. World 1: nothing."""
    if tp.world == 1:
        return
    comm = device if tp.backend == "nccl" else torch.device("cpu")
    state = tp.broadcast(torch.get_rng_state().to(comm))
    torch.set_rng_state(state.cpu())
    if device.type == "cuda":
        state = tp.broadcast(torch.cuda.get_rng_state(device).to(comm))
        torch.cuda.set_rng_state(state.cpu(), device)


def init_tp(
    group: dist.ProcessGroup | None = None,
    *,
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout: datetime.timedelta | None = None,
) -> TPGroup:
    """This process's ``TPGroup``.

    - ``group`` given: that group (this process's rank in it, its size).
    - torch.distributed already initialised: the default group.
    - ``WORLD_SIZE`` > 1 in the environment (torchrun): creates the default group from the
      environment (``env://``): ``backend`` or NCCL when ``rank_device(device)`` is CUDA (bound
      to it with ``device_id``, which creates the communicator now), gloo otherwise; the result
      owns the group (``close()`` destroys it).
    - otherwise ``SINGLE``.
    """
    if group is not None:
        world = dist.get_world_size(group)
        return TPGroup(dist.get_rank(group), world, group if world > 1 else None)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return TPGroup(dist.get_rank(), world, dist.group.WORLD if world > 1 else None)
    if launched_world() <= 1:
        return SINGLE
    missing = [name for name in TORCHRUN_ENV if name not in os.environ and name != "LOCAL_RANK"]
    if missing:
        raise ValueError(f"WORLD_SIZE = {os.environ['WORLD_SIZE']} but the environment lacks "
                         f"{', '.join(missing)}: launch with torchrun, or set all of "
                         f"{', '.join(TORCHRUN_ENV)}")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dev = rank_device(device)
    kwargs = {} if timeout is None else {"timeout": timeout}
    if dev.type == "cuda":
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK = {dev.index} but this node has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), **kwargs)
    world = dist.get_world_size()
    return TPGroup(dist.get_rank(), world, dist.group.WORLD, owned=True)
