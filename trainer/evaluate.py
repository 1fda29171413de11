"""Link-prediction ranking: raw and filtered ranks of the true head and tail, MR, MRR, Hits@k.

Ties are counted honestly: the rank of the true entity is the mean of its optimistic rank
(1 + #better) and pessimistic rank (#better + #equal, itself included), so a model that scores every
candidate alike gets (N + 1) / 2, not 1. A NaN score is the worst: a NaN true answer ranks last.
Filtered ranks ignore other candidates that form a known true fact (train + valid + test).

With a sharded entity table every rank scores the same queries against its own candidates and the
counts of better and equal candidates are summed across ranks: no rank holds all entities.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sharding import rng
from sharding.exchange import sharded_log_partition
from sharding.gaussian import sampler
from trainer.model import KGModel

if TYPE_CHECKING:
    from storage.dataset import KGDataset
    from trainer.config import EvalConfig

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


def summarise(ranks: torch.Tensor) -> dict[str, float]:
    out = {"mr": ranks.mean().item(), "mrr": ranks.reciprocal().mean().item()}
    for k in HITS_AT:
        out[f"hits@{k}"] = (ranks <= k).double().mean().item()
    return out


@torch.no_grad()
def predictive_scores(
    model: KGModel, known: torch.Tensor, r: torch.Tensor, direction: str, num_samples: int, seed: int
) -> torch.Tensor:
    """[B, local candidates]: scores with the posterior means, or the predictive probability (softmax over
    all entities with the 1-vs-all likelihood, else sigmoid) averaged over ``num_samples`` draws."""
    ents, rels = model.entities, model.relations
    if num_samples == 0 or not model.variational:
        query, rel, side = model.query(ents.lookup(known)[:, : ents.dim], rels.full().mean, r, direction)
        return model.score_candidates(query, rel, side, ents.full().mean)
    unique, inverse = torch.unique(known, return_inverse=True)
    own, rel_q = ents.full(), rels.full()
    total = torch.zeros(())
    for k in range(num_samples):
        key = (seed, rng.EVAL_SAMPLES, k)
        local_eps = ents.dense_noise(key)
        candidates = own.draw(local_eps)
        queries = ents.encode(unique, sampler(local_eps)).values[inverse]
        rel_eps = torch.randn(rel_q.mean.shape, generator=rng.generator(key)).to(rel_q.mean.device)
        relations = rel_q.draw(rel_eps)
        logits = model.score_candidates(*model.query(queries.detach(), relations, r, direction), candidates)
        if model.reciprocal:
            probs = torch.exp(logits - sharded_log_partition(logits, model.exchange).unsqueeze(-1))
        else:
            probs = logits.sigmoid()
        total = total + probs
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
    """Raw and filtered metrics over both directions of every fact in ``facts`` [N, 3] (same on every rank)."""
    ents, exchange = model.entities, model.exchange
    lo, hi = ents.lo, ents.hi
    ranks: dict[str, list[torch.Tensor]] = {"raw": [], "filtered": []}
    device = model.device
    for batch in facts.split(batch_size):
        batch = batch.to(device)
        s, r, o = batch.unbind(-1)
        rows_B = torch.arange(len(batch), device=device)
        for direction, known, true, key in (
            ("tail", s, o, s * model.num_relations + r),
            ("head", o, s, o * model.num_relations + r),
        ):
            scores = predictive_scores(model, known, r, direction, num_samples, seed)
            owned = (true >= lo) & (true < hi)
            is_true = torch.zeros_like(scores, dtype=torch.bool)
            is_true[rows_B[owned], true[owned] - lo] = True
            # The true candidate's score as its owner computed it, shared with every rank.
            true_scores = torch.zeros(len(batch), dtype=torch.float64, device=device)
            true_scores[owned] = scores[rows_B[owned], true[owned] - lo].double()
            true_scores = exchange.all_reduce(true_scores).to(scores.dtype).unsqueeze(1)
            # A NaN score is the worst: a NaN candidate beats nothing, a NaN true answer ranks last.
            true_nan = true_scores.isnan()
            scores = scores.nan_to_num(nan=-torch.inf)
            answer_rows, answers = (t.to(device) for t in filters[direction].known(key.cpu()))
            mine = (answers >= lo) & (answers < hi)
            exclude = torch.zeros_like(is_true)
            exclude[answer_rows[mine], answers[mine] - lo] = True
            better = ((scores > true_scores) | true_nan) & ~is_true
            equal = (scores == true_scores) & ~is_true & ~true_nan
            counts = torch.stack([better.sum(1), equal.sum(1), (better & ~exclude).sum(1), (equal & ~exclude).sum(1)])
            counts = exchange.all_reduce(counts.double())
            ranks["raw"].append((counts[0] + 1.0 + counts[1] / 2.0).cpu())
            ranks["filtered"].append((counts[2] + 1.0 + counts[3] / 2.0).cpu())
    return {kind: summarise(torch.cat(values)) for kind, values in ranks.items()}


def evaluate_run(eval_cfg: EvalConfig, seed: int, model: KGModel, dataset: KGDataset, filters: dict) -> dict:
    """Validation and test metrics of a trained model, as ``metrics.json`` holds them."""
    kwargs = dict(batch_size=eval_cfg.batch_size, num_samples=eval_cfg.num_samples, seed=seed)
    return {
        "dataset": dataset.name,
        "valid": evaluate(model, dataset.valid, filters, **kwargs),
        "test": evaluate(model, dataset.test, filters, **kwargs),
        "dropped_facts": sum(dataset.dropped.values()),
        "dropped_by_split": dataset.dropped,
    }
