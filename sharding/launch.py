"""Joining the workers of a run: the process group torchrun or Ray Train prepared, or none at all.

torchrun exports RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and leaves ``init_process_group`` to us;
Ray Train creates the group itself before the training function runs. A plain process is world size 1
and needs no group. The backend follows the worker's device: NCCL for CUDA, gloo for the CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist

from sharding.exchange import Exchange, LocalExchange
from sharding.shm import join_exchange

DeviceChoice = Literal["auto", "cpu", "cuda"]
Backend = Literal["auto", "gloo", "nccl"]


def resolve_device(
    requested: DeviceChoice, cuda_devices: int, local_rank: int, assigned: int | None = None
) -> torch.device:
    """The device a worker trains on, from what was asked (``train.device``), how many CUDA devices it
    sees and its rank on its host: a pure function, so every case is tested without a GPU.

    ``assigned`` is the CUDA index a launcher gave this worker (Ray Train's ``get_device``, which knows
    the GPUs Ray assigned it); without one a worker that sees one device takes it, and one that sees
    several (torchrun shows all of a host's) takes the one at its LOCAL_RANK."""
    if requested == "cpu":
        return torch.device("cpu")
    if cuda_devices == 0:
        if requested == "cuda":
            raise ValueError("train.device=cuda: this worker sees no CUDA device (train.device=auto falls back to cpu)")
        return torch.device("cpu")
    index = assigned if assigned is not None else (0 if cuda_devices == 1 else local_rank)
    if not 0 <= index < cuda_devices:
        raise ValueError(
            f"CUDA device {index} (LOCAL_RANK={local_rank}): this worker sees {cuda_devices}; "
            "start at most one worker per GPU on a host"
        )
    return torch.device("cuda", index)


def choose_device(requested: DeviceChoice = "auto", assigned: int | None = None) -> torch.device:
    """``resolve_device`` for this process: the CUDA devices it sees and its LOCAL_RANK."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return resolve_device(requested, cuda_devices, int(os.environ.get("LOCAL_RANK", "0")), assigned)


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


def resolve_backend(requested: Backend, device: torch.device) -> str:
    """The process group's backend for a worker whose tensors live on ``device``: NCCL for CUDA, gloo for
    the CPU (``auto``), or what was asked if it can move them (NCCL moves only CUDA tensors)."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ValueError(f"sharding.backend=nccl: NCCL moves CUDA tensors, and this worker trains on {device}")
    return requested


@contextmanager
def process_group(
    backend: Backend = "auto",
    device: torch.device | None = None,
    timeout_minutes: float = 60.0,
    shared_memory: bool = True,
) -> Iterator[Exchange]:
    """The exchange for this process: an existing group (Ray Train), a new one (torchrun), or local.

    ``device`` is where the worker's tensors live (default: ``choose_device()``); ``timeout_minutes`` is
    how long a collective waits for the slowest rank (torch's default, 10 minutes, is shorter than a rank
    converting a dataset or writing a Freebase shard while the others wait at a barrier);
    ``shared_memory``: gloo's all-to-alls go through /dev/shm when every rank shares it (sharding/shm.py)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.closing(join_exchange(shared_memory, timeout_minutes)) as exchange:
            yield exchange
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield LocalExchange()
        return
    device = device if device is not None else choose_device()
    chosen = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        with contextlib.closing(join_exchange(shared_memory, timeout_minutes)) as exchange:
            yield exchange
    finally:
        dist.destroy_process_group()
