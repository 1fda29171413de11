"""A graph with known answers: triples drawn from a planted low-rank ComplEx with power-law popularity.

The planted model (C clusters, R relations, rank d, all drawn from ``seed``):
  * entity e has a cluster k(e) (C equal shares, at random) and a popularity pop(e) = (1 + rank(e))^-a
    over a random ranking of the entities (Zipf);
  * cluster c has a centroid z_c in C^d (unit norm), relation r a diagonal w_r of unit-modulus numbers;
  * score(h, r, t) = beta * Re<z_k(h), w_r, conj z_k(t)> + log pop(t): a rank-d ComplEx whose entity
    embeddings are their clusters' centroids, plus a popularity bias.
A fact draws its relation from a Zipf law over relation ids (exponent b), its head by popularity and its
tail from p(t | h, r) ∝ exp(score). That factorises: cluster c' ∝ Pop(c') exp(beta S[k(h), r, c']) with
Pop(c') the popularity summed over c', then t ∝ pop within c', so a fact costs two table look-ups.

The ceiling is the planted model's own MRR: it ranks candidates by their true conditional probability.
For a tail query that is cs[k(e)] + log pop(e) with cs = beta S[k(h), r, :]; for a head query,
p(h | r, t) ∝ pop(h) exp(beta S[k(h), r, k(t)]) / Z[k(h), r], again a cluster score plus log pop(h). A
rank is therefore a count per cluster by binary search over the cluster's sorted log-popularities
(O(C log N) per query, not O(N)), filtered and with ties at their mean rank as trainer/evaluate.py ranks.
Scores lie on a 2^-32 grid, so their sums and differences are exact and the counts equal a brute-force
comparison over every entity (tested).

Randomness is counter-based: a fact's uniforms are splitmix64 of (seed, split, field) and the fact's
index, so the files do not depend on the chunk size. Train begins with a covering set (fact i < N has head
i; fact i < R has relation i) so every entity and relation occurs in train; its tails still follow the
model. valid/test are pure model draws, and train facts equal to one of them are left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sharding.rng import seed_of, splitmix64
from storage.convert import ConvertOptions, write_id_source
from storage.layout import COLUMNS, SPLITS, Manifest, SplitCounts
from storage.reader import TripleStore
from storage.sources import BLOCK_BYTES

GRID = 2.0**-32
"""Scores are multiples of GRID below 2^20 in magnitude: sums of two are exact in float64."""
_RELATION, _HEAD, _CLUSTER, _TAIL = range(4)  # the uniform streams of a fact


@dataclass(frozen=True, kw_only=True)
class PlantedSpec:
    num_entities: int
    num_triples: int
    """Train facts drawn (before dropping duplicates and held-out facts)."""
    num_relations: int = 1000
    num_eval: int = 1000
    """Facts drawn for valid and for test each (before dropping duplicates)."""
    num_clusters: int = 64
    rank: int = 8
    """Complex dimensions of the centroids and relation diagonals."""
    beta: float = 16.0
    """Scale of the cluster affinity: 0 leaves popularity alone, large makes a tail's cluster certain."""
    entity_exponent: float = 1.0
    relation_exponent: float = 1.1
    seed: int = 0

    def validate(self) -> None:
        if not self.num_clusters <= self.num_entities <= self.num_triples:
            raise ValueError(
                f"need num_clusters <= num_entities <= num_triples (got {self.num_clusters}, "
                f"{self.num_entities}, {self.num_triples}): the covering set gives every entity a train fact"
            )
        if self.num_relations > self.num_entities or min(self.num_eval, self.rank, self.num_relations) <= 0:
            raise ValueError("need 0 < num_relations <= num_entities, num_eval > 0 and rank > 0")
        if not 0 <= self.beta <= 1000:
            raise ValueError(f"beta={self.beta}: expected 0..1000 (scores must stay on the exact grid)")


def _grid(x: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(x, np.float64) / GRID) * GRID


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def _uniform(key: int, index: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) doubles: splitmix64 of (key ^ index), a pure function of the fact's index."""
    bits = splitmix64(np.uint64(key) ^ index.astype(np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _pick(cumulative: np.ndarray, targets: np.ndarray, lo: np.ndarray | int, hi: np.ndarray | int) -> np.ndarray:
    """First index whose cumulative value exceeds the target, kept within [lo, hi] against rounding."""
    return np.clip(np.searchsorted(cumulative, targets, side="right"), lo, hi)


class PlantedModel:
    """The ground-truth model of a spec: its tables, a sampler of facts and the cluster scores of queries."""

    def __init__(self, spec: PlantedSpec):
        spec.validate()
        self.spec = spec
        n, num_c, num_r = spec.num_entities, spec.num_clusters, spec.num_relations
        rng = np.random.default_rng([spec.seed, 0x9A17])
        self.cluster_E = (rng.permutation(n) % num_c).astype(np.int32)
        self.log_pop_E = _grid(-spec.entity_exponent * np.log1p(rng.permutation(n)))
        z = rng.normal(size=(num_c, spec.rank)) + 1j * rng.normal(size=(num_c, spec.rank))
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        w = np.exp(2j * np.pi * rng.random((num_r, spec.rank)))
        # affinity[c, r, c'] = beta Re<z_c, w_r, conj z_c'>, in [-beta, beta]
        self.affinity_CRC = _grid(spec.beta * ((z[:, None, :] * w[None, :, :]) @ z.conj().T).real)
        # Entities sorted by (cluster, log pop): sampling and ranking both walk one cluster's slice.
        self.order = np.lexsort((self.log_pop_E, self.cluster_E)).astype(np.int64)
        self.sorted_log_pop = self.log_pop_E[self.order]
        self.bounds = np.searchsorted(self.cluster_E[self.order], np.arange(num_c + 1))
        pop = np.exp(self.sorted_log_pop)
        self.cum_pop = np.cumsum(pop) / pop.sum()
        self.log_pop_C = np.log(np.add.reduceat(pop, self.bounds[:-1]))
        logits = self.affinity_CRC + self.log_pop_C  # [C, R, C']: tail cluster given (head cluster, relation)
        self.log_norm_CR = _grid(_logsumexp(logits, axis=2))
        probs = np.exp(logits - self.log_norm_CR[..., None]).reshape(num_c * num_r, num_c)
        # Row j's cumulative probabilities shifted by j: one sorted array, searched with j + u.
        cum = np.cumsum(probs, axis=1)
        cum /= cum[:, -1:]
        self.cum_cluster = (cum + np.arange(num_c * num_r)[:, None]).ravel()
        rel = np.arange(1, num_r + 1, dtype=np.float64) ** -spec.relation_exponent
        self.cum_relation = np.cumsum(rel) / rel.sum()

    def facts(self, split: str, start: int, stop: int) -> np.ndarray:
        """[stop - start, 3] int64 facts ``start..stop`` of ``split`` (train: the covering set first)."""
        spec, index = self.spec, np.arange(start, stop, dtype=np.int64)
        u = [_uniform(seed_of(spec.seed, SPLITS.index(split), f), index) for f in range(4)]
        r = _pick(self.cum_relation, u[_RELATION], 0, spec.num_relations - 1)
        h = self.order[_pick(self.cum_pop, u[_HEAD], 0, spec.num_entities - 1)]
        if split == "train":
            cover = index < spec.num_entities
            h[cover] = index[cover]
            r[index < spec.num_relations] = index[index < spec.num_relations]
        row = self.cluster_E[h].astype(np.int64) * spec.num_relations + r
        lo = row * spec.num_clusters
        c = _pick(self.cum_cluster, row + u[_CLUSTER], lo, lo + spec.num_clusters - 1) - lo
        first, last = self.bounds[c], self.bounds[c + 1] - 1
        below = np.where(first > 0, self.cum_pop[np.maximum(first - 1, 0)], 0.0)
        target = below + u[_TAIL] * (self.cum_pop[last] - below)
        t = self.order[_pick(self.cum_pop, target, first, last)]
        return np.stack([h, r, t], axis=1)

    def cluster_scores(self, facts: np.ndarray, direction: str) -> np.ndarray:
        """[B, C]: the score of a candidate in cluster c is this plus its log pop (on the grid)."""
        h, r, t = facts.T
        if direction == "tail":
            return self.affinity_CRC[self.cluster_E[h], r, :]
        # p(h | r, t) ∝ pop(h) exp(affinity[k(h), r, k(t)]) / Z[k(h), r]
        return self.affinity_CRC[:, r, self.cluster_E[t]].T - self.log_norm_CR[:, r].T


def fact_key(ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each (head, relation, tail) row (a collision drops one train fact: harmless)."""
    h, r, t = (ids[:, i].astype(np.uint64) for i in range(3))
    return splitmix64(splitmix64(splitmix64(h) ^ r) ^ t)


class PlantedSource:
    """The storage converter's source of a planted graph: train streamed in chunks, valid/test held."""

    kind = "planted"
    block_bytes = BLOCK_BYTES

    def __init__(self, model: PlantedModel, chunk_rows: int):
        self.model, self.chunk_rows = model, chunk_rows
        self.files = {split: Path(f"<planted {split}>") for split in SPLITS}
        self.held_out = {split: model.facts(split, 0, model.spec.num_eval) for split in ("valid", "test")}
        self.held_out_keys = np.unique(fact_key(np.concatenate(list(self.held_out.values()))))
        self.held_out_in_train = 0
        """Train draws left out because valid or test has them."""

    def chunks(self, split: str, counts: SplitCounts | None = None):
        if split != "train":
            yield _table(self.held_out[split], counts)
            return
        for start in range(0, self.model.spec.num_triples, self.chunk_rows):
            ids = self.model.facts("train", start, min(start + self.chunk_rows, self.model.spec.num_triples))
            held = np.isin(fact_key(ids), self.held_out_keys)
            self.held_out_in_train += int(held.sum())
            yield _table(ids[~held], counts)


def _table(ids: np.ndarray, counts: SplitCounts | None) -> pa.Table:
    if counts is not None:
        counts.lines += len(ids)
    return pa.table({name: ids[:, i] for i, name in enumerate(COLUMNS)})


def _names(prefix: str, n: int) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix), pa.array(np.arange(n)).cast(pa.string()), "")


def write_planted(
    out: Path, spec: PlantedSpec, *, chunk_rows: int = 1_000_000, options: ConvertOptions | None = None
) -> tuple[Manifest, int]:
    """Write the planted graph of ``spec`` as a dataset directory, streaming train in chunks of
    ``chunk_rows`` draws (memory: the model's tables, one chunk, one partition). Returns the manifest
    and the number of train draws left out because valid or test holds them."""
    source = PlantedSource(PlantedModel(spec), chunk_rows)
    manifest = write_id_source(
        source, Path(out), entity_names=_names("e", spec.num_entities),
        relation_names=_names("r", spec.num_relations),
        rows={"train": spec.num_triples, "valid": spec.num_eval, "test": spec.num_eval}, options=options,
        overwrite=True, provenance={"planted": asdict(spec)},
    )  # fmt: skip
    return manifest, source.held_out_in_train


def known_answers(store: TripleStore, facts: np.ndarray) -> np.ndarray:
    """The distinct known facts [F, 3] (train + valid + test) that answer a tail or head query of ``facts``,
    read one row group at a time."""
    tail_keys, head_keys = np.unique(facts[:, :2], axis=0), np.unique(facts[:, 1:], axis=0)
    keep = []
    for split in SPLITS:
        for group in store.row_groups(split):
            ids = store.read_group(group)
            hit = _isin_rows(ids[:, :2], tail_keys) | _isin_rows(ids[:, 1:], head_keys)
            keep.append(ids[hit])
    return np.unique(np.concatenate(keep), axis=0)


def _isin_rows(pairs: np.ndarray, table: np.ndarray) -> np.ndarray:
    scale = int(max(pairs[:, 1].max(initial=0), table[:, 1].max(initial=0))) + 1
    return np.isin(pairs[:, 0] * scale + pairs[:, 1], table[:, 0] * scale + table[:, 1])


def _answers(known: np.ndarray, facts: np.ndarray, query_cols: list[int], answer_col: int):
    """(row, entity) pairs: each known answer of each query (the facts' ``query_cols``)."""
    scale = int(max(known[:, query_cols].max(initial=0), facts[:, query_cols].max(initial=0))) + 1
    known_keys = known[:, query_cols[0]] * scale + known[:, query_cols[1]]
    order = np.argsort(known_keys, kind="stable")
    known_keys, answers = known_keys[order], known[order, answer_col]
    query_keys = facts[:, query_cols[0]] * scale + facts[:, query_cols[1]]
    start = np.searchsorted(known_keys, query_keys, side="left")
    counts = np.searchsorted(known_keys, query_keys, side="right") - start
    rows = np.repeat(np.arange(len(facts)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, answers[np.repeat(start, counts) + offsets]


def planted_ranks(
    model: PlantedModel, facts: np.ndarray, known: np.ndarray | None, *, popularity_only: bool = False
) -> dict[str, np.ndarray]:
    """Raw and, given the distinct ``known`` facts, filtered ranks (tail queries, then head queries) of
    the planted model, or with ``popularity_only`` of ranking every candidate by popularity alone. Ties
    count at their mean rank and known answers other than the true one are left out, as in
    trainer/evaluate.py (this is an independent reference for it, so it shares none of its code)."""
    ranks: dict[str, list[np.ndarray]] = {"raw": [], "filtered": []}
    for direction, query_cols, true_col in (("tail", [0, 1], 2), ("head", [2, 1], 0)):
        cs_BC = model.cluster_scores(facts, direction)
        if popularity_only:
            cs_BC = np.zeros_like(cs_BC)
        true = facts[:, true_col]
        true_score = cs_BC[np.arange(len(facts)), model.cluster_E[true]] + model.log_pop_E[true]
        better, equal = _count_per_cluster(model, cs_BC, true_score)
        equal -= 1  # the true answer itself
        ranks["raw"].append(1.0 + better + equal / 2.0)
        if known is None:
            continue
        rows, answers = _answers(known, facts, query_cols, true_col)
        other = answers != true[rows]
        rows, answers = rows[other], answers[other]
        score = cs_BC[rows, model.cluster_E[answers]] + model.log_pop_E[answers]
        better -= np.bincount(rows[score > true_score[rows]], minlength=len(facts))
        equal -= np.bincount(rows[score == true_score[rows]], minlength=len(facts))
        ranks["filtered"].append(1.0 + better + equal / 2.0)
    return {kind: np.concatenate(values) for kind, values in ranks.items() if values}


def _count_per_cluster(model: PlantedModel, cs_BC: np.ndarray, true_score: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per query, the entities scoring above and equal to ``true_score`` (exact: every value is on the grid)."""
    better = np.zeros(len(cs_BC), np.int64)
    equal = np.zeros(len(cs_BC), np.int64)
    for c in range(model.spec.num_clusters):
        lp = model.sorted_log_pop[model.bounds[c] : model.bounds[c + 1]]
        threshold = true_score - cs_BC[:, c]
        above = np.searchsorted(lp, threshold, side="right")
        better += len(lp) - above
        equal += above - np.searchsorted(lp, threshold, side="left")
    return better, equal


def summarise(ranks: np.ndarray) -> dict[str, float]:
    return {"mr": float(ranks.mean()), "mrr": float((1.0 / ranks).mean())} | {
        f"hits@{k}": float((ranks <= k).mean()) for k in (1, 3, 10)
    }


def ceiling(model: PlantedModel, store: TripleStore, split: str = "test") -> dict[str, dict[str, dict[str, float]]]:
    """Metrics (mr, mrr, hits@k; raw and filtered) of the planted model and of popularity alone on ``split``."""
    facts = store.read_split(split)
    known = known_answers(store, facts)
    out = {}
    for name, popularity_only in (("planted", False), ("popularity", True)):
        ranks = planted_ranks(model, facts, known, popularity_only=popularity_only)
        out[name] = {kind: summarise(r) for kind, r in ranks.items()}
    return out
