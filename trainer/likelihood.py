"""The likelihood of a model: how a batch of facts is scored into the ELBO's data term
(``objective.likelihood``).

* ``bernoulli``: the paper's sigmoid likelihood. Each chunk of positives shares k uniform negatives
  (k//2 replace heads, the rest tails), weighted 1/b- (Propositions 2 and 4); only the batch's rows are touched.
* ``softmax``: the 1-vs-all multinomial over every entity, with reciprocal relations (the head query
  (?, r, o) becomes the tail query (o, r^-1, ?)); it needs every local entity row as a candidate.
* ``sampled_softmax``: the same multinomial with log Z estimated from candidates: k uniform negatives
  shared per chunk of positives plus the chunk's own answers (in-batch negatives), each corrected by the
  log of its expected count under that mixed proposal (log-Q); only the batch's rows are touched.

Chosen once when the model is built. New likelihoods plug in by subclassing ``Likelihood``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from sharding import rng
from sharding.exchange import Exchange
from sharding.kernels.native import BernoulliRows
from trainer.objective import (
    LogZ,
    bernoulli_negative_weight,
    bernoulli_nll,
    chunk_negatives,
    kernel_scores,
    position_weights,
    positioned_bernoulli_gradients,
    positioned_bernoulli_nll,
    positioned_bernoulli_rows,
    sampled_softmax_nll,
    sharded_log_z,
    softmax_nll,
)
from trainer.posterior import Gathered
from trainer.scorers import Scorer

if TYPE_CHECKING:
    from trainer.config import ObjectiveConfig

LikelihoodName = Literal["bernoulli", "softmax", "sampled_softmax"]
NegativeSource = Literal["global", "local"]


@dataclass(frozen=True)
class FactRows:
    """The sampled rows of one stream's batch: the batch's distinct entities' rows ``entities`` [U, D] with
    where each part of the batch sits among them (``rows``), every relation's row ``relations`` [R, D], the
    facts ``positives`` [B, 3] (entity and relation ids) and their relation biases ``bias`` [B] or None
    (``objective.relation_bias``).

    The per-fact rows (``s``, ``r``, ``o``, ``neg``) are gathered when first asked for, one gather for the
    entities' parts: a likelihood that reads the rows by position (the compiled Bernoulli) never copies
    them."""

    entities: torch.Tensor
    rows: Gathered
    relations: torch.Tensor
    positives: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def relation_ids(self) -> torch.Tensor:
        return self.positives[:, 1]

    @property
    def neg_layout(self) -> torch.Size | None:
        """[C, k] of the sampled negatives, or None without negatives."""
        return self.rows.neg.shape if self.rows.neg is not None else None

    @cached_property
    def negative_ids(self) -> torch.Tensor | None:
        """Entity ids of the negatives [C, k], or None."""
        return self.rows.ids[self.rows.neg] if self.rows.neg is not None else None

    @cached_property
    def _gathered(self) -> tuple[torch.Tensor, ...]:
        batch, gathered = len(self.positives), self.entities.index_select(0, self.rows.flat)
        # split, not slices: its backward is one concatenation (a slice's fills a zero tensor per slice).
        return gathered.split([batch, batch, len(gathered) - 2 * batch])

    @property
    def s(self) -> torch.Tensor:
        return self._gathered[0]

    @property
    def o(self) -> torch.Tensor:
        return self._gathered[1]

    @property
    def neg(self) -> torch.Tensor:
        """The negatives' rows [C*k, D] (empty without negatives)."""
        return self._gathered[2]

    @cached_property
    def r(self) -> torch.Tensor:
        return self.relations.index_select(0, self.relation_ids)


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

    def writes_gradients(self, scorer: Scorer, device: torch.device) -> bool:
        """Whether ``nll_and_gradients`` takes every batch of this scorer on this device."""
        return False

    def nll_and_gradients(
        self, scorer: Scorer, facts: FactRows, grad_out: torch.Tensor | None = None, check: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """``nll`` of a likelihood that needs no candidates, with its gradients written out: (the NLL, the
        gradient of ``facts.entities`` [U, D] (into the first D columns of ``grad_out`` [U, >= D] when given),
        of ``facts.relations``, of ``facts.bias`` or None); None where it has no written gradients (then
        ``nll`` is traced). ``check`` (one float32 element) receives 0 when every entity and relation
        gradient written is finite, else NaN."""
        return None


class SampledNegatives(Likelihood):
    """A likelihood that scores each chunk of ``chunk`` positives against k uniform negatives it shares,
    drawn from all entities or (``source=local``) from this worker's shard."""

    def __init__(
        self,
        *,
        num_negatives: int,
        chunk: int,
        num_entities: int,
        source: NegativeSource,
        shard: tuple[int, int],
        device: torch.device,
    ):
        self.num_negatives, self.chunk, self.num_entities, self.device = num_negatives, chunk, num_entities, device
        # A shard can be empty when the table has fewer than world_size * block_rows rows: draw globally then.
        lo, hi = shard
        self.local_range = shard if source == "local" and hi > lo else None

    def negatives(self, num_positives: int, key: tuple[int, ...], stream: int) -> torch.Tensor:
        generator = rng.step_generator(key, stream, self.device)
        if self.local_range is not None:
            lo, hi = self.local_range
            return lo + chunk_negatives(num_positives, self.chunk, self.num_negatives, hi - lo, generator)
        return chunk_negatives(num_positives, self.chunk, self.num_negatives, self.num_entities, generator)


class Bernoulli(SampledNegatives):
    def __init__(
        self,
        *,
        negative_weight: float | None,
        exclude_positives: bool = False,
        adversarial_temperature: float = 0.0,
        split_by_position: bool = False,
        **negatives: Any,
    ):
        super().__init__(**negatives)
        self.weight = (
            bernoulli_negative_weight(self.num_entities, self.num_negatives)
            if negative_weight is None
            else negative_weight
        )
        self.exclude_positives, self.adversarial_temperature = exclude_positives, adversarial_temperature
        self.split_by_position = split_by_position

    @property
    def uniform(self) -> bool:
        """Whether every negative weighs ``weight`` (what the compiled kernel computes)."""
        return not (self.exclude_positives or self.split_by_position or self.adversarial_temperature)

    def writes_gradients(self, scorer: Scorer, device: torch.device) -> bool:
        return self.uniform and kernel_scores(scorer) and device.type == "cpu"

    def nll_and_gradients(
        self, scorer: Scorer, facts: FactRows, grad_out: torch.Tensor | None = None, check: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        rows = self._kernel_rows(scorer, facts)
        return None if rows is None else positioned_bernoulli_gradients(rows, self.weight, grad_out, check)

    def _kernel_rows(self, scorer: Scorer, facts: FactRows) -> BernoulliRows | None:
        """The batch as the compiled kernel takes it, or None where it does not (weighted negatives, another
        scorer or device)."""
        if not self.uniform or facts.neg_layout is None:
            return None
        return positioned_bernoulli_rows(
            scorer, facts.entities, facts.rows.flat, facts.relations, facts.relation_ids, facts.neg_layout[1],
            self.chunk, facts.bias,
        )  # fmt: skip

    def nll(
        self, scorer: Scorer, facts: FactRows, relations: torch.Tensor, candidates: torch.Tensor | None
    ) -> torch.Tensor:
        assert facts.neg_layout is not None, "the Bernoulli likelihood scores sampled negatives"
        if not len(facts.positives):  # a stream that ran out
            return facts.entities.new_zeros(())
        rows = self._kernel_rows(scorer, facts)
        if rows is not None:
            return positioned_bernoulli_nll(rows, self.weight)
        neg = facts.neg.view(*facts.neg_layout, -1)
        keep = self._keep(facts) if self.exclude_positives else None
        weight, positive_weight = self.weight, None
        if self.split_by_position:
            positive_weight, scale = position_weights(len(facts.s), self.num_negatives, weight)
            positive_weight, scale = (
                positive_weight.to(neg.device),
                self._chunked(scale.to(neg.device), facts.negative_ids),
            )
            keep, weight = (scale if keep is None else scale * keep), 1.0
        return bernoulli_nll(
            scorer, facts.s, facts.r, facts.o, neg, self.chunk, weight,
            keep_CBK=keep, adversarial_temperature=self.adversarial_temperature,
            positive_weight_B=positive_weight, bias_B=facts.bias,
        )  # fmt: skip

    def _chunked(self, per_positive: torch.Tensor, negative_ids: torch.Tensor | None) -> torch.Tensor:
        """[B, k] -> [C, chunk, k], padded with zeros."""
        assert negative_ids is not None
        num_chunks = negative_ids.shape[0]
        pad = num_chunks * self.chunk - len(per_positive)
        return F.pad(per_positive, (0, 0, 0, pad)).view(num_chunks, self.chunk, -1)

    def _keep(self, facts: FactRows) -> torch.Tensor:
        """[C, chunk, k]: False where a head corruption is the positive's own head or a tail corruption
        its own tail (the corrupted fact is the positive itself)."""
        assert facts.negative_ids is not None
        num_chunks, num_neg = facts.negative_ids.shape
        pad = num_chunks * self.chunk - len(facts.positives)
        ids = F.pad(facts.positives, (0, 0, 0, pad), value=-1).view(num_chunks, self.chunk, 3)
        half = num_neg // 2
        negs = facts.negative_ids.unsqueeze(1)
        return torch.cat([negs[..., :half] != ids[..., :1], negs[..., half:] != ids[..., 2:]], dim=-1)


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


class SampledSoftmax(SampledNegatives):
    """The multinomial likelihood with a sampled log-partition; the chunk's answers join its negatives."""

    reciprocal = True

    def __init__(
        self,
        *,
        num_relations: int,
        entity_frequency: torch.Tensor | None,
        in_batch: bool,
        **negatives: Any,
    ):
        super().__init__(**negatives)
        self.num_relations, self.in_batch = num_relations, in_batch
        # Expected draws of entity e among a chunk's answers: chunk * freq(e) / |train| (freq counts head
        # and tail occurrences); uniform when the frequencies are not known.
        if entity_frequency is None:
            entity_frequency = torch.ones(self.num_entities, device=self.device)
        frequency = entity_frequency.to(self.device, torch.float64).clamp_min(1.0)
        self.answer_rate = (frequency / (frequency.sum() / 2)).float()

    def nll(
        self, scorer: Scorer, facts: FactRows, relations: torch.Tensor, candidates: torch.Tensor | None
    ) -> torch.Tensor:
        assert facts.neg_layout is not None and facts.negative_ids is not None, "sampled negatives are needed"
        num_pos, dim = facts.s.shape
        num_chunks, num_neg = facts.neg_layout
        pad = num_chunks * self.chunk - num_pos

        def chunked(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            x = F.pad(x, (0, 0, 0, pad), value=fill) if pad else x
            return x.view(num_chunks, self.chunk, *x.shape[1:])

        reciprocal = relations.index_select(0, facts.relation_ids + self.num_relations)
        s, o, r, r_inv = chunked(facts.s), chunked(facts.o), chunked(facts.r), chunked(reciprocal)
        ids = chunked(facts.positives, fill=-1)  # padding: id -1, never an answer
        queries, query_rel = torch.cat([s, o], dim=1), torch.cat([r, r_inv], dim=1)  # (s, r, ?) and (o, r^-1, ?)
        answers, answer_ids = torch.cat([o, s], dim=1), torch.cat([ids[..., 2], ids[..., 0]], dim=1)
        cand, cand_ids = facts.neg.view(num_chunks, num_neg, dim), facts.negative_ids
        if self.in_batch:
            cand, cand_ids = torch.cat([cand, answers], dim=1), torch.cat([cand_ids, answer_ids], dim=1)
        pos = scorer.score(queries, query_rel, answers)
        logits = scorer.score_tails(queries, query_rel, cand)
        hit = (cand_ids.unsqueeze(1) == answer_ids.unsqueeze(2)) | (cand_ids < 0).unsqueeze(1)
        nll = sampled_softmax_nll(pos, logits, self._log_q(cand_ids), hit)
        return nll.masked_fill(answer_ids < 0, 0.0).sum()

    def _log_q(self, cand_ids: torch.Tensor) -> torch.Tensor:
        """log of each candidate's expected count under the mixed proposal [C, M]."""
        lo, hi = self.local_range or (0, self.num_entities)
        safe = cand_ids.clamp_min(0)
        uniform = ((safe >= lo) & (safe < hi)).float() * (self.num_negatives / (hi - lo))
        answers = self.answer_rate[safe] * self.chunk if self.in_batch else torch.zeros_like(uniform)
        return torch.log(uniform + answers)


LIKELIHOODS: dict[LikelihoodName, type[Likelihood]] = {
    "bernoulli": Bernoulli,
    "softmax": Softmax,
    "sampled_softmax": SampledSoftmax,
}
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
    entity_frequency: torch.Tensor | None = None,
) -> Likelihood:
    """The configured likelihood for an entity table of ``num_entities`` of which this rank owns ``shard``;
    ``entity_frequency`` (training occurrences) sets the in-batch proposal of the sampled softmax."""
    cls = LIKELIHOODS[objective.likelihood]
    if cls is Softmax:
        return Softmax(num_relations=num_relations, log_z=sharded_log_z(exchange))
    sampling: dict[str, Any] = dict(
        num_negatives=objective.num_negatives, chunk=objective.negative_chunk, num_entities=num_entities,
        source=negatives, shard=shard, device=device,
    )  # fmt: skip
    if cls is SampledSoftmax:
        return SampledSoftmax(
            num_relations=num_relations, entity_frequency=entity_frequency, in_batch=objective.in_batch_negatives,
            **sampling,
        )  # fmt: skip
    return Bernoulli(
        negative_weight=objective.negative_weight, exclude_positives=objective.exclude_positives,
        adversarial_temperature=objective.adversarial_temperature, split_by_position=objective.split_by_position,
        **sampling,
    )  # fmt: skip
