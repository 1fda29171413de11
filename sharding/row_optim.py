"""Optimisers that update only the rows a step touched.

The owner of a table slice applies them to the rows it received gradients for, so an update costs
O(rows in the batch), not O(table). ``RowAdam`` is lazy Adam (as torch's SparseAdam): rows not in the
batch keep their moments, and when every row is in every batch it is exactly ``torch.optim.Adam``.
``RowAdagrad`` keeps one accumulator per row (PyTorch-BigGraph's row-wise Adagrad), 1/D of Adam's state.
"""

from __future__ import annotations

import math

import torch


class RowAdam:
    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.num_steps = 0

    def step(self, param: torch.Tensor, ids: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Update ``param[ids]`` (all rows when ids is None) with ``grad`` [len(ids), D]."""
        self.num_steps += 1
        beta1, beta2 = self.betas
        if ids is None:
            exp_avg, exp_avg_sq = self.exp_avg, self.exp_avg_sq
        else:
            exp_avg, exp_avg_sq = self.exp_avg[ids], self.exp_avg_sq[ids]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**self.num_steps
        bias2 = 1 - beta2**self.num_steps
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.eps)
        update = exp_avg / denom * (-self.lr / bias1)
        if ids is None:
            param.add_(update)
        else:
            self.exp_avg[ids] = exp_avg
            self.exp_avg_sq[ids] = exp_avg_sq
            param.index_add_(0, ids, update)

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.num_steps = int(state["num_steps"])


class RowAdagrad:
    def __init__(self, param: torch.Tensor, lr: float, eps: float = 1e-10):
        self.lr, self.eps = lr, eps
        self.sum_sq = torch.zeros(param.shape[0], dtype=param.dtype, device=param.device)

    def step(self, param: torch.Tensor, ids: torch.Tensor | None, grad: torch.Tensor) -> None:
        row_sq = grad.square().mean(-1)
        if ids is None:
            self.sum_sq.add_(row_sq)
            param.addcdiv_(grad, (self.sum_sq.sqrt() + self.eps).unsqueeze(-1), value=-self.lr)
        else:
            self.sum_sq.index_add_(0, ids, row_sq)
            scale = (self.sum_sq[ids].sqrt() + self.eps).unsqueeze(-1)
            param.index_add_(0, ids, grad / scale * -self.lr)

    def state_dict(self) -> dict:
        return {"sum_sq": self.sum_sq}

    def load_state_dict(self, state: dict) -> None:
        self.sum_sq.copy_(state["sum_sq"])


def build_row_optimizer(name: str, param: torch.Tensor, lr: float) -> RowAdam | RowAdagrad:
    if name == "adam":
        return RowAdam(param, lr)
    if name == "rowwise_adagrad":
        return RowAdagrad(param, lr)
    raise ValueError(f"optim.optimizer={name!r}: expected adam or rowwise_adagrad")
