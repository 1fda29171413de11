"""A link predictor: an entity table, a relation table and a scorer.

Which posterior (LIM, LFM or point) changes only the KL term (trainer/objective.py) and whether the
tables carry variances. With the softmax likelihood the relation table has 2*Nr rows: row r + Nr is
the reciprocal of r, so the head query (?, r, o) becomes the tail query (o, r^-1, ?).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sharding.table import LocalTable
from trainer.config import RunConfig
from trainer.gaussian import Gaussian
from trainer.scorers import Scorer, build_scorer


@dataclass
class KGModel:
    entities: LocalTable
    relations: LocalTable
    scorer: Scorer
    latent: str
    num_relations: int
    reciprocal: bool

    @property
    def variational(self) -> bool:
        return self.latent != "point"

    def candidate_scores(
        self, entities: torch.Tensor, relations: torch.Tensor, queries_B3: torch.Tensor, direction: str
    ) -> torch.Tensor:
        """Scores [B, Ne] of every entity as the missing ``direction`` ('tail' or 'head') of each query,
        given embedding matrices (means or one sample) of all entities and relations."""
        s, r, o = queries_B3.unbind(-1)
        if direction == "tail":
            return self.scorer.score_tails(entities[s], relations[r], entities)
        if self.reciprocal:
            return self.scorer.score_tails(entities[o], relations[r + self.num_relations], entities)
        return self.scorer.score_heads(relations[r], entities[o], entities)

    def posterior(self) -> tuple[Gaussian, Gaussian]:
        return self.entities.full(), self.relations.full()


def build_model(config: RunConfig, num_entities: int, num_relations: int) -> KGModel:
    generator = torch.Generator().manual_seed(config.train.seed)
    reciprocal = config.objective.likelihood == "softmax"
    table_args = dict(
        variational=config.model.latent != "point",
        optimizer=config.optim.optimizer,
        lr=config.optim.lr,
        generator=generator,
        init_std=config.model.init_std,
        init_logvar=config.model.init_logvar,
    )
    entities = LocalTable(num_entities, config.model.dim, **table_args)
    relations = LocalTable(num_relations * (2 if reciprocal else 1), config.model.dim, **table_args)
    return KGModel(
        entities=entities,
        relations=relations,
        scorer=build_scorer(config.model.scorer),
        latent=config.model.latent,
        num_relations=num_relations,
        reciprocal=reciprocal,
    )
