"""The posterior of a model: what the tables hold and which KL the ELBO carries (``model.latent``).

* ``point``: rows are point estimates, no KL (the non-variational baselines).
* ``lim`` (Latent Information Model): separate Gaussian latents for every entity and relation; the KL
  is over whole tables. ``kl_estimator=full`` charges the whole entity table's KL each step (weighted by
  the step's share of the epoch); ``per_occurrence`` charges each entity KL/frequency per occurrence in a
  batch, so an epoch sums to the same KL while a step touches only its batch's rows (what scales).
* ``lfm`` (Latent Fact Model): one latent set per fact; the KL of each batch's facts' embeddings, each
  positive fact once per epoch, plus every distinct corrupted entity of the batch once.

Chosen once when the model is built; a step asks it for the owners' encoder and for the KL terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from sharding.gaussian import Encoder, identity, split_encoding, training_encoder
from sharding.kernels import native

Latent = Literal["lim", "lfm", "point"]
KLEstimator = Literal["full", "per_occurrence"]


@dataclass
class Gathered:
    """The entity rows one stream's batch needs: ascending unique ``ids`` and, for each part of the batch,
    positions within them: heads ``s`` [B], tails ``o`` [B], sampled negatives ``neg`` ([C, k] or None),
    and all parts in that order (``flat``), so the scorer's inputs are one gather."""

    ids: torch.Tensor
    flat: torch.Tensor
    s: torch.Tensor
    o: torch.Tensor
    neg: torch.Tensor | None

    @classmethod
    def of(cls, positives: torch.Tensor, negatives: torch.Tensor | None) -> Gathered:
        parts = [positives[:, 0], positives[:, 2], *([negatives] if negatives is not None else [])]
        flat = torch.cat([p.reshape(-1) for p in parts])
        found = native.unique_ids(flat)
        ids, inverse = found if found is not None else torch.unique(flat, return_inverse=True)
        positions, offset = [], 0
        for p in parts:
            positions.append(inverse[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        return cls(ids, inverse, positions[0], positions[1], positions[2] if negatives is not None else None)


class Posterior:
    """Point estimates: the owners send their rows as they are and there is no KL."""

    variational = False
    dense_kl = False
    """Whether the KL needs every local entity row in every step."""
    prior_var = 1.0
    """Variance of the N(0, prior_var I) prior (``model.prior``)."""
    kl_roles = 1
    """Columns of the entity KL the owners send: an LFM with separate roles charges each role apart."""

    def encoder(self, dim: int, key: tuple[int, ...], dense_eps: torch.Tensor | None, keep_mean: bool) -> Encoder:
        return identity

    def split(self, values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample, KL per row, mean) of what the owners sent; a point estimate is its own sample."""
        return values, values.new_zeros(len(values)), values

    weighted_fact_kl = True
    """Whether ``fact_kl`` is sum(``fact_kl_weights`` * the entities' KL) (0 where there are no weights), so a
    step can write its gradient out (``KGModel.forward_backward``)."""

    def fact_kl(self, ent_kl: torch.Tensor, rel_kl: torch.Tensor, rows: Gathered, r: torch.Tensor) -> torch.Tensor:
        """The KL that belongs to one stream's batch of facts."""
        return ent_kl.new_zeros(())

    def fact_kl_weights(self, rows: Gathered, dtype: torch.dtype) -> torch.Tensor | None:
        """The weight [U] of each of the batch's entities' KL in ``fact_kl`` (None: the batch carries none)."""
        return None

    def table_kl(self, dense_kl: torch.Tensor | None, rel_kl: torch.Tensor, share: float, rank: int) -> torch.Tensor:
        """The KL of whole tables charged to this step on this rank."""
        return rel_kl.new_zeros(())

    def table_kl_weight(self, share: float, rank: int) -> float:
        """The derivative of ``table_kl`` in each relation's KL, without dense terms (a written step's)."""
        return 0.0


class GaussianPosterior(Posterior):
    """Gaussian rows: the owners send [sample | KL (| mean)] drawn with the step's noise."""

    variational = True

    def encoder(self, dim: int, key: tuple[int, ...], dense_eps: torch.Tensor | None, keep_mean: bool) -> Encoder:
        return training_encoder(dim, key, dense_eps, keep_mean, self.prior_var, self.kl_roles)

    def split(self, values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return split_encoding(values, dim, self.kl_roles)


class LatentInformation(GaussianPosterior):
    """LIM: the KL of every entity and relation; relations are charged by rank 0, entities by their owner."""

    def __init__(self, kl_estimator: KLEstimator, entity_frequency: torch.Tensor | None):
        if kl_estimator == "per_occurrence" and entity_frequency is None:
            raise ValueError("objective.kl_estimator=per_occurrence needs the entities' training frequencies")
        # An entity seen f times per epoch carries 1/f of its KL each time, so an epoch sums to the full KL
        # of the training entities (clamped: an entity never in training occurs in no batch, only as a negative).
        # Integers in float64 (exact below 2^53), which the compiled weights read as they are.
        self.divisor = entity_frequency.clamp_min(1).to(torch.float64) if entity_frequency is not None else None
        self.dense_kl = kl_estimator == "full"

    def fact_kl(self, ent_kl: torch.Tensor, rel_kl: torch.Tensor, rows: Gathered, r: torch.Tensor) -> torch.Tensor:
        weights = self.fact_kl_weights(rows, ent_kl.dtype)
        return ent_kl.new_zeros(()) if weights is None else (ent_kl * weights).sum()

    def fact_kl_weights(self, rows: Gathered, dtype: torch.dtype) -> torch.Tensor | None:
        """c / f for an entity that occurs c times in the batch and f times in an epoch."""
        if self.divisor is None:
            return None
        counted = 2 * len(rows.s)  # heads, then tails
        if dtype == torch.float32:
            weights = native.occurrence_weights(rows.flat, counted, rows.ids, self.divisor)
            if weights is not None:
                return weights
        occurrences = torch.bincount(rows.flat[:counted], minlength=len(rows.ids))
        return occurrences.to(dtype) / self.divisor.index_select(0, rows.ids).to(dtype)

    def table_kl(self, dense_kl: torch.Tensor | None, rel_kl: torch.Tensor, share: float, rank: int) -> torch.Tensor:
        total = rel_kl.sum() if rank == 0 else rel_kl.new_zeros(())
        if dense_kl is not None and self.dense_kl:
            total = total + dense_kl.sum()
        return share * total

    def table_kl_weight(self, share: float, rank: int) -> float:
        return share if rank == 0 else 0.0


class LatentFact(GaussianPosterior):
    """LFM: the KL of the embeddings of each batch's facts (and their reciprocal relations)."""

    weighted_fact_kl = False

    def __init__(self, num_relations: int, reciprocal: bool):
        self.num_relations, self.reciprocal = num_relations, reciprocal

    def fact_kl(self, ent_kl: torch.Tensor, rel_kl: torch.Tensor, rows: Gathered, r: torch.Tensor) -> torch.Tensor:
        if ent_kl.ndim == 2:
            return self._role_kl(ent_kl, rel_kl, rows, r)
        total = ent_kl[rows.s].sum() + ent_kl[rows.o].sum() + rel_kl[r].sum()
        if self.reciprocal:
            total = total + rel_kl[r + self.num_relations].sum()
        if rows.neg is not None:
            total = total + ent_kl[torch.unique(rows.neg)].sum()
        return total

    def _role_kl(self, ent_kl: torch.Tensor, rel_kl: torch.Tensor, rows: Gathered, r: torch.Tensor) -> torch.Tensor:
        """With separate roles ([U, 2]: subject, object), the KL of the roles the batch scores with. A
        reciprocal model asks (s, r, ?) and (o, r^-1, ?): both entities in both roles, candidates as
        answers (object role). The Bernoulli likelihood scores s as subject and o as object, a head
        corruption (the first k//2 negatives) as subject and a tail corruption as object."""
        subject, object_ = ent_kl.unbind(1)
        total = rel_kl[r].sum()
        if self.reciprocal:
            total = total + rel_kl[r + self.num_relations].sum() + ent_kl[rows.s].sum() + ent_kl[rows.o].sum()
            if rows.neg is not None:
                total = total + object_[torch.unique(rows.neg)].sum()
            return total
        total = total + subject[rows.s].sum() + object_[rows.o].sum()
        if rows.neg is not None:
            half = rows.neg.shape[-1] // 2
            heads, tails = torch.unique(rows.neg[..., :half]), torch.unique(rows.neg[..., half:])
            total = total + subject[heads].sum() + object_[tails].sum()
        return total


POSTERIORS: dict[Latent, Callable[..., Posterior]] = {
    "point": lambda **_: Posterior(),
    "lim": lambda kl_estimator, entity_frequency, **_: LatentInformation(
        kl_estimator, entity_frequency if kl_estimator == "per_occurrence" else None
    ),
    "lfm": lambda num_relations, reciprocal, **_: LatentFact(num_relations, reciprocal),
}
"""The posteriors by config name (``model.latent``)."""


def build_posterior(
    latent: Latent,
    kl_estimator: KLEstimator,
    *,
    num_relations: int,
    reciprocal: bool,
    entity_frequency: torch.Tensor | None,
    prior_var: float = 1.0,
    roles: int = 1,
) -> Posterior:
    """``roles``: embeddings per entity row (2 with separate subject and object embeddings)."""
    posterior = POSTERIORS[latent](
        kl_estimator=kl_estimator,
        num_relations=num_relations,
        reciprocal=reciprocal,
        entity_frequency=entity_frequency,
    )
    posterior.prior_var = prior_var
    if isinstance(posterior, LatentFact):
        posterior.kl_roles = roles
    return posterior
