"""Joining the workers of a run: the process group torchrun or Ray Train prepared, or none at all.

torchrun exports RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and leaves ``init_process_group`` to us;
Ray Train creates the group itself before the training function runs. A plain process is world size 1
and needs no group. The backend is NCCL when CUDA is present, gloo otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist

from sharding.exchange import Exchange, GroupExchange, LocalExchange

DeviceChoice = Literal["auto", "cpu", "cuda"]
Backend = Literal["auto", "gloo", "nccl"]


def choose_device(requested: DeviceChoice = "auto") -> torch.device:
    """``auto``: this worker's GPU (Ray Train shows each worker only its own; torchrun shows all, so
    LOCAL_RANK picks one), else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if torch.cuda.device_count() == 1:
        return torch.device("cuda", 0)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def pin_local_cpus() -> list[int] | None:
    """When several workers share a host (LOCAL_WORLD_SIZE > 1), give this one an equal, disjoint slice of
    the CPUs the process may use, for every thread it has (the gloo and reader threads included) and will
    start, so a worker's rows, the rows it serves and its communication stay in one core's cache instead of
    migrating. Returns the slice, or None."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world <= 1 or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < local_world:
        return None
    share = len(cpus) // local_world
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    mine = cpus[local_rank * share : (local_rank + 1) * share]
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(thread), mine)
    return mine


def choose_backend(requested: Backend = "auto") -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def process_group(backend: Backend = "auto") -> Iterator[Exchange]:
    """The exchange for this process: an existing group (Ray Train), a new one (torchrun), or local."""
    if dist.is_available() and dist.is_initialized():
        yield GroupExchange()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield LocalExchange()
        return
    chosen = choose_backend(backend)
    if chosen == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=chosen)
    try:
        yield GroupExchange()
    finally:
        dist.destroy_process_group()
