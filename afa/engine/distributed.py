"""One place that knows about processes: torchrun / SLURM variables, rank queries, reductions.

A single process started without any launcher is the plain case: ``world_size() == 1`` and every
helper here is a no-op. Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, with ``MASTER_ADDR``/``MASTER_PORT`` exported
by the launcher script) :func:`init_distributed` joins the process group: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_ranks_true",
    "any_rank",
    "barrier",
    "broadcast_buffers",
    "cleanup",
    "env_rank",
    "init_distributed",
    "is_main",
    "rank",
    "usable_cpus",
    "world_size",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def usable_cpus() -> int:
    """CPUs this process may run on (honours taskset, cgroups' CPU sets and SLURM bindings)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def env_rank() -> int:
    """This process's rank as the launcher set it, before (or without) joining the group."""
    return _env_int("RANK", "SLURM_PROCID", default=0)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group if a launcher started us, and pick this process's device.

    ``device`` is ``auto`` (CUDA when available), ``cuda`` or ``cpu``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but CUDA is not available; use device=cpu")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank_ = _env_int("RANK", "SLURM_PROCID", default=0)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank_))
        os.environ.setdefault("WORLD_SIZE", str(world))
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                init_method="env://", world_size=world, rank=rank_)
    if world > 1 and _HOST["group"] is None:
        # Host-side decisions (stop, bad data) agree over gloo on CPU tensors: an NCCL all-reduce
        # of a flag would wait for the device's queued work.
        _HOST["group"] = (dist.new_group(backend="gloo") if dist.get_backend() != "gloo"
                          else dist.group.WORLD)
    return DistInfo(rank=rank_, local_rank=local, world_size=world, device=dev)


_HOST = {"group": None}  # the process group for host flags (see init_distributed)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _HOST["group"] = None


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flags: list[bool]) -> list[bool]:
    """Each host flag is true on every rank if it is true on any rank (none alone).

    Ranks that must take the same branch (stop, give up on bad data) agree through this: one
    all-reduce of a CPU tensor over gloo, which never waits for a GPU.
    """
    if not _active():
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_HOST["group"] or dist.group.WORLD)
    return [v > 0 for v in t.tolist()]


def all_ranks_true(flag: torch.Tensor) -> torch.Tensor:
    """A device bool scalar that is true on every rank only if it is true on all of them.

    An all-reduce on the device (no host sync): ranks then drop or take a step together.
    """
    if not _active():
        return flag
    t = flag.to(torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t > 0


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last one each rank holds the
    statistics of its own batch; validation and checkpoints need one common set.
    """
    if _active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of scalars over ranks (for logging losses)."""
    if not _active() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))
