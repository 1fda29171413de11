"""Link-prediction ranking: raw and filtered ranks of the true head and tail, MR, MRR, Hits@k.

Ties are counted honestly: the rank of the true entity is the mean of its optimistic rank
(1 + #better) and pessimistic rank (#better + #equal, itself included), so a model that scores every
candidate alike gets (N + 1) / 2, not 1. Filtered ranks ignore other candidates that form a known
true fact (train + valid + test).
"""

from __future__ import annotations

import torch

from trainer.model import KGModel

HITS_AT = (1, 3, 10)


class FilterIndex:
    """Known answers per query key, looked up for a whole batch without Python loops.

    ``keys`` [F] identify queries (e.g. head * Nr + relation) and ``answers`` [F] the entity that
    completes each known fact.
    """

    def __init__(self, keys: torch.Tensor, answers: torch.Tensor):
        order = torch.argsort(keys, stable=True)
        self.keys, self.answers = keys[order], answers[order]

    def known(self, query_keys_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, entity) index pairs of every known answer to each query of the batch."""
        start = torch.searchsorted(self.keys, query_keys_B, side="left")
        stop = torch.searchsorted(self.keys, query_keys_B, side="right")
        counts = stop - start
        rows = torch.repeat_interleave(torch.arange(len(query_keys_B)), counts)
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        return rows, self.answers[torch.repeat_interleave(start, counts) + offsets]


def build_filters(known_facts: torch.Tensor, num_relations: int) -> dict[str, FilterIndex]:
    s, r, o = known_facts.unbind(-1)
    return {
        "tail": FilterIndex(s * num_relations + r, o),
        "head": FilterIndex(o * num_relations + r, s),
    }


def realistic_rank(scores_BN: torch.Tensor, true_B: torch.Tensor, exclude_BN: torch.Tensor | None) -> torch.Tensor:
    """Mean of optimistic and pessimistic rank of ``true_B`` among candidates not in ``exclude_BN``."""
    true_scores = scores_BN.gather(1, true_B.unsqueeze(1))
    better = scores_BN > true_scores
    equal = scores_BN == true_scores
    if exclude_BN is not None:
        better &= ~exclude_BN
        equal &= ~exclude_BN
    num_better = better.sum(1).double()
    num_equal = equal.sum(1).double()  # includes the true candidate itself
    return num_better + (1.0 + num_equal) / 2.0


def summarise(ranks: torch.Tensor) -> dict[str, float]:
    out = {"mr": ranks.mean().item(), "mrr": ranks.reciprocal().mean().item()}
    for k in HITS_AT:
        out[f"hits@{k}"] = (ranks <= k).double().mean().item()
    return out


@torch.no_grad()
def predictive_scores(
    model: KGModel, queries_B3: torch.Tensor, direction: str, num_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """Scores with the posterior means, or the predictive probability averaged over samples."""
    entities, relations = model.posterior()
    if num_samples == 0 or not model.variational:
        return model.candidate_scores(entities.mean, relations.mean, queries_B3, direction)
    total = None
    for _ in range(num_samples):
        logits = model.candidate_scores(entities.sample(generator), relations.sample(generator), queries_B3, direction)
        probs = logits.softmax(-1) if model.reciprocal else logits.sigmoid()
        total = probs if total is None else total + probs
    return total / num_samples


@torch.no_grad()
def evaluate(
    model: KGModel,
    facts: torch.Tensor,
    filters: dict[str, FilterIndex],
    *,
    batch_size: int = 512,
    num_samples: int = 0,
    seed: int = 0,
) -> dict:
    """Raw and filtered metrics over both directions of every fact in ``facts`` [N, 3]."""
    generator = torch.Generator().manual_seed(seed)
    ranks: dict[str, list[torch.Tensor]] = {"raw": [], "filtered": []}
    num_entities = model.entities.num_rows
    for batch in facts.split(batch_size):
        s, r, o = batch.unbind(-1)
        for direction, true, key in (
            ("tail", o, s * model.num_relations + r),
            ("head", s, o * model.num_relations + r),
        ):
            scores = predictive_scores(model, batch, direction, num_samples, generator)
            rows, known = filters[direction].known(key)
            exclude = torch.zeros(len(batch), num_entities, dtype=torch.bool)
            exclude[rows, known] = True
            exclude[torch.arange(len(batch)), true] = False
            ranks["raw"].append(realistic_rank(scores, true, None))
            ranks["filtered"].append(realistic_rank(scores, true, exclude))
    return {kind: summarise(torch.cat(values)) for kind, values in ranks.items()}
