"""Data-parallel training support: ``torchrun`` environment, process group, sharding, rank-0 helpers.

``istn train`` (and :func:`istn.training.train`) runs data-parallel when it is
started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) or when the
caller has already initialised a ``torch.distributed`` process group. Each
rank then takes a disjoint, equal slice of every global batch (the global
batch is the same ``batch_indices(...)`` list as in single-process training),
DistributedDataParallel averages the gradients, and the update equals the
single-process update on the whole global batch. See ``docs/distributed.md``.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .errors import ISTNError

# Only rank 0 validates; the other ranks wait for its result in a collective.
# The default collective timeouts (10 min NCCL, 30 min gloo) could be too short
# for a long validation, so a process group that train() creates gets this one.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


class BatchSplitError(ISTNError, ValueError):
    """The global batch cannot be split into equal per-rank slices (the CLI prints it and exits 2)."""


@dataclass
class DistContext:
    """Where this process stands: ``enabled`` is False for ordinary single-process training."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    owns_group: bool = False  # True when we initialised the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (set by ``torchrun``); 1 when absent."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """``RANK`` from the environment (set by ``torchrun``); 0 when absent."""
    return _env_int("RANK", 0)


def requested_world_size() -> int:
    """The number of processes: the initialised group's size, else ``WORLD_SIZE`` (1 when absent)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def is_distributed_requested() -> bool:
    """True under ``torchrun`` with more than one process, or with an initialised process group."""
    return (dist.is_available() and dist.is_initialized()) or env_world_size() > 1


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join (or create) the process group; returns the context and this rank's device.

    ``device`` is the device resolved from the config: a CUDA device becomes
    ``cuda:LOCAL_RANK`` and the backend NCCL; CPU uses gloo. Without a
    distributed environment this returns ``(DistContext(), device)`` unchanged.
    """
    if not is_distributed_requested():
        return DistContext(), device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                               "(use --nproc_per_node <= the number of GPUs)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # NCCL collectives (and broadcast_object_list) use the current device
    owns = False
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE is {env_world_size()} but {name} is not set: start distributed "
                                   "training with torchrun (see docs/distributed.md)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=PROCESS_GROUP_TIMEOUT)
        atexit.register(_destroy_at_exit)
        owns = True
    backend = str(dist.get_backend())
    if device.type == "cpu" and backend == "nccl":
        raise RuntimeError("the process group uses NCCL but training runs on the CPU: use the gloo backend "
                           "(or --device cuda)")
    ctx = DistContext(True, dist.get_rank(), dist.get_world_size(), local_rank, backend, owns)
    return ctx, device


def _destroy_at_exit() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group now if :func:`setup` created it (it is otherwise destroyed at exit).

    ``train()`` leaves its group in place for the life of the process: under
    ``torchrun`` the rendezvous store outlives a group, and a second default
    group initialised on it would meet the first one's stale keys and hang, so
    a script that trains twice reuses the group instead.
    """
    if ctx.enabled and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def no_buffer_sync_kwargs() -> dict:
    """DistributedDataParallel keywords that skip the per-forward buffer broadcast.

    The model's buffers (identity grid, B-spline bases, half extents) are
    constants, identical on every rank; broadcasting them each step (the 3D grid
    is tens of MB) would be waste. ``forward_sync_buffers`` replaces
    ``broadcast_buffers`` in recent PyTorch.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def check_global_batch(global_batch: int, world_size: int) -> int:
    """Per-rank batch size; a global batch not divisible by the number of processes is an error."""
    if global_batch % world_size:
        raise BatchSplitError(
            f"the global batch of {global_batch} pairs cannot be split evenly over {world_size} processes: "
            f"use a batch_size (and a training set of at least batch_size pairs) divisible by {world_size}, "
            f"e.g. {max(world_size, global_batch // world_size * world_size)}"
        )
    return global_batch // world_size


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous, equal slice of a global batch (an error unless it divides evenly)."""
    per_rank = check_global_batch(len(indices), world_size)
    return list(indices[rank * per_rank : (rank + 1) * per_rank])


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (a no-op without distribution)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Average of a (detached) tensor over the ranks: the global-batch mean of per-rank batch means."""
    if not ctx.enabled:
        return value
    v = value.detach().clone()
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return v / ctx.world_size
