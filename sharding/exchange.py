"""The collectives the sharded tables and the 1-vs-all likelihood use, behind one small interface.

``LocalExchange`` is world size 1 (every collective is the identity), so a plain run goes through the
same code as a distributed one without a process group. ``GroupExchange`` runs them on the default
torch.distributed group: NCCL on GPUs, gloo on CPU. All-to-all uses ``all_to_all_single`` with uneven
splits (the list form fails on gloo with uneven sizes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sharding.kernels import native


class Pending:
    """A collective in flight (None: already done). ``wait`` is itself collective where the exchange defers
    the work to it (the shared-memory all-reduce): every rank waits at the same point."""

    def __init__(self, work) -> None:
        self.work = work

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class LocalExchange:
    rank = 0
    world_size = 1

    def all_to_all_rows(self, rows_WK: torch.Tensor) -> torch.Tensor:
        """Row r goes to rank r; row r of the result came from rank r (small per-peer headers)."""
        return rows_WK

    def all_to_all_back(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Send ``send_counts[r]`` consecutive rows to rank r; receive ``recv_counts[r]`` from rank r."""
        return tensor

    def all_to_all_parts(
        self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> list[torch.Tensor]:
        """``all_to_all_back``'s rows as they came, one tensor per source rank, for a reader that needs them
        in no one block. They may be views of memory the exchange reuses (``SharedMemoryExchange``): read
        them before this rank's next collective, and do not write to them."""
        return [tensor]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> Pending:
        """Start a sum all-reduce in place; leave ``tensor`` alone until ``wait()`` on the result, on every rank
        alike (the shared-memory exchange reduces it at its next collective or at that wait)."""
        return Pending(None)

    def all_gather(self, tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Rows of every rank concatenated in rank order, and each rank's row count."""
        return tensor, [len(tensor)]

    def barrier(self) -> None:
        pass


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class GroupExchange:
    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_to_all_rows(self, rows_WK: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rows_WK)
        dist.all_to_all_single(out, rows_WK.contiguous())
        return out

    def all_to_all_back(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
        dist.all_to_all_single(out, tensor.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts)
        return out

    def all_to_all_parts(
        self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> list[torch.Tensor]:
        return list(self.all_to_all_back(tensor, send_counts, recv_counts).split(recv_counts))

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor, op=_OPS[op])
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> Pending:
        return Pending(dist.all_reduce(tensor, async_op=True))

    def all_gather(self, tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        size = torch.tensor([len(tensor)], dtype=torch.int64, device=tensor.device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        counts = [int(s) for s in sizes]
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        slots = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(slots, padded)
        return torch.cat([slot[:count] for slot, count in zip(slots, counts, strict=True)]), counts

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Release what the exchange holds beyond the process group (``SharedMemoryExchange``'s files)."""


Exchange = LocalExchange | GroupExchange


class _AllGather(torch.autograd.Function):
    """All-gather rows; the backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, exchange: Exchange, counts_out: list[int]) -> torch.Tensor:
        gathered, counts = exchange.all_gather(tensor)
        counts_out.extend(counts)
        ctx.exchange, ctx.counts = exchange, counts
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = ctx.exchange.all_reduce(grad.contiguous().clone())
        start = sum(ctx.counts[: ctx.exchange.rank])
        return total[start : start + ctx.counts[ctx.exchange.rank]], None, None


def all_gather_rows(tensor: torch.Tensor, exchange: Exchange) -> tuple[torch.Tensor, int]:
    """Differentiable all-gather, and where this rank's rows start in the result."""
    if exchange.world_size == 1:
        return tensor, 0
    counts: list[int] = []
    gathered = _AllGather.apply(tensor, exchange, counts)
    return gathered, sum(counts[: exchange.rank])


class _LogPartition(torch.autograd.Function):
    """log sum_c exp(logit_c) over the candidates of every rank (vocabulary-parallel cross-entropy):
    all-reduce the max, then the sum of exponentials. The backward all-reduces the incoming gradient,
    since every rank's loss depends on every rank's candidate logits, and takes the softmax from the
    saved logits and log Z in one pass (``native.softmax_scale``)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        top = exchange.all_reduce(logits.max(dim=-1).values.clone(), "max") if logits.shape[-1] else None
        if top is None:
            top = exchange.all_reduce(logits.new_full(logits.shape[:-1], -torch.inf), "max")
        total = exchange.all_reduce(native.row_sum_exp(logits, top))
        log_z = top + torch.log(total)
        ctx.save_for_backward(logits, log_z)
        ctx.exchange = exchange
        return log_z

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, log_z = ctx.saved_tensors
        grad = ctx.exchange.all_reduce(grad.contiguous().clone())
        return native.softmax_scale(logits, log_z, grad), None


def sharded_log_partition(logits_BN: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """log Z [B] over candidates split across ranks; every rank passes its own candidates' logits."""
    return _LogPartition.apply(logits_BN, exchange)
