"""A link predictor: an entity table, a relation table, a scorer, a posterior and a likelihood.

The entity table is row-sharded across ranks (all rows at world size 1); relations are replicated.
The posterior (trainer/posterior.py: LIM, LFM, point) decides what the owners send for their rows and
which KL the ELBO carries; the likelihood (trainer/likelihood.py: Bernoulli, softmax) scores a batch.
Both are chosen once, here. With a reciprocal likelihood the relation table has 2*Nr rows: row r + Nr
is the reciprocal of r, so the head query (?, r, o) becomes the tail query (o, r^-1, ?).

A step is ``forward_backward`` (encode the rows each batch needs, the negative ELBO's terms and their
gradients: written out where the likelihood and posterior allow, else traced by ``forward`` and
back-propagated), ``gradients`` (send them to the rows' owners) and ``update`` (the row optimisers);
trainer/step.py runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from sharding import rng
from sharding.exchange import Exchange, LocalExchange, Pending
from sharding.gaussian import Encoder, sample_and_kl, sample_kl_grad, sample_kl_values
from sharding.table import Encoded, ReplicatedTable, SampledGradient, ShardedTable
from trainer.config import RunConfig
from trainer.likelihood import FactRows, Likelihood, build_likelihood
from trainer.objective import n3_penalty
from trainer.posterior import Gathered, Posterior, build_posterior
from trainer.scorers import Scorer, build_scorer

COLLAPSED_LOGVAR = -20.0
"""An entity whose mean log-variance is below this (sigma < 5e-5) has collapsed onto a point estimate."""


@dataclass
class Forward:
    """A step's terms of the negative ELBO on this rank (KL before any multiplier), its regulariser, and
    the leaves whose gradients go back to the tables."""

    nll: torch.Tensor
    kl: torch.Tensor
    reg: torch.Tensor
    relation_leaf: torch.Tensor
    entity_leaf: torch.Tensor | None
    encoded: list[Encoded]
    bias_leaf: torch.Tensor | None = None
    encoded_check: torch.Tensor | None = None
    """Where the step wrote the encoded rows' gradients (``KGModel._written_step``): finite exactly when every
    one of them is (the kernel's check of each batch's rows, 0 or NaN, and the KL column's multiplier);
    ``gradient_sum`` reads it in place of the rows."""


@dataclass
class EncodedBatch:
    """One stream's batch with the rows its owners sent: the facts, their relation ids ``r``, where each part
    sits among the distinct rows (``rows``), what the owners sent (``item``) and its parts (``sample``, the
    KL per row ``entity_kl``, ``mean``)."""

    positives: torch.Tensor
    r: torch.Tensor
    rows: Gathered
    item: Encoded
    sample: torch.Tensor
    entity_kl: torch.Tensor
    mean: torch.Tensor


@dataclass
class Gradients:
    """The summed gradients of the rows a step touched: local entity rows (``entity_ids`` None: all of them,
    or those an unformed ``SampledGradient`` holds) and every relation row, whose sum over ranks is complete
    once ``relations_pending`` is waited for."""

    entity_ids: torch.Tensor | None
    entities: torch.Tensor | SampledGradient
    relations: torch.Tensor
    relations_pending: Pending
    bias: tuple[torch.Tensor, Pending] | None = None

    def wait(self) -> None:
        """Until the relation (and bias) gradients are summed over ranks."""
        self.relations_pending.wait()
        if self.bias is not None:
            self.bias[1].wait()


class KGModel:
    def __init__(
        self,
        entities: ShardedTable,
        relations: ReplicatedTable,
        scorer: Scorer,
        posterior: Posterior,
        likelihood: Likelihood,
        num_relations: int,
        n3_weight: float = 0.0,
        bias: ReplicatedTable | None = None,
        clip_sigma_norm: float | None = None,
        written_gradients: bool = True,
    ):
        self.entities, self.relations, self.scorer = entities, relations, scorer
        self.posterior, self.likelihood, self.num_relations = posterior, likelihood, num_relations
        self.n3_weight = n3_weight
        self.bias = bias
        """A point-estimate bias per relation [Nr, 1] added to every score (``objective.relation_bias``)."""
        self.clip_sigma_norm = clip_sigma_norm
        self.written_gradients = written_gradients
        """``train.written_gradients``: whether a step may write its gradients out (``writes_gradients`` decides)."""
        # The softmax and the full LIM KL touch every entity row: each rank takes its own rows whole.
        self.dense = likelihood.dense or posterior.dense_kl

    @property
    def variational(self) -> bool:
        return self.posterior.variational

    @property
    def reciprocal(self) -> bool:
        return self.likelihood.reciprocal

    @property
    def exchange(self) -> Exchange:
        return self.entities.exchange

    @property
    def device(self) -> torch.device:
        return self.entities.device

    def set_lr(self, lr: float) -> None:
        """The learning rate of every row optimiser (entities and relations)."""
        self.entities.optimizer.lr = lr
        self.relations.table.optimizer.lr = lr
        if self.bias is not None:
            self.bias.table.optimizer.lr = lr

    def forward_backward(
        self, batches: list[tuple[int, torch.Tensor]], share: float, key: tuple[int, ...], kl_multiplier: float
    ) -> tuple[Forward, torch.Tensor]:
        """``forward``, then the gradients of the loss nll + kl_multiplier * kl + reg in the leaves: (the
        forward, the loss). Written out where ``writes_gradients``, else traced and back-propagated."""
        if self.writes_gradients:
            return self._written_step(batches, share, key, kl_multiplier)
        forward = self.forward(batches, share, key)
        loss = forward.nll + kl_multiplier * forward.kl + forward.reg
        loss.backward()
        return forward, loss

    @cached_property
    def writes_gradients(self) -> bool:
        """Whether a step's gradients are written out rather than traced (``_written_step``): a likelihood
        that writes its gradients (the compiled Bernoulli kernel, ``Likelihood.writes_gradients``) under a
        posterior whose batch KL is a weighted sum of the rows' (``Posterior.weighted_fact_kl``: LIM with
        the per-occurrence KL, point estimates), with nothing dense and no N3, unless ``train.written_gradients``
        is off."""
        return (
            self.written_gradients and self.likelihood.writes_gradients(self.scorer, self.device)
            and self.posterior.weighted_fact_kl and not self.dense and not self.n3_weight
        )  # fmt: skip

    def forward(self, batches: list[tuple[int, torch.Tensor]], share: float, key: tuple[int, ...]) -> Forward:
        """The negative ELBO's terms of this rank's ``batches`` (stream, positives [B, 3]) in step ``key`` =
        (seed, epoch, step); ``share`` is this step's share of the epoch's whole-table KL."""
        ents, rels, posterior = self.entities, self.relations, self.posterior
        relation_leaf = rels.local()
        relation_eps = self._relation_noise(key)
        relations, relation_kl = sample_and_kl(relation_leaf, rels.dim, relation_eps, posterior.prior_var)
        bias_leaf = self.bias.local() if self.bias is not None else None
        entity_leaf = dense_eps = candidates = dense_kl = None
        if self.dense:
            entity_leaf = ents.local()
            dense_eps = ents.dense_noise(key) if self.variational else None
            candidates, dense_kl = sample_and_kl(entity_leaf, ents.dim, dense_eps, posterior.prior_var)

        encoder = posterior.encoder(ents.dim, key, dense_eps, keep_mean=self.n3_weight > 0)
        encoded: list[Encoded] = []
        nll = kl = reg = relation_leaf.new_zeros(())
        for stream, positives in batches:
            batch = self._encode_batch(stream, positives, key, encoder)
            encoded.append(batch.item)
            bias = bias_leaf[:, 0].index_select(0, batch.r) if bias_leaf is not None else None
            facts = FactRows(batch.sample, batch.rows, relations, batch.positives, bias)
            nll = nll + self.likelihood.nll(self.scorer, facts, relations, candidates)
            kl = kl + posterior.fact_kl(batch.entity_kl, relation_kl, batch.rows, batch.r)
            if self.n3_weight > 0:
                reg = reg + self.n3_weight * self._n3(batch.mean, relation_leaf, batch.rows, batch.r)
        kl = kl + posterior.table_kl(dense_kl, relation_kl, share, self.exchange.rank)
        return Forward(nll, kl, reg, relation_leaf, entity_leaf, encoded, bias_leaf)

    def _encode_batch(
        self, stream: int, positives: torch.Tensor, key: tuple[int, ...], encoder: Encoder
    ) -> EncodedBatch:
        """Draw one stream's negatives and have the owners encode every row its batch needs."""
        positives = positives.to(self.device, non_blocking=True)
        rows = Gathered.of(positives, self.likelihood.negatives(len(positives), key, stream))
        item = self.entities.encode(rows.ids, encoder, tag=stream)
        sample, entity_kl, mean = self.posterior.split(item.values, self.entities.dim)
        return EncodedBatch(positives, positives[:, 1], rows, item, sample, entity_kl, mean)

    def _written_step(
        self, batches: list[tuple[int, torch.Tensor]], share: float, key: tuple[int, ...], kl_multiplier: float
    ) -> tuple[Forward, torch.Tensor]:
        """``forward_backward`` with the gradients written out, not traced: each batch's NLL and its gradients
        in one call of the compiled kernel (``Likelihood.nll_and_gradients``), the KL's as the weights
        ``Posterior.fact_kl_weights`` times ``kl_multiplier``, the relations' sample and KL by the same
        operations ``sample_and_kl`` runs each way. The same numbers as the traced step, bit for bit, without
        the autograd engine and the ~20 small nodes a batch traces (a step 1.08x faster at PBG's sampling on
        WN18RR: docs/benchmarks.md). The owners' encoding stays an autograd node: its gradient travels back
        to them as in the traced step."""
        ents, rels, posterior = self.entities, self.relations, self.posterior
        relation_eps = self._relation_noise(key)
        relation_rows = rels.table.weight
        # Only the leaves' gradients are read (collect, the finiteness check): a view that holds no memory.
        relation_leaf = relation_rows.new_zeros(()).expand(relation_rows.shape)
        bias_rows = self.bias.table.weight if self.bias is not None else relation_rows.new_zeros(0, 1)
        bias_leaf = bias_rows.new_zeros(()).expand(bias_rows.shape) if self.bias is not None else None
        encoder = posterior.encoder(ents.dim, key, None, keep_mean=False)
        encoded: list[Encoded] = []
        saved: tuple[torch.Tensor, torch.Tensor] | None = None  # the relations' (mean, sigma)
        with torch.no_grad():
            if relation_eps is None:
                relations, relation_kl = relation_rows, relation_rows.new_zeros(len(relation_rows))
            else:
                relations, relation_kl, saved = sample_kl_values(relation_rows, relation_eps, posterior.prior_var)
        # Each batch's gradients in the relations and the biases, summed as the autograd engine sums them.
        relation_grads: list[torch.Tensor] = []
        bias_grads: list[torch.Tensor] = []
        nll = kl = relations.new_zeros(())
        # The kernel's check of each batch's gradient rows, then their KL column's: kl_multiplier times the
        # weights c / f (f >= 1), finite exactly when kl_multiplier is in float32.
        checks = torch.tensor([0.0] * len(batches) + [kl_multiplier], dtype=torch.float32, device=relation_rows.device)
        for i, (stream, positives) in enumerate(batches):
            batch = self._encode_batch(stream, positives, key, encoder)
            encoded.append(batch.item)
            values = batch.item.values
            if not len(batch.positives):  # a stream that ran out: the owners still served it (no rows)
                values.grad = torch.zeros_like(values)
                continue
            with torch.no_grad():
                bias = bias_rows[:, 0].index_select(0, batch.r) if self.bias is not None else None
                facts = FactRows(batch.sample, batch.rows, relations, batch.positives, bias)
                # [sample | KL] (or the rows themselves): the kernel writes the samples' columns.
                assert values.shape[1] <= ents.dim + 1, "the owners sent more than a sample and its KL"
                grad_values = torch.empty_like(values)
                terms = self.likelihood.nll_and_gradients(self.scorer, facts, grad_values, checks[i : i + 1])
                if terms is None:
                    raise ValueError("the likelihood wrote no gradients for a batch it was chosen to write")
                batch_nll, _, batch_grad_relations, batch_grad_bias = terms
                weights = posterior.fact_kl_weights(batch.rows, batch.entity_kl.dtype)
                batch_kl = batch.entity_kl.new_zeros(()) if weights is None else (batch.entity_kl * weights).sum()
                nll, kl = nll + batch_nll, kl + batch_kl
                if values.shape[1] > ents.dim:  # d loss / d KL: kl_multiplier times the row's weight
                    kl_column = grad_values[:, ents.dim]
                    if weights is None:
                        kl_column.zero_()
                    else:
                        torch.mul(weights, kl_multiplier, out=kl_column)
                values.grad = grad_values
                relation_grads.append(batch_grad_relations)
                if bias is not None and batch_grad_bias is not None:  # as the bias' index_select backward makes it
                    bias_grads.append(relations.new_zeros(len(bias_rows)).index_add_(0, batch.r, batch_grad_bias))
        with torch.no_grad():
            kl = kl + posterior.table_kl(None, relation_kl, share, self.exchange.rank)
            loss = nll + kl_multiplier * kl
            grad_relations, grad_bias = _engine_sum(relation_grads), _engine_sum(bias_grads)
            if saved is None or relation_eps is None:
                relation_leaf.grad = grad_relations
            else:
                table_weight = posterior.table_kl_weight(share, self.exchange.rank)
                grad_kl = (relation_rows.new_full((), kl_multiplier) * table_weight).expand(len(relation_rows))
                mean, std = saved
                relation_leaf.grad = sample_kl_grad(
                    mean, std, relation_eps, posterior.prior_var, grad_relations, grad_kl
                )
            if bias_leaf is not None and grad_bias is not None:
                bias_leaf.grad = grad_bias.unsqueeze(1)
        return Forward(nll, kl, relations.new_zeros(()), relation_leaf, None, encoded, bias_leaf, checks), loss

    @staticmethod
    def gradient_sum(forward: Forward) -> torch.Tensor:
        """The sum of every gradient this rank computed (relations, its dense entity rows, the encoded rows
        it asked for): finite exactly when every element is (an inf or a NaN anywhere carries into the sum;
        only gradients past 1e38 could overflow it, which a run should stop on anyway). One read of each
        gradient and no host sync, where an elementwise isfinite() is four passes and a sync per tensor. Where
        the step wrote the encoded rows' gradients, their check stands in for them (``Forward.encoded_check``),
        which says whether each number is finite, not whether their float sum is: finite rows whose sum
        passes 3.4e38 stop a traced step and not a written one (the next step's loss shows such a model)."""
        encoded = [] if forward.encoded_check is not None else [item.values for item in forward.encoded]
        leaves = [forward.relation_leaf, forward.entity_leaf, forward.bias_leaf, *encoded]
        sums = [t.grad.sum() for t in leaves if t is not None and t.grad is not None]
        if forward.encoded_check is not None:
            sums.append(forward.encoded_check.sum())
        return torch.stack(sums).sum() if sums else torch.zeros(())

    def gradients(self, forward: Forward, unformed: bool = False) -> Gradients:
        """After the backward: start summing the relation gradients over ranks and send the entity
        gradients back to their owners; ``unformed`` lets the entity rows' gradient stay unformed until
        the update where the row optimiser can form it as it goes (``ShardedTable.collect``)."""
        relation_grad, pending = self.relations.collect(forward.relation_leaf)
        bias = None
        if self.bias is not None and forward.bias_leaf is not None:
            bias = self.bias.collect(forward.bias_leaf)
        entity_ids, entity_grad = self.entities.collect(forward.encoded, forward.entity_leaf, unformed)
        return Gradients(entity_ids, entity_grad, relation_grad, pending, bias)

    def update(self, grads: Gradients) -> None:
        """The row optimisers' step; over gloo the entity update runs while the relation gradients travel
        (through shared memory they arrived with the entity gradients)."""
        updated = self.entities.step(grads.entity_ids, grads.entities)
        if self.clip_sigma_norm is not None:
            self.entities.clip_sigma_norm(updated, self.clip_sigma_norm)
        grads.relations_pending.wait()
        self.relations.step(grads.relations)
        if self.clip_sigma_norm is not None:
            self.relations.table.clip_sigma_norm(None, self.clip_sigma_norm)
        if self.bias is not None and grads.bias is not None:
            bias_grad, bias_pending = grads.bias
            bias_pending.wait()
            self.bias.step(bias_grad)

    def relation_bias(self, r: torch.Tensor) -> torch.Tensor | float:
        """The score bias of relations ``r`` (0 without ``objective.relation_bias``)."""
        if self.bias is None:
            return 0.0
        return self.bias.table.weight[:, 0].index_select(0, r)

    @torch.no_grad()
    def health(self) -> tuple[float, float, float]:
        """On this rank: (1 if any parameter is not finite else 0, entity rows whose variance collapsed,
        entity rows), to be summed over ranks."""
        finite, collapsed = self.entities.health(COLLAPSED_LOGVAR)
        finite = finite and bool(torch.isfinite(self.relations.table.weight).all())
        return float(not finite), float(collapsed), float(len(self.entities.weight))

    def _relation_noise(self, key: tuple[int, ...]) -> torch.Tensor | None:
        """The standard normal noise of every relation row's sample in step ``key`` (None: point rows)."""
        if not self.variational:
            return None
        generator = rng.step_generator(key, rng.RELATION_STREAM, self.device)
        return torch.randn(self.relations.num_rows, self.relations.dim, generator=generator, device=self.device)

    def _n3(self, entity_mean: torch.Tensor, relation_leaf: torch.Tensor, rows: Gathered, r: torch.Tensor):
        relation_mean = relation_leaf[:, : self.relations.dim]
        means = (
            entity_mean.index_select(0, rows.s),
            relation_mean.index_select(0, r),
            entity_mean.index_select(0, rows.o),
        )
        return n3_penalty(*means, complex_valued=self.scorer.name == "complex")

    def query(
        self, query_emb: torch.Tensor, relations: torch.Tensor, r: torch.Tensor, direction: str
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(entity embedding, relation embedding, side of the candidate) that scores the missing
        ``direction`` of queries whose known entity is ``query_emb`` and relation ids ``r``."""
        if direction == "tail":
            return query_emb, relations[r], "tail"
        if self.reciprocal:
            return query_emb, relations[r + self.num_relations], "tail"
        return query_emb, relations[r], "head"

    def score_candidates(
        self, query_emb: torch.Tensor, rel_emb: torch.Tensor, side: str, candidates: torch.Tensor
    ) -> torch.Tensor:
        if side == "tail":
            return self.scorer.score_tails(query_emb, rel_emb, candidates)
        return self.scorer.score_heads(rel_emb, query_emb, candidates)


def _engine_sum(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The sum of one tensor's gradients from several batches in the order the autograd engine adds them
    (the last batch's first: its nodes were made last), so a written step adds them as a traced one does."""
    if not grads:
        return None
    total = grads[-1]
    for grad in reversed(grads[:-1]):
        total = total + grad
    return total


def build_model(
    config: RunConfig,
    num_entities: int,
    num_relations: int,
    exchange: Exchange | None = None,
    device: torch.device | None = None,
    entity_frequency: torch.Tensor | None = None,
) -> KGModel:
    """The model a run's config describes; ``entity_frequency`` (training occurrences per entity) is
    needed to train with ``objective.kl_estimator=per_occurrence``."""
    exchange = exchange or LocalExchange()
    model_cfg, obj, optim = config.model, config.objective, config.optim
    variational = model_cfg.latent != "point"

    def table(rows: int, table_exchange: Exchange, seed: int, roles: int = 1) -> ShardedTable:
        return ShardedTable(
            rows, model_cfg.dim * roles, table_exchange, variational=variational, optimizer=optim.optimizer,
            lr=optim.lr, seed=seed, init_std=model_cfg.init_std, init_logvar=model_cfg.init_logvar,
            block_rows=config.sharding.block_rows, device=device, roles=roles,
        )  # fmt: skip

    roles = 2 if model_cfg.separate_roles else 1
    entities = table(num_entities, exchange, config.train.seed, roles)
    likelihood = build_likelihood(
        obj, negatives=config.sharding.negatives, num_entities=num_entities, num_relations=num_relations,
        shard=(entities.lo, entities.hi), exchange=exchange, device=entities.device,
        entity_frequency=entity_frequency,
    )  # fmt: skip
    relation_rows = num_relations * (2 if likelihood.reciprocal else 1)
    relations = ReplicatedTable(table(relation_rows, LocalExchange(), config.train.seed + 1), exchange)
    frequency = entity_frequency.to(entities.device) if entity_frequency is not None else None
    posterior = build_posterior(
        model_cfg.latent, obj.kl_estimator, num_relations=num_relations, reciprocal=likelihood.reciprocal,
        entity_frequency=frequency, prior_var=1.0 / model_cfg.dim if model_cfg.prior == "1/dim" else 1.0,
        roles=roles,
    )  # fmt: skip
    n3_weight = obj.reg_weight if obj.reg == "n3" else 0.0
    bias = None
    if obj.relation_bias:
        # Starts at 0 (no bias), a point estimate with the relations' optimiser.
        bias_table = ShardedTable(
            num_relations, 1, LocalExchange(), variational=False, optimizer=optim.optimizer, lr=optim.lr,
            seed=config.train.seed + 2, init_std=0.0, block_rows=config.sharding.block_rows, device=device,
        )  # fmt: skip
        bias = ReplicatedTable(bias_table, exchange)
    scorer = build_scorer(model_cfg.scorer, model_cfg.separate_roles)
    return KGModel(
        entities, relations, scorer, posterior, likelihood, num_relations, n3_weight, bias, optim.clip_sigma_norm,
        config.train.written_gradients,
    )  # fmt: skip
