"""Gaussian embedding tables: rows of [mean | logvar] plus the optimiser state of those rows.

A row keeps its mean and log-variance side by side in one vector, so gathering, updating (and later
sending) a row is one operation, not two. The training loop talks to a table only through ``gather``
(rows for some ids, as one leaf tensor the loss can differentiate) and ``apply_gradients`` (hand those
rows' gradients back to the owner, which updates them). ``LocalTable`` owns every row: it is world
size 1. A sharded table implements the same two calls with an all-to-all exchange, so the loop reads
the same at any world size.
"""

from __future__ import annotations

import math

import torch

from sharding.row_optim import build_row_optimizer
from trainer.gaussian import Gaussian


def init_rows(
    num_rows: int,
    dim: int,
    *,
    variational: bool,
    init_std: float | None,
    init_logvar: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Means ~ N(0, std^2) with std None meaning Xavier/Glorot, sqrt(2 / (rows + dim)); logvar log(1/dim)."""
    std = math.sqrt(2.0 / (num_rows + dim)) if init_std is None else init_std
    mean = torch.randn(num_rows, dim, generator=generator) * std
    if not variational:
        return mean
    logvar = torch.full((num_rows, dim), math.log(1.0 / dim) if init_logvar is None else init_logvar)
    return torch.cat([mean, logvar], dim=1)


class LocalTable:
    """All rows of one table in this process."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        variational: bool,
        optimizer: str,
        lr: float,
        generator: torch.Generator,
        init_std: float | None = None,
        init_logvar: float | None = None,
    ):
        self.num_rows, self.dim = num_rows, dim
        self.weight = init_rows(
            num_rows, dim, variational=variational, init_std=init_std, init_logvar=init_logvar, generator=generator
        )
        # Row-wise Adagrad keeps one accumulator per row *part*: means and log-variances differ in scale.
        self.optimizer = build_row_optimizer(optimizer, self.weight, lr, parts=self.weight.shape[1] // dim)

    def gather(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Rows ``ids`` (all rows when None) as a fresh leaf that requires grad."""
        rows = self.weight.clone() if ids is None else self.weight.index_select(0, ids)
        return rows.requires_grad_(True)

    def apply_gradients(self, ids: torch.Tensor | None, grad: torch.Tensor | None) -> None:
        """Let the row optimiser apply the gradient of rows returned by ``gather``."""
        if grad is not None:
            self.optimizer.step(self.weight, ids, grad)

    def full(self) -> Gaussian:
        """All rows as a Gaussian of views, without gradients (evaluation, export)."""
        if self.weight.shape[1] == self.dim:
            return Gaussian(self.weight, None)
        return Gaussian(self.weight[:, : self.dim], self.weight[:, self.dim :])

    def state_dict(self) -> dict:
        return {"weight": self.weight.clone(), "optim": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["weight"].shape != self.weight.shape:
            raise ValueError(
                f"checkpoint table has shape {tuple(state['weight'].shape)}, expected {tuple(self.weight.shape)}"
            )
        self.weight.copy_(state["weight"])
        self.optimizer.load_state_dict(state["optim"])
