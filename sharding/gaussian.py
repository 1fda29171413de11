"""Diagonal Gaussian rows q = N(mean, diag(exp(logvar))): the reparameterised sample, the KL to the
N(0, v I) prior (v = 1 unless ``model.prior`` says otherwise), and what an owner sends for its rows in a
training step (``encoder``).

A table row is [mean | logvar] side by side; point-estimate rows are [mean] alone. The variance is
stored as its logarithm (as the authors' code did): it is unconstrained, so the optimiser can move it
freely, and exp() keeps it positive.

Sample and KL in training, fastest first: the compiled kernel with the counter-based noise drawn
inside it, gathering the rows from the owner's table as it samples them (``stream_sample_and_kl``);
else the rows gathered and the noise drawn first (``rng.row_normal``) and one autograd function with a
written backward (``sample_and_kl``). Evaluation draws with ``Gaussian.draw``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from sharding import rng
from sharding.kernels import native

if TYPE_CHECKING:
    from sharding.table import Segment


class Gaussian(NamedTuple):
    """Rows of a Gaussian embedding table: ``mean`` [..., D], ``logvar`` [..., D] or None (point estimate)."""

    mean: torch.Tensor
    logvar: torch.Tensor | None

    @classmethod
    def of_rows(cls, rows: torch.Tensor, dim: int) -> Gaussian:
        """Views of table rows [..., 2*dim] = [mean | logvar] (or [..., dim]: a point estimate)."""
        if rows.shape[-1] == dim:
            return cls(rows, None)
        return cls(rows[..., :dim], rows[..., dim:])

    def draw(self, eps: torch.Tensor) -> torch.Tensor:
        """The reparameterised draw mean + sigma * eps for given standard normal ``eps``."""
        if self.logvar is None:
            return self.mean
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reparameterised draw with noise from ``generator``, differentiable in both parameters."""
        if self.logvar is None:
            return self.mean
        return self.draw(
            torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        )


def sample_kl_values(
    rows: torch.Tensor, eps: torch.Tensor, prior_var: float
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The reparameterised sample [U, D] and per-row KL to N(0, v I) [U] of [mean | logvar] rows [U, 2D]
    given standard normal ``eps`` [U, D], and what ``sample_kl_grad`` needs from them: (mean, sigma)."""
    dim = eps.shape[-1]
    mean, logvar = rows[:, :dim], rows[:, dim:]
    std = torch.exp(0.5 * logvar)
    sample = torch.addcmul(mean, std, eps)
    # Row sums as dot products: no [U, D] temporaries for mean^2 and sigma^2.
    squares = torch.linalg.vecdot(mean, mean) + torch.linalg.vecdot(std, std)
    if prior_var == 1.0:
        kl = 0.5 * (squares - logvar.sum(-1) - dim)
    else:
        kl = 0.5 * (squares / prior_var - logvar.sum(-1) - dim + dim * math.log(prior_var))
    return sample, kl, (mean, std)


def sample_kl_grad(
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: torch.Tensor,
    prior_var: float,
    grad_sample: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
) -> torch.Tensor:
    """The gradient [U, 2D] of the rows from those of their sample [U, D] and KL [U] (None: zero), written out:
    d sample/d mean = 1, d sample/d logvar = eps * sigma / 2, d KL/d mean = mean / v,
    d KL/d logvar = (sigma^2 / v - 1) / 2."""
    dim = mean.shape[-1]
    grad = mean.new_empty(mean.shape[0], 2 * dim)
    grad_mean, grad_logvar = grad[:, :dim], grad[:, dim:]
    weight = grad_kl.unsqueeze(-1) if grad_kl is not None else mean.new_zeros(mean.shape[0], 1)
    if grad_sample is None:
        grad_sample = mean.new_zeros(())
    # d/d mean = g + w mean / v;  d/d logvar = (g eps sigma + w (sigma^2 / v - 1)) / 2
    #                                        = sigma (g eps + (w / v) sigma) / 2 - w / 2
    scaled = weight if prior_var == 1.0 else weight / prior_var
    torch.addcmul(grad_sample, scaled, mean, out=grad_mean)
    inner = torch.addcmul(grad_sample * eps, scaled, std)
    torch.addcmul(weight * -0.5, inner, std, value=0.5, out=grad_logvar)
    return grad


class _SampleAndKL(torch.autograd.Function):
    """Reparameterised sample and per-row KL to N(0, v I) of [mean | logvar] rows in one pass each way: the
    analytic backward (``sample_kl_grad``) replaces a dozen autograd nodes over the batch's rows."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, eps: torch.Tensor, prior_var: float) -> tuple[torch.Tensor, torch.Tensor]:
        sample, kl, (mean, std) = sample_kl_values(rows, eps, prior_var)
        ctx.save_for_backward(mean, std, eps)
        ctx.prior_var = prior_var
        return sample, kl

    @staticmethod
    def backward(ctx, grad_sample: torch.Tensor | None, grad_kl: torch.Tensor | None):
        mean, std, eps = ctx.saved_tensors
        return sample_kl_grad(mean, std, eps, ctx.prior_var, grad_sample, grad_kl), None, None


def sample_and_kl(
    rows: torch.Tensor, dim: int, eps: torch.Tensor | None, prior_var: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draw mean + sigma * eps [U, dim] and the KL to N(0, prior_var I) per row [U] of table rows
    [U, 2*dim] = [mean | logvar], given standard normal ``eps`` [U, dim].

    Point-estimate rows ([U, dim]) are returned as they are, with zero KL (``eps`` is then None).
    """
    if rows.shape[-1] == dim:
        return rows, rows.new_zeros(rows.shape[0])
    return _SampleAndKL.apply(rows, eps, prior_var)


@dataclass(frozen=True)
class StreamSample:
    """How ``stream_sample_and_kl`` drew rows ``local`` of ``table``: with noise ``eps`` [m, dim]. With the
    gradient of its output, that is all the rows' gradient is made of (``sample_kl_backward``'s formula), so
    a row update can form it row by row (``RowAdagrad.step_sampled``)."""

    table: torch.Tensor
    local: torch.Tensor
    eps: torch.Tensor


def stream_sample_of(output: torch.Tensor) -> StreamSample | None:
    """How the kernel drew ``output`` when it is the [sample | KL] ``stream_sample_and_kl`` returned (its
    autograd node keeps it), else None."""
    return getattr(output.grad_fn, "stream_sample", None)


class _StreamSampleAndKL(torch.autograd.Function):
    """``sample_and_kl`` of rows ``local`` of an owner's table in the compiled kernels of
    sharding/kernels/noise.c, with the noise drawn inside them.

    One pass each way over the rows, with an inline vectorised exp: the forward reads each row from the
    table as it samples it, and writes the sample and KL straight into the packed [U, dim + 1] layout the
    owner sends back (no noise tensor, no concatenation). The backward reads the rows in the table again:
    nothing changes a row between a step's forward and its backward (the update comes after), and autograd
    refuses a backward after the table changed (the table is saved for the backward; the compiled row
    updates count their writes as torch's in-place ops do). ``rows`` is the leaf that takes the rows'
    gradient; the forward copies the rows into it only when ``copy_rows`` (a caller that sends the means
    on): copying 1 KiB a row cost the pass a tenth to a fifth of its time.
    """

    @staticmethod
    def forward(ctx, rows, table, local, dim: int, spans: list[tuple[int, int, int]], copy_rows: bool) -> torch.Tensor:
        lib, size = native.loaded(), table.element_size()
        eps, out = table.new_empty(len(local), dim), table.new_empty(len(local), dim + 1)
        start = 0
        for count, seed, first in spans:
            ids = local.data_ptr() + start * local.element_size()
            rows_at = rows.data_ptr() + start * 2 * dim * size if copy_rows else None
            eps_at, out_at = (x.data_ptr() + start * x.shape[1] * size for x in (eps, out))
            status = lib.sample_kl_forward(
                table.data_ptr(), ids, len(table), rows_at, eps_at, out_at, count, dim, seed, first
            )  # fmt: skip
            native.check(status, "sample_kl_forward", len(table))
            start += count
        ctx.save_for_backward(table, local, eps)
        ctx.stream_sample = StreamSample(table, local, eps)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        table, local, eps = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad = table.new_empty(len(local), table.shape[1])
        native.loaded().sample_kl_backward(
            table.data_ptr(), local.data_ptr(), eps.data_ptr(), grad_out.data_ptr(), grad.data_ptr(), len(local),
            eps.shape[1],
        )  # fmt: skip
        return grad, None, None, None, None, None


def stream_sample_and_kl(
    table: torch.Tensor, local: torch.Tensor, dim: int, spans: list[tuple[int, int, int]], copy_rows: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A leaf for the rows ``local`` [U] of ``table`` [N, 2*dim] = [mean | logvar] and their [sample | KL]
    [U, dim + 1], drawn with the compiled counter streams: ``spans`` are (rows, stream seed, first value) for
    consecutive runs of the rows, the noise of a run being values [first, first + rows * dim) of its stream
    (``native.normal_into``'s stream, so the same as drawing it first and calling ``sample_and_kl``). The
    leaf takes the rows' gradient when grad is enabled; it holds the rows themselves only with
    ``copy_rows`` (the kernel copies them as it samples them), else zeros (a view that holds no memory).
    None where the kernels cannot take them."""
    fits = (
        native.library() is not None and native.applicable(local, table) and local.dim() == 1
        and table.dim() == 2 and table.shape[1] == 2 * dim and sum(c for c, _, _ in spans) == len(local)
    )  # fmt: skip
    if not fits:
        return None
    shape = (len(local), 2 * dim)
    rows = table.new_empty(shape) if copy_rows else table.new_zeros(()).expand(shape)
    rows.requires_grad_(torch.is_grad_enabled())
    return rows, _StreamSampleAndKL.apply(rows, table, local, dim, spans, copy_rows)


Encoder = Callable[[torch.Tensor, torch.Tensor, "list[Segment]"], tuple[torch.Tensor, torch.Tensor]]
"""(the owner's table [rows, width], the local indices [m] of the rows asked for, the segments they were
asked for in, in order) -> (those rows [m, width] as a leaf to differentiate when grad is enabled, the
values [m, k] sent back for them) (see ``sharding.table.ShardedTable.encode``)."""


def gather(table: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Rows ``local`` of ``table`` as a leaf that takes their gradient (when grad is enabled)."""
    return table.index_select(0, local).requires_grad_(torch.is_grad_enabled())


def identity(table: torch.Tensor, local: torch.Tensor, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = gather(table, local)
    return rows, rows


def role_sample_and_kl(
    rows: torch.Tensor, dim: int, eps: torch.Tensor, prior_var: float, roles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_and_kl`` of rows holding ``roles`` embeddings side by side (each dim / roles numbers of
    the mean and of the log-variance), with the KL of each role apart: [U, dim] and [U, roles]."""
    width = dim // roles
    samples, kls = [], []
    for role in range(roles):
        mean, logvar = (slice(start + role * width, start + (role + 1) * width) for start in (0, dim))
        sample, kl = sample_and_kl(torch.cat([rows[:, mean], rows[:, logvar]], 1), width, eps[:, mean], prior_var)
        samples.append(sample)
        kls.append(kl)
    return torch.cat(samples, 1), torch.stack(kls, 1)


def training_encoder(
    dim: int,
    key: tuple[int, ...],
    dense_eps: torch.Tensor | None,
    keep_mean: bool,
    prior_var: float = 1.0,
    kl_roles: int = 1,
) -> Encoder:
    """What an owner sends for its Gaussian rows in training step ``key`` = (seed, epoch, step):
    [sample | KL | mean if ``keep_mean``], the sample drawn with the rows' dense noise ``dense_eps`` [local
    rows, dim] when given, else with the noise stream (key, stream, NOISE) at the row's position in the
    requesting stream's id list (``Segment``), so a draw does not depend on which rank owns the row.
    ``kl_roles`` > 1 sends the KL of each of a row's roles apart (``kl_roles`` columns)."""

    def encode(table: torch.Tensor, local: torch.Tensor, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        if dense_eps is None and prior_var == 1.0 and kl_roles == 1:
            # The compiled kernel's KL is to N(0, I): another prior takes the torch path.
            spans = [(s.count, rng.seed_of(*key, s.tag, rng.NOISE), s.offset * dim) for s in segments]
            fused = stream_sample_and_kl(table, local, dim, spans, copy_rows=keep_mean)
            if fused is not None:
                rows, packed = fused
                return rows, torch.cat([packed, rows[:, :dim]], dim=1) if keep_mean else packed
        rows = gather(table, local)
        if dense_eps is not None:
            eps = dense_eps.index_select(0, local)
        else:
            eps, start = rows.new_empty(len(rows), dim), 0
            for s in segments:
                span = (s.offset, s.offset + s.count)
                rng.row_normal(span, dim, (*key, s.tag, rng.NOISE), eps[start : start + s.count])
                start += s.count
        if kl_roles > 1:
            sample, row_kl = role_sample_and_kl(rows, dim, eps, prior_var, kl_roles)
        else:
            sample, row_kl = sample_and_kl(rows, dim, eps, prior_var)
        means = [rows[:, :dim]] if keep_mean else []
        return rows, torch.cat([sample, row_kl.view(len(rows), kl_roles), *means], dim=1)

    return encode


def split_encoding(
    values: torch.Tensor, dim: int, kl_roles: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample [U, dim], KL [U] (or [U, kl_roles]), mean [U, dim] or the rest) of what ``training_encoder``
    sent."""
    sample, kl, mean = values.split([dim, kl_roles, values.shape[1] - dim - kl_roles], dim=1)
    return sample, kl.squeeze(1) if kl_roles == 1 else kl, mean


def sampler(eps: torch.Tensor) -> Encoder:
    """An owner's draw for its rows in evaluation, ``eps`` [local rows, D] being its dense noise."""

    def sample(table: torch.Tensor, local: torch.Tensor, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = gather(table, local)
        return rows, Gaussian.of_rows(rows, eps.shape[1]).draw(eps.index_select(0, local))

    return sample
