"""The likelihood of a model: how a batch of facts is scored into the ELBO's data term
(``objective.likelihood``).

* ``bernoulli``: the paper's sigmoid likelihood. Each chunk of positives shares k uniform negatives
  (k/2 replace heads, k/2 tails), weighted 1/b- (Propositions 2 and 4); only the batch's rows are touched.
* ``softmax``: the 1-vs-all multinomial over every entity, with reciprocal relations (the head query
  (?, r, o) becomes the tail query (o, r^-1, ?)); it needs every local entity row as a candidate.

Chosen once when the model is built. New likelihoods plug in by subclassing ``Likelihood``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from sharding import rng
from sharding.exchange import Exchange
from trainer.objective import (
    LogZ,
    bernoulli_negative_weight,
    bernoulli_nll,
    chunk_negatives,
    sharded_log_z,
    softmax_nll,
)
from trainer.scorers import Scorer

if TYPE_CHECKING:
    from trainer.config import ObjectiveConfig

LikelihoodName = Literal["bernoulli", "softmax"]
NegativeSource = Literal["global", "local"]


@dataclass
class FactRows:
    """The sampled embeddings of one stream's batch: heads, relations and tails [B, D] of the positives,
    the relation ids [B], the negatives' rows [C*k, D] (empty without negatives) with their layout [C, k]."""

    s: torch.Tensor
    r: torch.Tensor
    o: torch.Tensor
    relation_ids: torch.Tensor
    neg: torch.Tensor
    neg_layout: torch.Size | None


class Likelihood:
    reciprocal = False
    """Whether the relation table carries a reciprocal row r + Nr for every relation r."""
    dense = False
    """Whether the data term scores every local entity row as a candidate."""

    def negatives(self, num_positives: int, key: tuple[int, ...], stream: int) -> torch.Tensor | None:
        """Entity ids of the sampled negatives of a batch of stream ``stream`` in step ``key`` = (seed, epoch,
        step) (None: the likelihood samples none)."""
        return None

    def nll(
        self, scorer: Scorer, facts: FactRows, relations: torch.Tensor, candidates: torch.Tensor | None
    ) -> torch.Tensor:
        """-E_q[log p(batch)] (one sample), given the batch's rows, the sampled relation table and, for a
        dense likelihood, this rank's sampled entity rows."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    def __init__(
        self,
        *,
        num_negatives: int,
        chunk: int,
        negative_weight: float | None,
        num_entities: int,
        source: NegativeSource,
        shard: tuple[int, int],
        device: torch.device,
    ):
        self.num_negatives, self.chunk, self.num_entities, self.device = num_negatives, chunk, num_entities, device
        self.weight = (
            bernoulli_negative_weight(num_entities, num_negatives) if negative_weight is None else negative_weight
        )
        # A shard can be empty when the table has fewer than world_size * block_rows rows: draw globally then.
        lo, hi = shard
        self.local_range = shard if source == "local" and hi > lo else None

    def negatives(self, num_positives: int, key: tuple[int, ...], stream: int) -> torch.Tensor:
        generator = rng.step_generator(key, stream, self.device)
        if self.local_range is not None:
            lo, hi = self.local_range
            return lo + chunk_negatives(num_positives, self.chunk, self.num_negatives, hi - lo, generator)
        return chunk_negatives(num_positives, self.chunk, self.num_negatives, self.num_entities, generator)

    def nll(
        self, scorer: Scorer, facts: FactRows, relations: torch.Tensor, candidates: torch.Tensor | None
    ) -> torch.Tensor:
        assert facts.neg_layout is not None, "the Bernoulli likelihood scores sampled negatives"
        neg = facts.neg.view(*facts.neg_layout, -1)
        return bernoulli_nll(scorer, facts.s, facts.r, facts.o, neg, self.chunk, self.weight)


class Softmax(Likelihood):
    reciprocal = True
    dense = True

    def __init__(self, *, num_relations: int, log_z: LogZ):
        self.num_relations, self.log_z = num_relations, log_z

    def nll(
        self, scorer: Scorer, facts: FactRows, relations: torch.Tensor, candidates: torch.Tensor | None
    ) -> torch.Tensor:
        assert candidates is not None, "the softmax likelihood scores every local entity"
        queries = torch.cat([facts.s, facts.o])
        reciprocal = relations.index_select(0, facts.relation_ids + self.num_relations)
        query_rel = torch.cat([facts.r, reciprocal])
        return softmax_nll(scorer, queries, query_rel, torch.cat([facts.o, facts.s]), candidates, self.log_z)


LIKELIHOODS: dict[LikelihoodName, type[Likelihood]] = {"bernoulli": Bernoulli, "softmax": Softmax}
"""The likelihoods by config name (``objective.likelihood``)."""


def build_likelihood(
    objective: ObjectiveConfig,
    *,
    negatives: NegativeSource,
    num_entities: int,
    num_relations: int,
    shard: tuple[int, int],
    exchange: Exchange,
    device: torch.device,
) -> Likelihood:
    """The configured likelihood for an entity table of ``num_entities`` of which this rank owns ``shard``."""
    cls = LIKELIHOODS[objective.likelihood]
    if cls is Softmax:
        return Softmax(num_relations=num_relations, log_z=sharded_log_z(exchange))
    return Bernoulli(
        num_negatives=objective.num_negatives, chunk=objective.negative_chunk,
        negative_weight=objective.negative_weight, num_entities=num_entities, source=negatives, shard=shard,
        device=device,
    )  # fmt: skip
