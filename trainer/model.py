"""A link predictor: an entity table, a relation table and a scorer.

Which posterior (LIM, LFM or point) changes only the KL term (trainer/objective.py) and whether the
tables carry variances. With the softmax likelihood the relation table has 2*Nr rows: row r + Nr is
the reciprocal of r, so the head query (?, r, o) becomes the tail query (o, r^-1, ?). The entity table
is row-sharded across ranks (all rows at world size 1); relations are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sharding.exchange import Exchange, LocalExchange
from sharding.table import ReplicatedTable, ShardedTable
from trainer.config import RunConfig
from trainer.scorers import Scorer, build_scorer


@dataclass
class KGModel:
    entities: ShardedTable
    relations: ReplicatedTable
    scorer: Scorer
    latent: str
    num_relations: int
    reciprocal: bool

    @property
    def variational(self) -> bool:
        return self.latent != "point"

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


def build_model(
    config: RunConfig,
    num_entities: int,
    num_relations: int,
    exchange: Exchange | None = None,
    device: torch.device | None = None,
) -> KGModel:
    exchange = exchange or LocalExchange()
    reciprocal = config.objective.likelihood == "softmax"
    table_args = dict(
        variational=config.model.latent != "point",
        optimizer=config.optim.optimizer,
        lr=config.optim.lr,
        init_std=config.model.init_std,
        init_logvar=config.model.init_logvar,
        block_rows=config.sharding.block_rows,
        device=device,
    )
    entities = ShardedTable(num_entities, config.model.dim, exchange, seed=config.train.seed, **table_args)
    relations = ReplicatedTable(
        num_relations * (2 if reciprocal else 1), config.model.dim, exchange, seed=config.train.seed + 1, **table_args
    )
    return KGModel(
        entities=entities,
        relations=relations,
        scorer=build_scorer(config.model.scorer),
        latent=config.model.latent,
        num_relations=num_relations,
        reciprocal=reciprocal,
    )
