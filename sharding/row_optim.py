"""Optimisers that update only the rows a step touched.

The owner of a table slice applies them to the rows it received gradients for, so an update costs
O(rows in the batch), not O(table). ``RowAdam`` is lazy Adam (as torch's SparseAdam): rows not in the
batch keep their moments, and when every row is in every batch it is exactly ``torch.optim.Adam``.
``RowAdagrad`` keeps one accumulator per row part (PyTorch-BigGraph's row-wise Adagrad): 1/D of Adam's state.

On the CPU, both update some rows in the compiled kernels of ``sharding/kernels/rows.c``, in place (no
gather -> update -> scatter of the rows and their state); elsewhere the same update is made with torch ops
(``compiled=False`` forces that).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch.optim.adam import adam

from sharding import memory
from sharding.gaussian import StreamSample
from sharding.kernels import native


def _check_rows(ids: torch.Tensor, param: torch.Tensor, grad: torch.Tensor) -> None:
    """That ``grad`` holds one row of ``param``'s width for each of the ids [n]: the kernels would read past
    a shorter one, and torch's fused Adam does not check."""
    if ids.dim() != 1 or param.dim() != 2 or grad.shape != (len(ids), param.shape[1]):
        raise ValueError(
            f"row update: gradient {list(grad.shape)} for ids {list(ids.shape)} of rows {list(param.shape)}; "
            "expected one gradient row per id"
        )


def _changed(param: torch.Tensor) -> None:
    """Count a kernel's write to ``param`` as torch counts its own in-place ops, so that a graph that saved
    ``param`` before the update refuses a backward after it (the sample kernel's backward reads the rows
    in the table; ``native.sample_kl_update`` counts its own writes)."""
    torch.autograd.graph.increment_version(param)


def _sampled_arrays(
    param: torch.Tensor, runs: list[tuple[StreamSample, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """(local ids, noise, output gradient) of each run, or None unless every run was drawn from ``param``."""
    if any(sample.table is not param for sample, _ in runs):
        return None
    return [(sample.local, sample.eps, grad) for sample, grad in runs]


class RowAdam:
    def __init__(
        self,
        param: torch.Tensor,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        compiled: bool = True,
    ):
        self.lr, self.betas, self.eps, self.compiled = lr, betas, eps, compiled
        # Read at random with the rows, as the table is: on huge pages where the OS allows.
        self.exp_avg = memory.zeros_like(param)
        self.exp_avg_sq = memory.zeros_like(param)
        # A float tensor, as torch's fused Adam wants (it increments it itself).
        self.steps = torch.zeros((), dtype=torch.float32, device=param.device)

    @property
    def num_steps(self) -> int:
        return int(self.steps)

    def step(self, param: torch.Tensor, ids: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Update ``param[ids]`` (all rows when ids is None) with ``grad`` [len(ids), D]; ids are unique."""
        if ids is None:
            self._update(param, self.exp_avg, self.exp_avg_sq, grad)
            return
        _check_rows(ids, param, grad)
        tables = (param, self.exp_avg, self.exp_avg_sq)
        lib = native.library() if self.compiled else None
        if lib is not None and native.applicable(ids, *tables, grad):
            self.steps += 1
            t, (beta1, beta2) = int(self.steps), self.betas
            status = lib.row_adam(
                *(x.data_ptr() for x in (*tables, ids, grad)), len(ids), len(param), param.shape[1],
                self.lr / (1 - beta1**t), 1 / math.sqrt(1 - beta2**t), 1 - beta1, beta2, 1 - beta2, self.eps,
            )  # fmt: skip
            native.check(status, "RowAdam", len(param))
            _changed(param)
            return
        rows = [table.index_select(0, ids) for table in tables]
        self._update(rows[0], rows[1], rows[2], grad)
        for table, part in zip(tables, rows, strict=True):
            table.index_copy_(0, ids, part)

    def _update(self, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor) -> None:
        # torch's fused kernel makes one pass over the four tensors where the unfused update makes seven
        # and allocates two temporaries of the table's size.
        beta1, beta2 = self.betas
        adam(
            [param], [grad.contiguous()], [exp_avg], [exp_avg_sq], [], [self.steps],
            fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=self.lr, weight_decay=0.0, eps=self.eps,
            maximize=False,
        )  # fmt: skip

    def step_sampled(self, param: torch.Tensor, runs: list[tuple[StreamSample, torch.Tensor]]) -> torch.Tensor | None:
        """As ``RowAdagrad.step_sampled``, with this lazy Adam's update."""
        arrays = _sampled_arrays(param, runs) if self.compiled else None
        if arrays is None:
            return None
        t, (beta1, beta2) = int(self.steps) + 1, self.betas
        hyper = (self.lr / (1 - beta1**t), 1 / math.sqrt(1 - beta2**t), 1 - beta1, beta2, 1 - beta2, self.eps)
        updated = native.sample_kl_update(param, arrays, "adam", (self.exp_avg, self.exp_avg_sq), hyper)
        if updated is not None:
            self.steps += 1
        return updated

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "num_steps": self.num_steps}

    def load_rows(self, state: dict, source: slice, target: slice) -> None:
        """Take rows ``source`` of a saved state into rows ``target`` (re-sharding)."""
        self.exp_avg[target] = state["exp_avg"][source]
        self.exp_avg_sq[target] = state["exp_avg_sq"][source]
        self.steps.fill_(int(state["num_steps"]))


class RowAdagrad:
    def __init__(self, param: torch.Tensor, lr: float, parts: int = 1, eps: float = 1e-10, compiled: bool = True):
        self.lr, self.parts, self.eps, self.compiled = lr, parts, eps, compiled
        self.sum_sq = memory.empty((param.shape[0], parts), param.dtype, param.device).zero_()

    def step(self, param: torch.Tensor, ids: torch.Tensor | None, grad: torch.Tensor) -> None:
        if ids is not None:
            _check_rows(ids, param, grad)
        lib = native.library() if self.compiled else None
        if lib is not None and ids is not None and native.applicable(ids, param, self.sum_sq, grad):
            status = lib.row_adagrad(
                *(x.data_ptr() for x in (param, self.sum_sq, ids, grad)), len(ids), len(param), param.shape[1],
                self.parts, self.lr, self.eps,
            )  # fmt: skip
            native.check(status, "RowAdagrad", len(param))
            _changed(param)
            return
        grad_parts = grad.view(grad.shape[0], self.parts, -1)
        row_sq = grad_parts.square().mean(-1)
        if ids is None:
            self.sum_sq.add_(row_sq)
            scale = self.sum_sq
        else:
            self.sum_sq.index_add_(0, ids, row_sq)
            scale = self.sum_sq.index_select(0, ids)
        # The step size is per row part: scale it first, then one pass over the gradient.
        update = (grad_parts * (-self.lr / (scale.sqrt() + self.eps)).unsqueeze(-1)).view_as(grad)
        if ids is None:
            param.add_(update)
        else:
            param.index_add_(0, ids, update)

    def step_sampled(self, param: torch.Tensor, runs: list[tuple[StreamSample, torch.Tensor]]) -> torch.Tensor | None:
        """``step`` with the gradient that ``runs`` [(how the sample kernel drew some rows of ``param``, the
        gradient of their [sample | KL])] give the rows, summed over the runs, formed row by row as it updates
        them (the compiled ``sample_kl_update``): the distinct rows updated, or None, with nothing done, where
        that kernel cannot take them. One run's rows are distinct; several runs' rows each strictly
        ascending."""
        arrays = _sampled_arrays(param, runs) if self.compiled else None
        if arrays is None:
            return None
        return native.sample_kl_update(param, arrays, "adagrad", (self.sum_sq,), (self.lr, self.eps), self.parts)

    def state_dict(self) -> dict:
        return {"sum_sq": self.sum_sq}

    def load_rows(self, state: dict, source: slice, target: slice) -> None:
        self.sum_sq[target] = state["sum_sq"][source]


RowOptimizer = RowAdam | RowAdagrad
RowOptimizerName = Literal["adam", "rowwise_adagrad"]
ROW_OPTIMIZERS: dict[RowOptimizerName, Callable[[torch.Tensor, float, int], RowOptimizer]] = {
    "adam": lambda param, lr, parts: RowAdam(param, lr),
    "rowwise_adagrad": RowAdagrad,
}
"""The row optimisers by config name (``optim.optimizer``); ``parts``: separately scaled parts of a row."""


def build_row_optimizer(name: RowOptimizerName, param: torch.Tensor, lr: float, parts: int = 1) -> RowOptimizer:
    return ROW_OPTIMIZERS[name](param, lr, parts)
