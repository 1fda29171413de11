"""All-to-all and all-reduce through shared memory, for workers that share a host (torchrun's processes on one
machine, a Ray node running several CPU workers).

gloo moves tensors over TCP even between the processes of one host: every byte goes through the
kernel's socket buffers, at ~1 GB/s here, and system calls took about a sixth of a 2-worker step's CPU
time (docs/benchmarks.md). Here a rank copies what it sends to each peer once into its own outbox, a file
in /dev/shm that every rank has mapped, and each peer copies its part out once (or reads it where it is:
``all_to_all_parts``); a rank's own part is copied straight across (or read where it is).

One all-to-all (or, without one, a wait on queued all-reduces: see below) is a generation g, in the same
sequence on every rank (as for any collective):

1. rank r writes each peer's segment into its outbox of set g % 2 (growing it into a new, larger file
   when too small), and each segment's byte offset and the outbox's version into the control block;
2. the barrier (``kernels/barrier.c``): r publishes g and waits until every rank has;
3. each rank maps the outboxes whose version changed and copies its segment out of every peer's
   (``all_to_all_back``), or reads it in place (``all_to_all_parts``).

Two sets of outboxes: a rank writes set g % 2 again at g + 2, after the barrier of g + 1, which no rank
reaches before it has finished reading g: what ``all_to_all_parts`` returns is valid until this rank's
next collective, and not after. Files are unlinked as soon as every rank has mapped them (the
control block after the set-up, a grown outbox after the next barrier), so a run that ends leaves
nothing in /dev/shm, and a killed one at most the outboxes it grew in its last two generations, or the
control block when killed while joining (named ``nvkg-TOKEN-*``).

All-reduces of CPU tensors ride on the next generation: ``all_reduce_async`` queues the tensor, and the
next all-to-all (or a ``wait`` or ``all_reduce`` before one, a generation of the queued all-reduces alone)
puts every queued tensor at the head of each rank's outbox, and after its barrier each rank reduces them in
rank order, so every rank holds the same bits (for two ranks gloo's sums too: a + b is b + a; a max takes a
NaN from either side, where gloo's may not). A step's two all-reduces, the divergence flags and the
relations' gradients, so travel with the gradients' all-to-all at no barrier of their own; over gloo they
went through TCP on gloo's threads, which took the CPU from the step (docs/benchmarks.md). A synchronous
``all_reduce`` is a generation of its own, as it was a collective of its own over gloo. What is reduced is
the tensor as it is at the generation, and ``wait`` is a collective (every rank waits at the same point,
as for any collective): the callers start a reduce, touch nothing of the tensor, and wait on every rank
alike; a tensor is queued once (two queued views of the same memory would reduce a reduced copy).
An outbox that cannot grow (a full /dev/shm: Docker gives 64 MB unless told otherwise) is published as
such, and from that all-to-all on every rank moves its tensors over gloo instead.
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
from itertools import accumulate, pairwise
from pathlib import Path

import torch
import torch.distributed as dist

from sharding.exchange import GroupExchange, Pending
from sharding.kernels import native

DIRECTORY = Path("/dev/shm")
MIN_CAPACITY = 1 << 20
"""Bytes of a rank's first outbox; it grows to the next power of two that holds a step's segments."""
HEAD_ALIGN = 16
"""Each all-reduce's bytes start at a multiple of this in the outbox: a tensor views its bytes only at an
offset its element size divides."""
DISABLED = -1
"""The version a rank publishes when its outbox cannot grow: every rank then goes back to gloo."""


def _create(path: Path, nbytes: int) -> None:
    """A file of ``nbytes`` zero bytes, allocated now (a tmpfs page first touched past the limit of a full
    /dev/shm would be a SIGBUS, not an error)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    finally:
        os.close(fd)


def _head_starts(sizes: list[int]) -> list[int]:
    """Where each of the all-reduces' ``sizes`` bytes start at the head of an outbox, and (last) where the
    head ends."""
    starts = [0]
    for size in sizes:
        starts.append(-(-(starts[-1] + size) // HEAD_ALIGN) * HEAD_ALIGN)
    return starts


def _map(path: Path, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


class SharedMemoryExchange(GroupExchange):
    """``GroupExchange`` whose all-to-alls and all-reduces of CPU tensors go through shared memory; build it
    with ``join``."""

    def __init__(self, control: torch.Tensor, token: str, directory: Path, timeout_s: float):
        super().__init__()
        world = self.world_size
        self.counters = control[:world]
        self.offsets = control[world : world + 2 * world * world].view(2, world, world)
        """[set, writer, reader]: where the writer's segment for the reader starts in its outbox (bytes)."""
        self.versions = control[world + 2 * world * world :].view(2, world)
        self.token, self.directory, self.timeout_s = token, directory, timeout_s
        self.generation = 0
        self.boxes: list[list[torch.Tensor | None]] = [[None] * world for _ in range(2)]
        self.mapped = [[0] * world for _ in range(2)]
        self.unlink_later: list[tuple[int, Path]] = []
        """(generation that published it, file): this rank's grown outboxes, until every rank maps them."""
        self.queued: list[tuple[torch.Tensor, str]] = []
        """(tensor, op): all-reduces started and not yet carried by a generation, in the order started."""
        self.shared = True

    @classmethod
    def join(cls, timeout_s: float, directory: Path = DIRECTORY) -> GroupExchange:
        """Collective over the default group: a ``SharedMemoryExchange`` when every rank can map a file that
        rank 0 made in ``directory`` (so they share it: checked, not assumed from host names) and the
        compiled barrier exists; else a plain ``GroupExchange``."""
        world, rank = dist.get_world_size(), dist.get_rank()
        token = [secrets.token_hex(8) if rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        path = directory / f"nvkg-{token[0]}-control"
        numel = world + 2 * world * world + 2 * world
        magic = int(str(token[0]), 16) >> 1  # rank 0 writes it; a rank that reads it back shares the file
        failed = native.library() is None
        control = None
        if rank == 0 and not failed:
            try:
                _create(path, 8 * (numel + 1))
                control = _map(path, numel + 1, torch.int64)
                control[numel] = magic
            except (OSError, RuntimeError):
                failed = True
        dist.barrier()
        if rank != 0 and not failed and path.is_file():  # torch.from_file would create a missing file
            try:
                control = _map(path, numel + 1, torch.int64)
            except (OSError, RuntimeError):
                control = None
        failed = failed or control is None or int(control[numel]) != magic
        verdict = torch.tensor([float(failed)])
        dist.all_reduce(verdict)
        if rank == 0:
            path.unlink(missing_ok=True)
        if verdict.item() or control is None:
            return GroupExchange()
        return cls(control[:numel], str(token[0]), directory, timeout_s)

    def all_to_all_rows(self, rows_WK: torch.Tensor) -> torch.Tensor:
        if not self.shared:
            return super().all_to_all_rows(rows_WK)
        ones = [1] * self.world_size
        return self.all_to_all_back(rows_WK, ones, ones)

    def all_to_all_back(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        parts = self._parts(tensor, send_counts, recv_counts)
        return super().all_to_all_back(tensor, send_counts, recv_counts) if parts is None else torch.cat(parts)

    def all_to_all_parts(
        self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> list[torch.Tensor]:
        """Without copying what arrived: each peer's rows are a view of its outbox (rewritten no sooner than
        two generations on, after a barrier this rank has not reached: hence read before the next
        collective), this rank's own a view of ``tensor``."""
        parts = self._parts(tensor, send_counts, recv_counts)
        return super().all_to_all_parts(tensor, send_counts, recv_counts) if parts is None else parts

    def _parts(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> list[torch.Tensor] | None:
        """One generation carrying ``tensor``'s segments: the rows from each rank, as views (None: the ranks
        have gone back to gloo, or an outbox could not grow, and nothing was sent)."""
        if not self.shared:
            return None
        source = tensor.detach().contiguous()
        row_shape = source.shape[1:]
        row_bytes = source.element_size() * math.prod(row_shape)
        data = source.reshape(-1).view(torch.uint8)
        starts = [start * row_bytes for start in accumulate(send_counts, initial=0)]
        which = self._generation(data, starts)
        if which is None:
            return None
        offsets = self.offsets[which, :, self.rank].tolist()
        parts = []
        for peer, count in enumerate(recv_counts):
            if peer == self.rank:  # what this rank sent itself: counted alike both ways
                first = sum(send_counts[:peer])
                parts.append(source[first : first + count])
                continue
            size = count * row_bytes
            if not size:
                parts.append(source.new_empty((count, *row_shape)))
                continue
            box = self.boxes[which][peer]
            assert box is not None, "a peer sent to this rank without publishing its outbox"
            parts.append(box[offsets[peer] : offsets[peer] + size].view(source.dtype).view(count, *row_shape))
        return parts

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self._start_reduce(tensor, op).wait()
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> Pending:
        """Queued for the next generation (see the module's note); ``wait()`` makes one if none came."""
        return self._start_reduce(tensor, "sum")

    def _start_reduce(self, tensor: torch.Tensor, op: str) -> Pending:
        usable = tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.numel() and op in ("sum", "max")
        if not self.shared or not usable:
            self._flush()  # what was started first is reduced first, on every rank alike
            if op == "sum":
                return super().all_reduce_async(tensor)
            super().all_reduce(tensor, op)
            return Pending(None)
        self.queued.append((tensor, op))
        return Pending(_Queued(self))

    def _flush(self) -> None:
        """A generation of the queued all-reduces alone."""
        if self.queued:
            self._generation(torch.empty(0, dtype=torch.uint8), [0] * (self.world_size + 1))

    def _generation(self, data: torch.Tensor, starts: list[int]) -> int | None:
        """One generation: the queued all-reduces and ``data``'s segments (bytes [starts[p], starts[p + 1])
        for peer p) written, the barrier passed, the peers' outboxes mapped and the all-reduces done. The
        outbox set to read the segments from, or None when an outbox could not grow: every rank then goes
        on over gloo (the queued all-reduces done there already)."""
        reductions, self.queued = self.queued, []
        heads = [tensor.detach().reshape(-1).view(torch.uint8) for tensor, _ in reductions]
        head_starts = _head_starts([head.numel() for head in heads])
        self.generation += 1
        which = self.generation % 2
        self._write(which, data, starts, heads, head_starts)
        self._barrier()
        # This set only: a faster rank may already have published the other set's next outbox, or its failure.
        if (self.versions[which] == DISABLED).any():
            self._give_up()
            for tensor, op in reductions:
                super().all_reduce(tensor, op)
            return None
        self._map_changed(which)
        self._reduce(which, reductions, head_starts)
        return which

    def _reduce(self, which: int, reductions: list[tuple[torch.Tensor, str]], head_starts: list[int]) -> None:
        """Each tensor reduced over the ranks' outbox heads (at ``head_starts``) in rank order, into the tensor."""
        for (tensor, op), position in zip(reductions, head_starts, strict=False):
            nbytes = tensor.numel() * tensor.element_size()
            parts = []
            for peer in range(self.world_size):
                if peer == self.rank:
                    parts.append(tensor.detach())
                    continue
                box = self.boxes[which][peer]
                assert box is not None, "a peer took part in an all-reduce without publishing its outbox"
                parts.append(box[position : position + nbytes].view(tensor.dtype).view(tensor.shape))
            total = parts[0].clone()  # summed into neither a peer's outbox nor the tensor before the end
            for part in parts[1:]:
                if op == "sum":
                    total.add_(part)
                else:
                    torch.maximum(total, part, out=total)
            tensor.detach().copy_(total)

    def close(self) -> None:
        """Unlink the files this rank made that are still linked (the run ended before the next barrier)."""
        for _, path in self.unlink_later:
            path.unlink(missing_ok=True)
        self.unlink_later.clear()

    def _write(
        self, which: int, data: torch.Tensor, starts: list[int], heads: list[torch.Tensor], head_starts: list[int]
    ) -> None:
        """``heads`` (the all-reduces' bytes, read by every peer) at ``head_starts`` at the start of this rank's
        outbox, then its segments for its peers packed, and where each segment starts."""
        sizes = [stop - start if peer != self.rank else 0 for peer, (start, stop) in enumerate(pairwise(starts))]
        box = self._outbox(which, head_starts[-1] + sum(sizes))
        if box is None:
            return
        for head, start in zip(heads, head_starts, strict=False):
            box[start : start + head.numel()].copy_(head)
        position, offsets = head_starts[-1], []
        for peer, size in enumerate(sizes):
            offsets.append(position)
            if size:
                box[position : position + size].copy_(data[starts[peer] : starts[peer] + size])
            position += size
        self.offsets[which, self.rank] = torch.tensor(offsets, dtype=torch.int64)

    def _outbox(self, which: int, need: int) -> torch.Tensor | None:
        """This rank's outbox of set ``which`` holding at least ``need`` bytes, grown into a new file if it is
        smaller; None when it cannot grow (published as DISABLED)."""
        box = self.boxes[which][self.rank]
        if need == 0 or (box is not None and box.numel() >= need):
            return box
        capacity = max(MIN_CAPACITY, 1 << (need - 1).bit_length())
        version = self.mapped[which][self.rank] + 1
        path = self._path(self.rank, which, version)
        try:
            _create(path, capacity)
            box = _map(path, capacity, torch.uint8)
        except (OSError, RuntimeError) as err:
            path.unlink(missing_ok=True)
            warnings.warn(
                f"rank {self.rank}: cannot grow its shared-memory outbox to {capacity:,} bytes in {self.directory} "
                f"({err}); the all-to-alls and all-reduces go over gloo from here (give the workers a larger /dev/shm)",
                stacklevel=3,
            )
            self.versions[which, self.rank] = DISABLED
            return None
        self.boxes[which][self.rank] = box
        self.mapped[which][self.rank] = version
        self.versions[which, self.rank] = version
        self.unlink_later.append((self.generation, path))
        return box

    def _barrier(self) -> None:
        lib = native.loaded()
        ptr, world = self.counters.data_ptr(), self.world_size
        if lib.shm_barrier(ptr, world, self.rank, self.generation, self.timeout_s):
            behind = [r for r, reached in enumerate(self.counters.tolist()) if reached < self.generation]
            raise RuntimeError(
                f"rank {self.rank}: waited {self.timeout_s:.0f} s in shared-memory collective {self.generation} "
                f"for rank(s) {behind} (sharding.timeout_minutes)"
            )
        # Every rank has passed the barrier after the one that published these files: all have mapped them.
        done = [path for published, path in self.unlink_later if published < self.generation]
        for path in done:
            path.unlink(missing_ok=True)
        self.unlink_later = [item for item in self.unlink_later if item[0] >= self.generation]

    def _map_changed(self, which: int) -> None:
        for peer, version in enumerate(self.versions[which].tolist()):
            if version > 0 and version != self.mapped[which][peer]:
                path = self._path(peer, which, version)
                self.boxes[which][peer] = _map(path, path.stat().st_size, torch.uint8)
                self.mapped[which][peer] = version

    def _give_up(self) -> None:
        self.shared = False
        self.close()
        self.boxes = [[None] * self.world_size for _ in range(2)]

    def _path(self, rank: int, which: int, version: int) -> Path:
        return self.directory / f"nvkg-{self.token}-{rank}-{which}-{version}"


def join_exchange(shared_memory: bool, timeout_minutes: float) -> GroupExchange:
    """The exchange of a process in an initialised group: all-to-alls and all-reduces through shared memory
    where asked for, the group is gloo's (NCCL moves CUDA tensors itself) and every rank shares this host's
    /dev/shm."""
    if shared_memory and dist.get_backend() == "gloo":
        return SharedMemoryExchange.join(60.0 * timeout_minutes)
    return GroupExchange()


class _Queued:
    """The wait of a queued all-reduce: a generation of its own unless one has carried it."""

    def __init__(self, exchange: SharedMemoryExchange) -> None:
        self.exchange = exchange

    def wait(self) -> None:
        self.exchange._flush()
