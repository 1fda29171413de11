"""Link-prediction ranking: raw and filtered ranks of the true head and tail, MR, MRR, Hits@k.

Ties are counted honestly: the rank of the true entity is the mean of its optimistic rank
(1 + #better) and pessimistic rank (#better + #equal, itself included), so a model that scores every
candidate alike gets (N + 1) / 2, not 1. A NaN score is the worst: a NaN true answer ranks last.
Filtered ranks ignore other candidates that form a known true fact (train + valid + test).

Two protocols (``eval.protocol``, docs/evaluation.md): ``exact`` ranks the answer against every entity;
``sampled`` against K candidates drawn per batch of queries, uniformly and/or in proportion to their
training frequency (PyTorch-BigGraph, DGL-KE), on a seeded sample of facts. With K >= the number of
entities the candidates are every entity and the two are the same computation.

With a sharded entity table every rank scores the same queries against the candidates it owns and the
counts of better and equal candidates are summed across ranks: no rank holds all entities, no candidate
row travels, and each rank keeps only the known facts whose answer it owns (``build_filters``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from tqdm import tqdm

from sharding import rng
from sharding.exchange import sharded_log_partition
from sharding.gaussian import Encoder, Gaussian, gather, sampler

if TYPE_CHECKING:
    from sharding.table import Segment, ShardedTable
    from storage.dataset import KGDataset
    from trainer.config import EvalConfig
    from trainer.model import KGModel

EvalProtocol = Literal["exact", "sampled"]
HITS_AT = (1, 3, 10)


class FilterIndex:
    """Known answers per query key, looked up for a whole batch without Python loops.

    ``keys`` [F] identify queries (e.g. head * Nr + relation) and ``answers`` [F] the entity that
    completes each known fact; they are kept sorted by (key, answer).
    """

    def __init__(self, keys: torch.Tensor, answers: torch.Tensor):
        order = torch.argsort(answers, stable=True)
        order = order[torch.argsort(keys[order], stable=True)]
        self.keys, self.answers = keys[order], answers[order]

    def known(self, query_keys_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, entity) index pairs of every known answer to each query of the batch."""
        start = torch.searchsorted(self.keys, query_keys_B, side="left")
        stop = torch.searchsorted(self.keys, query_keys_B, side="right")
        counts = stop - start
        rows = torch.repeat_interleave(torch.arange(len(query_keys_B), device=counts.device), counts)
        offsets = torch.arange(int(counts.sum()), device=counts.device) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts
        )
        return rows, self.answers[torch.repeat_interleave(start, counts) + offsets]

    def contains(self, query_keys_B: torch.Tensor, answers_BC: torch.Tensor) -> torch.Tensor:
        """[B, C]: whether answer [b, c] completes a known fact of query b. A binary search per pair, so a
        query with millions of known answers (Freebase's type facts) costs no more than one with a few."""
        if len(self.keys) == 0:
            return torch.zeros(answers_BC.shape, dtype=torch.bool)
        stop_BC = torch.searchsorted(self.keys, query_keys_B, side="right").unsqueeze(1).expand_as(answers_BC)
        lo_BC = torch.searchsorted(self.keys, query_keys_B, side="left").unsqueeze(1).expand_as(answers_BC)
        hi_BC, last = stop_BC, len(self.answers) - 1
        while True:
            active = lo_BC < hi_BC
            if not bool(active.any()):
                break
            mid_BC = (lo_BC + hi_BC) // 2
            less = self.answers[mid_BC.clamp(max=last)] < answers_BC
            lo_BC = torch.where(active & less, mid_BC + 1, lo_BC)
            hi_BC = torch.where(active & ~less, mid_BC, hi_BC)
        return (lo_BC < stop_BC) & (self.answers[lo_BC.clamp(max=last)] == answers_BC)


def build_filters(
    known_facts: torch.Tensor | Iterable[torch.Tensor],
    num_relations: int,
    answer_range: tuple[int, int] | None = None,
) -> dict[str, FilterIndex]:
    """Filter indexes of the known facts ([F, 3], or chunks of them). With ``answer_range`` (this rank's
    entity rows) only the facts whose answer lies in it are kept: a candidate is ranked by its owner, so
    a rank needs no other, and holds 1/W of the known facts."""
    chunks = [known_facts] if isinstance(known_facts, torch.Tensor) else known_facts
    keys: dict[str, list[torch.Tensor]] = {"tail": [], "head": []}
    answers: dict[str, list[torch.Tensor]] = {"tail": [], "head": []}
    for facts in chunks:
        s, r, o = facts.unbind(-1)
        for side, query, answer in (("tail", s, o), ("head", o, s)):
            keep = torch.ones_like(answer, dtype=torch.bool)
            if answer_range is not None:
                keep = (answer >= answer_range[0]) & (answer < answer_range[1])
            keys[side].append((query * num_relations + r)[keep])
            answers[side].append(answer[keep])
    return {side: FilterIndex(torch.cat(keys[side]), torch.cat(answers[side])) for side in keys}


def rank_filters(dataset: KGDataset, shard: tuple[int, int]) -> dict[str, FilterIndex]:
    """This rank's filters: the known facts whose answer lies in its entity rows ``shard``, read one train
    row group at a time so that no rank ever holds all of train."""
    return build_filters(dataset.known_chunks(), dataset.num_relations, answer_range=shard)


def sample_facts(facts: torch.Tensor, max_facts: int | None, seed: int) -> torch.Tensor:
    """A seeded sample of ``max_facts`` facts in stored order (all when None or more): the same on every rank
    and at every evaluation of a run, so successive validation MRRs compare the same facts."""
    if max_facts is None or max_facts >= len(facts):
        return facts
    chosen = torch.randperm(len(facts), generator=rng.generator((seed, rng.EVAL_FACTS)), device="cpu")[:max_facts]
    return facts[chosen.sort().values]


class CandidateSampler:
    """The K candidates of each evaluation batch: ``num_uniform`` uniform over every entity and ``num_degree``
    in proportion to training frequency, with replacement (PyTorch-BigGraph's uniform and batch negatives,
    DGL-KE's ``neg_deg_sample_eval``). Every rank draws the same K numbers from a generator keyed by
    (seed, batch, side), never by rank, and keeps the candidates in its own rows ``row_range``: the
    multiset of candidates is the same at any world size. Degree draws invert a cumulative count of the
    rank's own rows only ([N / W] int64), not of every entity."""

    def __init__(
        self,
        num_entities: int,
        row_range: tuple[int, int],
        *,
        num_uniform: int,
        num_degree: int,
        frequency: torch.Tensor | None,
        seed: int,
    ):
        if num_degree and frequency is None:
            raise ValueError("eval.degree_candidates needs the entities' training frequency")
        self.num_entities, self.num_uniform, self.num_degree, self.seed = num_entities, num_uniform, num_degree, seed
        self.lo, self.hi = row_range
        self.total = self.offset = 0
        self.cumulative_L = torch.zeros(0, dtype=torch.int64)
        if num_degree and frequency is not None:
            frequency = frequency.to(torch.int64)
            self.total = int(frequency.sum())
            self.offset = int(frequency[: self.lo].sum())
            self.cumulative_L = frequency[self.lo : self.hi].cumsum(0)

    @property
    def every_entity(self) -> bool:
        """K reaches the number of entities: rank against every entity, which is the exact protocol."""
        return self.num_uniform + self.num_degree >= self.num_entities

    def local(self, batch: int, side: int) -> torch.Tensor:
        """Local row indices of this rank's candidates for batch ``batch``, side ``side`` (0 tail, 1 head),
        repeated as often as they were drawn."""
        generator = rng.generator((self.seed, rng.EVAL_CANDIDATES, batch, side))
        uniform_K = torch.randint(0, self.num_entities, (self.num_uniform,), generator=generator, device="cpu")
        uniform = uniform_K[(uniform_K >= self.lo) & (uniform_K < self.hi)] - self.lo
        if not self.num_degree:
            return uniform
        draws_K = (
            torch.randint(0, max(self.total, 1), (self.num_degree,), generator=generator, device="cpu") - self.offset
        )
        local_total = int(self.cumulative_L[-1]) if len(self.cumulative_L) else 0
        mine = draws_K[(draws_K >= 0) & (draws_K < local_total)]
        return torch.cat([uniform, torch.searchsorted(self.cumulative_L, mine, side="right")])


def summarise(ranks: torch.Tensor) -> dict[str, float]:
    out = {"mr": ranks.mean().item(), "mrr": ranks.reciprocal().mean().item()}
    for k in HITS_AT:
        out[f"hits@{k}"] = (ranks <= k).double().mean().item()
    return out


def block_sampler(table: ShardedTable, key: tuple[int, ...]) -> Encoder:
    """An owner's draw for the rows it serves, with the noise ``dense_noise(key)`` would give them, drawn
    only for their blocks (a sampled evaluation touches a few rows, not the whole shard)."""

    def sample(weight: torch.Tensor, local: torch.Tensor, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = gather(weight, local)
        return rows, Gaussian.of_rows(rows, table.dim).draw(table.block_noise(local, key))

    return sample


@torch.no_grad()
def predictive_scores(
    model: KGModel,
    known: torch.Tensor,
    r: torch.Tensor,
    direction: str,
    num_samples: int,
    seed: int,
    columns_C: torch.Tensor | None = None,
    weights_C: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, C]: scores against this rank's candidate rows ``columns_C`` (None: every local row) with the
    posterior means, or the predictive probability (softmax with the 1-vs-all likelihood, else sigmoid)
    averaged over ``num_samples`` draws. The softmax is normalised over every entity, or, with sampled
    candidates, over the drawn ones (``weights_C``: how often each column was drawn)."""
    ents, rels = model.entities, model.relations
    own = ents.full() if columns_C is None else Gaussian.of_rows(ents.weight.index_select(0, columns_C), ents.dim)
    if num_samples == 0 or not model.variational:
        query, rel, side = model.query(ents.lookup(known)[:, : ents.dim], rels.full().mean, r, direction)
        return model.score_candidates(query, rel, side, own.mean)
    unique, inverse = torch.unique(known, return_inverse=True)
    rel_q = rels.full()
    total = torch.zeros((), device=own.mean.device)
    for k in range(num_samples):
        key = (seed, rng.EVAL_SAMPLES, k)
        encoder: Encoder
        if columns_C is None:
            local_eps = ents.dense_noise(key)
            candidates, encoder = own.draw(local_eps), sampler(local_eps)
        else:
            candidates, encoder = own.draw(ents.block_noise(columns_C, key)), block_sampler(ents, key)
        queries = ents.encode(unique, encoder).values[inverse]
        # Drawn on the CPU whatever the device: the same relation noise on every device.
        rel_eps = torch.randn(rel_q.mean.shape, generator=rng.generator(key), device="cpu").to(rel_q.mean.device)
        relations = rel_q.draw(rel_eps)
        logits = model.score_candidates(*model.query(queries.detach(), relations, r, direction), candidates)
        if model.reciprocal:
            drawn = logits if weights_C is None else logits + weights_C.log().to(logits.dtype)
            probs = torch.exp(logits - sharded_log_partition(drawn, model.exchange).unsqueeze(-1))
        else:
            bias = model.relation_bias(r)
            probs = (logits + bias.unsqueeze(-1) if isinstance(bias, torch.Tensor) else logits).sigmoid()
        total = total + probs
    return total / num_samples


def candidate_columns(
    drawn_K: torch.Tensor, true_B: torch.Tensor, row_range: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local rows [C], times drawn [C] float64): the drawn candidates and the true answers this rank owns,
    scored in one product so that a true answer's score and a candidate's are computed alike (ties)."""
    lo, hi = row_range
    owned_true = true_B[(true_B >= lo) & (true_B < hi)] - lo
    columns_C, inverse = torch.unique(torch.cat([drawn_K, owned_true]), return_inverse=True)
    weights_C = torch.zeros(len(columns_C), dtype=torch.float64, device=drawn_K.device)
    weights_C.index_add_(
        0, inverse[: len(drawn_K)], torch.ones(len(drawn_K), dtype=torch.float64, device=drawn_K.device)
    )
    return columns_C, weights_C


def rank_side(
    model: KGModel,
    scores_BC: torch.Tensor,
    true_B: torch.Tensor,
    keys_B: torch.Tensor,
    index: FilterIndex,
    columns_C: torch.Tensor | None = None,
    weights_C: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw and filtered ranks [B] of the true answers among every rank's candidate columns (``columns_C``
    local rows counted ``weights_C`` times; None: every local row once)."""
    exchange, lo, hi = model.exchange, model.entities.lo, model.entities.hi
    device = scores_BC.device
    rows_B = torch.arange(len(true_B), device=device)
    owned = (true_B >= lo) & (true_B < hi)
    true_column_B = true_B - lo if columns_C is None else torch.searchsorted(columns_C, true_B - lo)
    is_true = torch.zeros_like(scores_BC, dtype=torch.bool)
    is_true[rows_B[owned], true_column_B[owned]] = True
    # The true candidate's score as its owner computed it, shared with every rank.
    true_scores = torch.zeros(len(true_B), dtype=torch.float64, device=device)
    true_scores[owned] = scores_BC[rows_B[owned], true_column_B[owned]].double()
    true_scores = exchange.all_reduce(true_scores).to(scores_BC.dtype).unsqueeze(1)
    # A NaN score is the worst: a NaN candidate beats nothing, a NaN true answer ranks last.
    true_nan = true_scores.isnan()
    scores_BC = scores_BC.nan_to_num(nan=-torch.inf)
    if columns_C is None:
        answer_rows, answers = (t.to(device) for t in index.known(keys_B.cpu()))
        mine = (answers >= lo) & (answers < hi)
        exclude = torch.zeros_like(is_true)
        exclude[answer_rows[mine], answers[mine] - lo] = True
    else:
        answers_BC = (columns_C.cpu() + lo).unsqueeze(0).expand(len(keys_B), -1)
        exclude = index.contains(keys_B.cpu(), answers_BC).to(device)
    better = ((scores_BC > true_scores) | true_nan) & ~is_true
    equal = (scores_BC == true_scores) & ~is_true & ~true_nan
    masks = (better, equal, better & ~exclude, equal & ~exclude)
    if weights_C is None:
        # count_nonzero, not sum: the same integers, 4x faster over [B, N] bools (measured, 2 CPU cores).
        counts = torch.stack([mask.count_nonzero(1) for mask in masks]).double()
    else:
        counts = torch.stack([mask.double() @ weights_C for mask in masks])
    counts = exchange.all_reduce(counts)
    return (counts[0] + 1.0 + counts[1] / 2.0).cpu(), (counts[2] + 1.0 + counts[3] / 2.0).cpu()


def exact_batch_size(batch_size: int, largest_shard: int, max_score_bytes: int) -> int:
    """Queries per step against every entity: ``batch_size``, or fewer where the [B, largest shard] cells
    would outgrow ``max_score_bytes`` (the same on every rank: each batch is a collective)."""
    return max(1, min(batch_size, max_score_bytes // (BYTES_PER_PAIR["exact"] * max(largest_shard, 1))))


@torch.no_grad()
def evaluate(
    model: KGModel,
    facts: torch.Tensor,
    filters: dict[str, FilterIndex],
    *,
    batch_size: int = 512,
    num_samples: int = 0,
    seed: int = 0,
    candidates: CandidateSampler | None = None,
    progress: str | None = None,
    max_score_bytes: int = 2048 << 20,
) -> dict:
    """Raw and filtered metrics over both directions of every fact in ``facts`` [N, 3] (same on every rank),
    against every entity, or against the ``candidates`` of each batch. ``progress``: the label of a progress
    bar over the batches, shown by rank 0 on a terminal (None: no bar). Against every entity, a batch holds
    at most as many queries as keep [batch, largest shard] scores and masks under ``max_score_bytes``."""
    ents, device = model.entities, model.device
    sampled = candidates is not None and not candidates.every_entity
    if not sampled:
        batch_size = exact_batch_size(
            batch_size, max(b - a for a, b in itertools.pairwise(ents.plan.bounds)), max_score_bytes
        )
    ranks: dict[str, list[torch.Tensor]] = {"raw": [], "filtered": []}
    # disable=None: tqdm shows the bar only when stderr is a terminal.
    shown = progress is not None and model.exchange.rank == 0
    batches = tqdm(facts.split(batch_size), desc=progress, unit="batch", leave=False, disable=None if shown else True)
    for index, batch in enumerate(batches):
        batch = batch.to(device)
        s, r, o = batch.unbind(-1)
        for side, (direction, known, true_B, keys_B) in enumerate(
            (("tail", s, o, s * model.num_relations + r), ("head", o, s, o * model.num_relations + r))
        ):
            columns_C = weights_C = None
            if sampled:
                assert candidates is not None
                drawn = candidates.local(index, side).to(device)
                columns_C, weights_C = candidate_columns(drawn, true_B, (ents.lo, ents.hi))
            scores_BC = predictive_scores(model, known, r, direction, num_samples, seed, columns_C, weights_C)
            raw, filtered = rank_side(model, scores_BC, true_B, keys_B, filters[direction], columns_C, weights_C)
            ranks["raw"].append(raw)
            ranks["filtered"].append(filtered)
    return {kind: summarise(torch.cat(values)) for kind, values in ranks.items()}


def evaluate_split(
    eval_cfg: EvalConfig,
    seed: int,
    model: KGModel,
    dataset: KGDataset,
    facts: torch.Tensor,
    filters: dict[str, FilterIndex],
    *,
    final: bool,
    progress: str | None = None,
) -> dict:
    """Metrics of ``facts`` under the periodic protocol (posterior means) or, ``final``, the final one
    (with ``eval.num_samples``); ``progress`` labels a progress bar (``evaluate``)."""
    protocol, max_facts = eval_cfg.protocol, eval_cfg.max_facts
    if final:
        protocol, max_facts = eval_cfg.final_protocol, eval_cfg.final_max_facts
    candidates = None
    if protocol == "sampled":
        frequency = dataset.entity_frequency if eval_cfg.degree_candidates else None
        candidates = CandidateSampler(
            dataset.num_entities, (model.entities.lo, model.entities.hi), num_uniform=eval_cfg.uniform_candidates,
            num_degree=eval_cfg.degree_candidates, frequency=frequency, seed=seed,
        )  # fmt: skip
    return evaluate(
        model,
        sample_facts(facts, max_facts, seed),
        filters,
        batch_size=eval_cfg.batch_size,
        num_samples=eval_cfg.num_samples if final else 0,
        seed=seed,
        candidates=candidates,
        progress=progress,
        max_score_bytes=eval_cfg.max_score_mib << 20,
    )


def evaluate_run(
    eval_cfg: EvalConfig, seed: int, model: KGModel, dataset: KGDataset, filters: dict, *, progress: bool = False
) -> dict:
    """Validation and test metrics of a trained model under the final protocol, as ``metrics.json`` holds them;
    ``progress``: a progress bar per split, on a terminal."""
    sampled = eval_cfg.final_protocol == "sampled"
    candidates = min(eval_cfg.uniform_candidates + eval_cfg.degree_candidates, dataset.num_entities)
    metrics = {}
    for split, facts in (("valid", dataset.valid), ("test", dataset.test)):
        label = f"evaluating {split}" if progress else None
        metrics[split] = evaluate_split(eval_cfg, seed, model, dataset, facts, filters, final=True, progress=label)
    return {
        "dataset": dataset.name,
        **metrics,
        "protocol": {
            "name": eval_cfg.final_protocol,
            "candidates": candidates if sampled else dataset.num_entities,
            "max_facts": eval_cfg.final_max_facts,
            # What was ranked: a split smaller than max_facts is evaluated whole.
            "facts": {
                split: min(len(facts), eval_cfg.final_max_facts or len(facts))
                for split, facts in (("valid", dataset.valid), ("test", dataset.test))
            },
        },
        "dropped_facts": sum(dataset.dropped.values()),
        "dropped_by_split": dataset.dropped,
    }


@dataclass(frozen=True)
class EvaluationCost:
    """What one evaluation costs each of ``workers`` ranks (docs/evaluation.md derives every term)."""

    pairs: int
    """(query, candidate) scores the largest rank computes: 2 sides x facts x candidate columns."""
    flops: float
    """Their multiply-adds, 2 x dim flops a pair (bilinear scorers score one product of dim numbers)."""
    batch_bytes: int
    """Peak temporaries of one batch side: scores, masks and the filter's binary search over [B, C]."""
    filter_bytes: int
    """The rank's filter indexes: its share of the known facts, an int64 key and answer per side."""

    def seconds(self, pairs_per_second: float) -> float:
        return self.pairs / pairs_per_second


BYTES_PER_PAIR = {"exact": 16, "sampled": 88}
"""Bytes per [B, C] element alive at the peak of ``rank_side``: exact, fp32 scores and their NaN-free copy
(8) and eight bool masks (8); sampled, that plus the binary search of ``FilterIndex.contains`` (the
expanded answers and the lo, stop, mid and gathered int64 arrays: 48) and a mask as float64 (8), with
the candidate columns gathered (fp32 x dim, negligible per pair for dim < B) left out."""


def evaluation_cost(
    *,
    num_entities: int,
    dim: int,
    workers: int,
    facts: int,
    candidates: int | None,
    batch: int,
    known_facts: int,
) -> EvaluationCost:
    """The cost of evaluating ``facts`` facts on both sides against ``candidates`` sampled entities per batch
    (None: every entity, the exact protocol), for the largest of ``workers`` equal shards."""
    shard = math.ceil(num_entities / workers)
    if candidates is None or candidates >= num_entities:
        columns, per_pair = shard, BYTES_PER_PAIR["exact"]
    else:
        # A rank scores its share of the draws plus the true answers it owns (candidate_columns).
        columns, per_pair = math.ceil((candidates + batch) / workers), BYTES_PER_PAIR["sampled"]
    pairs = 2 * facts * columns
    return EvaluationCost(
        pairs=pairs,
        flops=2.0 * dim * pairs,
        batch_bytes=per_pair * min(batch, facts) * columns,
        filter_bytes=2 * 16 * math.ceil(known_facts / workers),
    )
