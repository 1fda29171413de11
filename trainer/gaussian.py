"""Diagonal Gaussian posteriors q = N(mean, diag(exp(logvar))) and their KL to the N(0, I) prior.

The variance is stored as its logarithm (as the authors' code did): it is unconstrained, so Adam
can move it freely, and exp() keeps it positive.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Gaussian(NamedTuple):
    """Rows of a Gaussian embedding table: ``mean`` [..., D], ``logvar`` [..., D] or None (point estimate)."""

    mean: torch.Tensor
    logvar: torch.Tensor | None

    @property
    def variational(self) -> bool:
        return self.logvar is not None

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One reparameterised draw mean + sigma * eps, differentiable in both parameters."""
        if self.logvar is None:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def kl_to_unit(self) -> torch.Tensor:
        """KL[N(mean, diag(var)) || N(0, I)] per row, shape [...]: 0.5 * sum(mean^2 + var - logvar - 1)."""
        if self.logvar is None:
            return self.mean.new_zeros(self.mean.shape[:-1])
        return 0.5 * (self.mean.square() + self.logvar.exp() - self.logvar - 1.0).sum(-1)
