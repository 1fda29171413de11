"""One global training step on this rank: encode -> loss and gradients -> exchange -> update.

A step whose loss or gradients are not finite raises ``Divergence`` before anything is updated, on every
rank alike, so the tables keep their last finite values. The ranks agree through a small all-reduce of two
flags that travels beside the gradients and is read before any row is updated: a collective of its own
before the gradients would be one more point per step where every rank waits for the slowest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sharding.exchange import Exchange, Pending
from trainer.model import KGModel


@dataclass
class StepTerms:
    """A step's share of the negative ELBO (KL before warm-up and kl_weight) and of the loss minimised,
    on one rank or (``totals``) summed over all ranks."""

    nll: float
    kl: float
    loss: float

    def totals(self, exchange: Exchange, device: torch.device) -> StepTerms:
        local = torch.tensor([self.nll, self.kl, self.loss], dtype=torch.float64, device=device)
        return StepTerms(*exchange.all_reduce(local).tolist())


class Divergence(ArithmeticError):
    """Training produced a non-finite loss, gradient or parameter."""

    def __init__(self, epoch: int, step: int, what: str):
        super().__init__(f"training diverged at epoch {epoch}, step {step}: non-finite {what}")
        self.epoch, self.step, self.what = epoch, step, what


class Step:
    def __init__(self, model: KGModel, grad_clip: float | None = None):
        self.model, self.grad_clip = model, grad_clip

    def __call__(
        self, batches: list[tuple[int, torch.Tensor]], share: float, kl_multiplier: float, key: tuple[int, ...]
    ) -> StepTerms:
        """``batches``: (stream, positives [B, 3]) of this rank's streams; ``share``: this step's share of the
        epoch's whole-table KL; ``key``: (seed, epoch, step)."""
        forward, loss = self.model.forward_backward(batches, share, key, kl_multiplier)
        # The step's terms and what is checked, in one tensor read once: the loss and, on the requester's side,
        # the gradients (with finite parameters, checked each epoch, the owners' sums of finite gradients are
        # finite).
        gradient_sum = self.model.gradient_sum(forward).to(loss.device, loss.dtype)
        values = torch.stack([forward.nll, forward.kl, loss, gradient_sum]).detach()
        flags, pending = self._start_check(values[2:])
        # Clipping needs the entity rows' gradient formed; without it the update may form it as it goes.
        grads = self.model.gradients(forward, unformed=self.grad_clip is None)
        problem = self._problem(flags, pending)
        if problem is not None:
            grads.wait()  # no collective left in flight
            _, epoch, step = key
            raise Divergence(epoch + 1, step, problem)
        if self.grad_clip is not None:
            grads.relations_pending.wait()
            assert isinstance(grads.entities, torch.Tensor)  # asked for formed
            clip_global_norm(grads.entities, grads.relations, self.grad_clip, self.model.exchange)
        self.model.update(grads)
        nll, kl, loss_value, _ = values.tolist()
        return StepTerms(nll, kl, loss_value)

    def _start_check(self, checked: torch.Tensor) -> tuple[torch.Tensor, Pending]:
        """Start summing over ranks the flags of this rank's [loss, gradient sum]: x - x, 0 where x is finite
        and NaN where it is not, which a sum over ranks keeps (one operation, where isfinite, a negation and a
        conversion were three at the end of every step)."""
        flags = checked - checked
        return flags, self.model.exchange.all_reduce_async(flags)

    @staticmethod
    def _problem(flags: torch.Tensor, pending: Pending) -> str | None:
        """What is not finite on any rank ("loss", "gradient"), or None: one host sync for both."""
        pending.wait()
        loss_flag, gradient_flag = flags.tolist()
        if not math.isfinite(loss_flag):
            return "loss"
        return None if math.isfinite(gradient_flag) else "gradient"


def clip_global_norm(
    entity_grad: torch.Tensor, relation_grad: torch.Tensor, max_norm: float, exchange: Exchange
) -> None:
    """Clip the norm of the whole gradient in place: entity rows summed over ranks, relations (replicated,
    already summed) counted once."""
    squared = exchange.all_reduce(entity_grad.square().sum().reshape(1))[0] + relation_grad.square().sum()
    total = squared.sqrt()
    if total > max_norm:
        for g in (entity_grad, relation_grad):
            g.mul_(max_norm / (total + 1e-6))
