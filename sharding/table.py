"""Gaussian embedding tables: rows of (mean, logvar) plus the optimiser state of those rows.

The training loop talks to a table only through ``gather`` (rows for some ids, as leaf tensors the
loss can differentiate) and ``apply_gradients`` (hand those rows' gradients back to the owner, which
updates them). ``LocalTable`` owns every row: it is world size 1. A sharded table implements the same
two calls with an all-to-all exchange, so the loop reads the same at any world size.
"""

from __future__ import annotations

import math

import torch

from sharding.row_optim import build_row_optimizer
from trainer.gaussian import Gaussian


def init_means(num_rows: int, dim: int, std: float | None, generator: torch.Generator) -> torch.Tensor:
    """Normal init; std None means Xavier/Glorot normal, sqrt(2 / (rows + dim))."""
    std = math.sqrt(2.0 / (num_rows + dim)) if std is None else std
    return torch.randn(num_rows, dim, generator=generator) * std


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
        self.mean = init_means(num_rows, dim, init_std, generator)
        self.logvar: torch.Tensor | None = None
        if variational:
            logvar0 = math.log(1.0 / dim) if init_logvar is None else init_logvar
            self.logvar = torch.full((num_rows, dim), logvar0)
        self._optimizers = {name: build_row_optimizer(optimizer, t, lr) for name, t in self._params().items()}

    def _params(self) -> dict[str, torch.Tensor]:
        params = {"mean": self.mean}
        if self.logvar is not None:
            params["logvar"] = self.logvar
        return params

    def gather(self, ids: torch.Tensor | None) -> Gaussian:
        """Rows ``ids`` (all rows when None) as fresh leaves that require grad."""

        def leaf(t: torch.Tensor) -> torch.Tensor:
            rows = t.detach().clone() if ids is None else t[ids]
            return rows.requires_grad_(True)

        return Gaussian(leaf(self.mean), None if self.logvar is None else leaf(self.logvar))

    def apply_gradients(self, ids: torch.Tensor | None, rows: Gaussian) -> None:
        """Let the row optimiser apply the gradients accumulated on rows returned by ``gather``."""
        for name, param in self._params().items():
            grad = getattr(rows, name).grad
            if grad is not None:
                self._optimizers[name].step(param, ids, grad)

    def full(self) -> Gaussian:
        """All rows, without gradients (evaluation, export)."""
        return Gaussian(self.mean, self.logvar)

    def state_dict(self) -> dict:
        return {
            "params": {k: v.clone() for k, v in self._params().items()},
            "optim": {k: o.state_dict() for k, o in self._optimizers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for name, param in self._params().items():
            if name not in state["params"] or state["params"][name].shape != param.shape:
                raise ValueError(f"checkpoint table does not match: parameter {name!r} missing or mis-shaped")
            param.copy_(state["params"][name])
            self._optimizers[name].load_state_dict(state["optim"][name])
