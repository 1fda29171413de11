"""Gaussian embedding tables: rows of [mean | logvar] plus the optimiser state of those rows.

A row keeps its mean and log-variance side by side in one vector, so gathering, updating and sending a
row is one operation, not two. ``ShardedTable`` holds the rows of one rank's range (all rows at world
size 1) and the row optimiser state for them:

  * ``encode(ids, encoder)``: an encoding of the rows of any global ids (the reparameterised sample and
    its KL in training, the rows themselves in ``lookup``), as a leaf the loss can differentiate. Ids
    are bucketed by owner and exchanged with an all-to-all, the owners encode their rows and send the
    result back (TorchRec's row-wise input-dist -> lookup -> output-dist, with the encoding moved to
    the owner so that fewer bytes travel).
  * ``local()``: this rank's own rows, for what touches every row (the 1-vs-all candidates, the LIM KL).
  * ``collect(...)``: the gradients of those leaves travel back the same routes; the owner takes them
    through its encoder and sums what it got per row. ``step(...)`` then lets the row optimiser update only those rows.

``ReplicatedTable`` (relations: small) keeps every row on every rank and all-reduces its gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import torch

from sharding import memory, rng
from sharding.exchange import Exchange, Pending
from sharding.gaussian import Encoder, Gaussian, StreamSample, identity, stream_sample_of
from sharding.kernels import native
from sharding.plan import RowPlan
from sharding.row_optim import RowOptimizerName, build_row_optimizer


def init_rows(
    global_rows: int,
    dim: int,
    row_range: tuple[int, int],
    *,
    variational: bool,
    init_std: float | None,
    init_logvar: float | None,
    seed: int,
    block_rows: int,
    device: torch.device,
    roles: int = 1,
) -> torch.Tensor:
    """Means ~ N(0, std^2), std None meaning Xavier/Glorot sqrt(2 / (rows + d)); logvar log(1/d), d being
    the width of one embedding: dim, or dim / roles when a row holds ``roles`` embeddings side by side.

    Drawn per block of rows (``rng.block_normal``), so a row's initial value does not depend on how the
    table is sharded.
    """
    width = dim // roles
    std = math.sqrt(2.0 / (global_rows + width)) if init_std is None else init_std
    # On huge pages where the OS allows: a step reads its rows at random (sharding/memory.py).
    table = memory.empty((row_range[1] - row_range[0], 2 * dim if variational else dim), device=device)
    torch.mul(rng.block_normal(row_range, dim, (seed, rng.INIT), block_rows, device), std, out=table[:, :dim])
    if variational:
        table[:, dim:] = math.log(1.0 / width) if init_logvar is None else init_logvar
    return table


@dataclass
class Segment:
    """The ids one rank asked this owner for in one exchange: ``count`` of them, from position ``offset``
    of that rank's sorted id list, sent under the requester's ``tag`` (its data stream)."""

    count: int
    offset: int
    tag: int


@dataclass
class Encoded:
    """What the owners sent for some ids (``values``, a leaf on the requester) and what each owner keeps to
    take the gradient of ``values`` back through its encoder to its rows."""

    values: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_local: torch.Tensor
    """Local row indices this rank served, in the order it served them."""
    served: torch.Tensor
    output: torch.Tensor


def _segments(item: Encoded) -> list[tuple[int, int]]:
    """(offset, count) of each requester's non-empty segment of what ``item`` served."""
    offsets = accumulate(item.recv_counts, initial=0)
    return [(offset, count) for offset, count in zip(offsets, item.recv_counts, strict=False) if count]


def summed_rows(
    encoded: list[Encoded], grads: list[torch.Tensor], world_size: int, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct local ids, the sum of their gradient rows) of the rows of ``weight`` that ``encoded`` served,
    given the gradient each owner's output got back (``grads``), through the encoders' backward."""
    parts_ids, parts_grad = [], []
    for item, grad in zip(encoded, grads, strict=True):
        torch.autograd.backward(item.output, grad)
        parts_ids.append(item.recv_local)
        parts_grad.append(item.served.grad if item.served.grad is not None else torch.zeros_like(item.served))
    if not parts_ids:
        return torch.empty(0, dtype=torch.int64), weight.new_empty(0, weight.shape[1])
    if len(parts_ids) == 1 and world_size == 1:
        # One request served whole: its ids are already unique (the requester sends unique ids).
        return parts_ids[0], parts_grad[0]
    # Each requester's segment of a request holds its ascending distinct ids: a merge of those runs,
    # not a sort of all of them (torch's sort where the kernel cannot take them).
    runs = [
        (ids[offset : offset + count], grad[offset : offset + count])
        for item, ids, grad in zip(encoded, parts_ids, parts_grad, strict=True)
        for offset, count in _segments(item)
    ]
    merged = native.merge_rows(runs)
    if merged is not None:
        return merged
    unique, inverse = torch.unique(torch.cat(parts_ids), return_inverse=True)
    return unique, weight.new_zeros(len(unique), weight.shape[1]).index_add_(0, inverse, torch.cat(parts_grad))


@dataclass
class SampledGradient:
    """The gradient of rows the sample kernel drew (``stream_sample_and_kl``), left unformed: the gradient each
    owner's output got back (``parts``: per request served, the rows from each requester, as
    ``Exchange.all_to_all_parts`` gave them, so read before the next collective) and how the rows were drawn.
    The row optimiser forms it row by row as it updates them: one pass where forming it (the kernel's
    backward), summing the requests' rows and updating take three, two of them over gradient tables
    written out and read back. ``formed`` forms it as ``collect`` would have."""

    encoded: list[Encoded]
    parts: list[list[torch.Tensor]]
    samples: list[StreamSample]
    exchange: Exchange
    generation: int
    """The exchange's collectives so far (``SharedMemoryExchange.generation``) when the parts arrived."""

    @staticmethod
    def drawn(encoded: list[Encoded]) -> list[StreamSample] | None:
        """How the sample kernel drew every request's rows, or None unless it drew them all and sent them as
        it drew them."""
        samples = [stream_sample_of(item.output) for item in encoded]
        if not encoded or any(sample is None for sample in samples):
            return None
        return [sample for sample in samples if sample is not None]

    def runs(self) -> list[tuple[StreamSample, torch.Tensor]]:
        """The rows by requester: (how they were drawn, the gradient of their [sample | KL]); each run's rows
        distinct, and ascending (a requester sends its sorted distinct ids). One request at world size 1 is one
        run over all its rows (views, not copies)."""
        self._check()
        return [
            (StreamSample(sample.table, sample.local[lo : lo + n], sample.eps[lo : lo + n]), part)
            for item, sample, parts in zip(self.encoded, self.samples, self.parts, strict=True)
            for lo, n, part in zip(accumulate(item.recv_counts, initial=0), item.recv_counts, parts, strict=False)
            if n
        ]

    def formed(self, world_size: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the distinct local ids, their summed gradient rows), through the encoders' backward."""
        self._check()
        grads = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in self.parts]
        return summed_rows(self.encoded, grads, world_size, weight)

    def _check(self) -> None:
        if _generation(self.exchange) != self.generation:
            raise RuntimeError("a sampled gradient was read after a later collective had reused its memory")


def _generation(exchange: Exchange) -> int:
    """How many shared-memory collectives ``exchange`` has made (0 where it makes none)."""
    return getattr(exchange, "generation", 0)


class ShardedTable:
    """The rows [lo, hi) of a table of ``num_rows`` that this rank owns under ``plan``."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        exchange: Exchange,
        *,
        variational: bool,
        optimizer: RowOptimizerName,
        lr: float,
        seed: int,
        init_std: float | None = None,
        init_logvar: float | None = None,
        block_rows: int,
        device: torch.device | None = None,
        roles: int = 1,
    ):
        """``roles`` > 1: each row holds that many embeddings side by side (an entity's subject and object
        embeddings), each initialised, clipped and given its row-wise Adagrad accumulators as a table of
        its own would be."""
        self.num_rows, self.dim, self.exchange, self.roles = num_rows, dim, exchange, roles
        self.device = torch.device("cpu") if device is None else device
        self.plan = RowPlan(num_rows, exchange.world_size, block_rows)
        self.lo, self.hi = self.plan.range(exchange.rank)
        self.weight = init_rows(
            num_rows,
            dim,
            (self.lo, self.hi),
            variational=variational,
            init_std=init_std,
            init_logvar=init_logvar,
            seed=seed,
            block_rows=block_rows,
            device=self.device,
            roles=roles,
        )
        # Row-wise Adagrad keeps one accumulator per row *part*: means and log-variances differ in scale, and
        # a row's roles in how often they are used.
        self.optimizer = build_row_optimizer(optimizer, self.weight, lr, parts=self.width // dim * roles)

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    @property
    def variational(self) -> bool:
        return self.width != self.dim

    def local(self) -> torch.Tensor:
        """This rank's rows as a fresh leaf that requires grad."""
        return self.weight.clone().requires_grad_(True)

    def encode(self, ids: torch.Tensor, encoder: Encoder = identity, tag: int = 0) -> Encoded:
        """``encoder`` applied by the owners to the rows of the ascending unique global ``ids``.

        The owner runs the encoder (e.g. draws the reparameterised sample and its KL), so what travels is
        the encoding, not the rows: for Gaussian rows [mean | logvar] a sample and a KL are half the bytes
        both ways, and the gradient comes back in the same shape.
        """
        send = self.plan.counts_by_owner(ids)
        # The header of each owner's segment, built on the host: a few numbers, where tensor operations on
        # them were five dispatches a step.
        offsets = accumulate(send[:-1], initial=0)
        header = [[count, offset, tag] for count, offset in zip(send, offsets, strict=True)]
        received = self.exchange.all_to_all_rows(torch.tensor(header, device=self.device)).tolist()
        segments = [Segment(*row) for row in received]
        recv = [segment.count for segment in segments]
        recv_local = self.exchange.all_to_all_back(ids, send, recv) - self.lo
        served, output = encoder(self.weight, recv_local, segments)
        values = self.exchange.all_to_all_back(output.detach(), recv, send)
        return Encoded(values.requires_grad_(torch.is_grad_enabled()), send, recv, recv_local, served, output)

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of any global ids (repeats allowed), without gradients (evaluation)."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self.encode(unique).values[inverse]

    def collect(
        self, encoded: list[Encoded], local_leaf: torch.Tensor | None, unformed: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | SampledGradient]:
        """Send the gradients of encoded values back to their owners, which take them through their encoder;
        return (local row ids or None for all, the summed gradient of those rows). With ``unformed``, the
        gradient of rows the sample kernel drew comes back unformed (ids None), for ``step`` to form as it
        updates them."""
        sent = [item.values.grad if item.values.grad is not None else torch.zeros_like(item.values) for item in encoded]
        samples = SampledGradient.drawn(encoded) if unformed and local_leaf is None else None
        if samples is not None:
            # The kernel reads each requester's rows where they are, not copied into one block first; but
            # each request's all-to-all is a collective, after which a peer may write over an earlier one's
            # rows: all but the last request's are copied.
            parts = []
            for i, (item, grad) in enumerate(zip(encoded, sent, strict=True)):
                if i + 1 == len(encoded):
                    parts.append(self.exchange.all_to_all_parts(grad, item.send_counts, item.recv_counts))
                else:
                    copied = self.exchange.all_to_all_back(grad, item.send_counts, item.recv_counts)
                    parts.append(list(copied.split(item.recv_counts)))
            return None, SampledGradient(encoded, parts, samples, self.exchange, _generation(self.exchange))
        grads = [
            self.exchange.all_to_all_back(grad, item.send_counts, item.recv_counts)
            for item, grad in zip(encoded, sent, strict=True)
        ]  # fmt: skip
        if local_leaf is not None:
            for item, grad in zip(encoded, grads, strict=True):
                torch.autograd.backward(item.output, grad)
            total = local_leaf.grad if local_leaf.grad is not None else torch.zeros_like(self.weight)
            for item in encoded:
                if item.served.grad is not None:
                    total.index_add_(0, item.recv_local, item.served.grad)
            return None, total
        return summed_rows(encoded, grads, self.exchange.world_size, self.weight)

    def step(self, ids: torch.Tensor | None, grad: torch.Tensor | SampledGradient) -> torch.Tensor | None:
        """Row optimiser update of local rows ``ids`` (all when None; those it holds for a
        ``SampledGradient``); returns the rows updated (None: all)."""
        if isinstance(grad, SampledGradient):
            updated = self.optimizer.step_sampled(self.weight, grad.runs())
            if updated is not None:
                return updated
            ids, grad = grad.formed(self.exchange.world_size, self.weight)
        if ids is None or len(ids):
            self.optimizer.step(self.weight, ids, grad)
        return ids

    @torch.no_grad()
    def clip_sigma_norm(self, ids: torch.Tensor | None, max_norm: float) -> None:
        """Scale sigma of local rows ``ids`` (all when None) so that its L2 norm over each of a row's roles
        is at most ``max_norm``, as the authors' code did to each table after every batch; point-estimate
        rows have none."""
        if not self.variational or (ids is not None and not len(ids)):
            return
        parts = self.roles
        logvar = self.weight[:, self.dim :] if ids is None else self.weight[ids, self.dim :]
        # ||sigma|| = sqrt(sum exp(logvar)); scaling sigma by c adds 2 log c to every logvar of the slice.
        log_norm = 0.5 * torch.logsumexp(logvar.unflatten(1, (parts, -1)), dim=2, keepdim=True)
        shift = (2.0 * (math.log(max_norm) - log_norm).clamp(max=0.0)).expand(-1, -1, self.dim // parts).flatten(1)
        if ids is None:
            self.weight[:, self.dim :] += shift
        else:
            self.weight[ids, self.dim :] = logvar + shift

    def dense_noise(self, key: tuple[int, ...]) -> torch.Tensor:
        """Noise for every local row: rows [lo, hi) of the counter-based stream ``key`` (``rng.row_normal``),
        so a row's noise is the same whatever the sharding."""
        out = torch.empty(self.hi - self.lo, self.dim, device=self.device)
        rng.row_normal((self.lo, self.hi), self.dim, key, out)
        return out

    def block_noise(self, local: torch.Tensor, key: tuple[int, ...]) -> torch.Tensor:
        """Rows ``local`` of ``dense_noise(key)``, drawing only those rows."""
        return rng.rows_normal(local.to(self.device) + self.lo, self.dim, key, self.device)

    def full(self) -> Gaussian:
        """This rank's rows as a Gaussian of views, without gradients (evaluation, export)."""
        return Gaussian.of_rows(self.weight, self.dim)

    @torch.no_grad()
    def health(self, collapsed_below: float, chunk_rows: int = 1 << 16) -> tuple[bool, int]:
        """(every value finite, rows whose mean log-variance is below ``collapsed_below``) of this rank's rows,
        from one sum per row part (mean, log-variance) over ``chunk_rows`` rows at a time: a value that is
        not finite makes its part's sum so, and the pass reads each row once and writes two numbers per row,
        where isfinite() writes a flag per value (a whole-shard one would be 8.6 GB for a Freebase shard at
        dim 200). A part whose finite values sum past float32's range (~3e38) counts as not finite too."""
        finite, collapsed = True, 0
        for lo in range(0, len(self.weight), chunk_rows):
            rows = self.weight[lo : lo + chunk_rows]
            sums = rows.unflatten(1, (-1, self.dim)).sum(2)  # [rows, 2]: means, log-variances (or [rows, 1])
            finite = finite and bool(torch.isfinite(sums).all())
            if self.variational:
                collapsed += int((sums[:, 1] / self.dim < collapsed_below).sum())
        return finite, collapsed

    def mean_variance(self, max_rows: int = 1 << 16) -> float:
        """The mean of exp(log-variance) over this rank's rows (0 for point rows): over every row of a shard of
        up to ``max_rows`` rows, else over ``max_rows`` evenly spaced ones. A dashboard's gauge, read every
        few steps: on a 2M-row table (dim 64) the exp() of every log-variance took 608 ms and the sample's 25 ms,
        within 3e-4 of it; a Freebase shard is ~1e9 log-variances. Row ids carry no order, so evenly spaced
        rows are a fair sample."""
        rows = len(self.weight)
        if not self.variational or not rows:
            return 0.0
        stride = -(-rows // max_rows)
        logvar = self.weight[::stride, self.dim :]
        return float(logvar.exp().sum(dtype=torch.float64)) / logvar.numel()

    def state_dict(self) -> dict:
        optim = {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.optimizer.state_dict().items()}
        return {"rows": [self.lo, self.hi], "weight": self.weight.cpu().clone(), "optim": optim}

    def load_ranges(self, parts: list[dict]) -> None:
        """Fill this rank's rows from saved shards (each {"rows": [lo, hi], "weight", "optim"}) of any plan."""
        filled = 0
        for part in parts:
            lo, hi = part["rows"]
            start, stop = max(lo, self.lo), min(hi, self.hi)
            if start >= stop:
                continue
            if part["weight"].shape[1] != self.width:
                raise ValueError(f"checkpoint rows have width {part['weight'].shape[1]}, expected {self.width}")
            self.weight[start - self.lo : stop - self.lo] = part["weight"][start - lo : stop - lo]
            self.optimizer.load_rows(
                part["optim"], slice(start - lo, stop - lo), slice(start - self.lo, stop - self.lo)
            )
            filled += stop - start
        if filled != self.hi - self.lo:
            raise ValueError(f"checkpoint covers {filled} of rows [{self.lo}, {self.hi}); shards are missing")


class ReplicatedTable:
    """Every row on every rank (relations); gradients are all-reduced so the replicas stay equal."""

    def __init__(self, table: ShardedTable, exchange: Exchange):
        """``table``: every row, built with a ``LocalExchange``; ``exchange``: the group that replicates it."""
        self.table, self.exchange = table, exchange

    @property
    def dim(self) -> int:
        return self.table.dim

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def local(self) -> torch.Tensor:
        return self.table.local()

    def collect(self, leaf: torch.Tensor) -> tuple[torch.Tensor, Pending]:
        """Start summing the replicas' gradients; the sum is ``grad`` once ``wait()`` has returned, so the
        entity update can run while it travels over gloo (through shared memory it rides on the entity
        gradients' all-to-all)."""
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(self.table.weight)
        return grad, self.exchange.all_reduce_async(grad)

    def step(self, grad: torch.Tensor) -> None:
        self.table.step(None, grad)

    def full(self) -> Gaussian:
        return self.table.full()

    def state_dict(self) -> dict:
        return self.table.state_dict()

    def load_ranges(self, parts: list[dict]) -> None:
        self.table.load_ranges(parts)
