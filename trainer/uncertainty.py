"""Uncertainty measures as pure functions: Monte-Carlo fact probabilities, confidence measures,
precision against coverage and bootstrap intervals of its area, calibration, and the projections of the
fact visualisation.

Two things are judged. Facts (triples): test facts (label 1) and as many corrupted facts (label 0: head
or tail replaced by a uniform entity, never a known fact), with the Bernoulli likelihood's probability
sigmoid(score) (the paper's) for every model. Link predictions: the posterior means' top-1 answer to each
test query (s, r, ?) and (?, r, o), right or wrong, with the model's own likelihood's probability of it
(``top_answers``, ``link_confidences``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from sharding.rng import splitmix64
from trainer.evaluate import FilterIndex
from trainer.model import KGModel

EPS = 1e-12


def _fact_hash(facts: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each (head, relation, tail) row. Not (h * R + r) * E + t: on Freebase86m that
    needs 67 bits, and int64 arithmetic would wrap and make distinct facts equal."""
    h, r, t = (facts[:, i].astype(np.uint64) for i in range(3))
    return splitmix64(splitmix64(splitmix64(h) ^ r) ^ t)


def known_mask(facts: torch.Tensor, known_chunks: Iterable[torch.Tensor]) -> torch.Tensor:
    """Whether each fact of ``facts`` [N, 3] occurs among ``known_chunks`` (pieces [n, 3]), exactly.

    The chunks are streamed: memory is O(N + one chunk), however many facts are known. A chunk's row
    is compared with the facts of equal hash (a sorted search), so a hash collision costs a
    comparison, never a wrong answer.
    """
    queries = facts.numpy()
    hashes = _fact_hash(queries)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    found = np.zeros(len(queries), dtype=bool)
    for chunk in known_chunks:
        rows = chunk.numpy()
        chunk_hashes = _fact_hash(rows)
        start = np.searchsorted(sorted_hashes, chunk_hashes, side="left")
        counts = np.searchsorted(sorted_hashes, chunk_hashes, side="right") - start
        # Usually 0 or 1 query per row; more only for repeated queries or colliding hashes.
        row = np.repeat(np.arange(len(rows)), counts)
        offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        query = order[np.repeat(start, counts) + offset]
        found[query[(queries[query] == rows[row]).all(1)]] = True
    return torch.from_numpy(found)


MAX_DRAWS = 1000
"""Rounds of redrawing before ``sampled_negatives`` enumerates a fact's corruptions instead. A fact with at
least 1% of its corruptions unknown is left after 1,000 with probability under 5e-5 (0.99^1000): what is
left has (nearly) every corruption known, which only a graph with few entities allows, where enumerating
them is cheap."""


def sampled_negatives(
    facts: torch.Tensor,
    is_known: Callable[[torch.Tensor], torch.Tensor],
    num_entities: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One corruption per fact (head or tail, uniformly), redrawn until ``is_known`` says it is not a
    known fact (e.g. ``known_mask`` over a dataset's ``known_chunks``). A fact with no unknown corruption
    (a graph with one entity) is a ValueError that names it."""
    out = facts.clone()
    todo = torch.ones(len(facts), dtype=torch.bool)
    for _ in range(MAX_DRAWS):
        if not todo.any():
            break
        rows = todo.nonzero().squeeze(1)
        side = torch.randint(2, (len(rows),), generator=generator) * 2  # column 0 (head) or 2 (tail)
        candidate = facts[rows].clone()
        candidate[torch.arange(len(rows)), side] = torch.randint(num_entities, (len(rows),), generator=generator)
        clash = is_known(candidate)
        out[rows[~clash]] = candidate[~clash]
        todo[rows[~clash]] = False
    for row in todo.nonzero().squeeze(1).tolist():
        out[row] = _unknown_corruption(facts[row], is_known, num_entities, generator)
    return out


def _unknown_corruption(
    fact: torch.Tensor,
    is_known: Callable[[torch.Tensor], torch.Tensor],
    num_entities: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """A uniform choice among the corruptions of ``fact`` [3] (each of its head and tail replaced by every
    entity) that are not known facts: what redrawing until one is unknown gives, found in one pass."""
    entities = torch.arange(num_entities, dtype=fact.dtype)
    candidates = fact.repeat(2 * num_entities, 1)
    candidates[:num_entities, 0] = entities
    candidates[num_entities:, 2] = entities
    unknown = candidates[~is_known(candidates)]
    if len(unknown) == 0:
        h, r, t = fact.tolist()
        raise ValueError(
            f"fact (head, relation, tail) = ({h}, {r}, {t}): every corruption of its head or tail among the "
            f"{num_entities} entities is a known fact, so it has no negative to draw"
        )
    return unknown[int(torch.randint(len(unknown), (1,), generator=generator))]


@dataclass
class FactProbabilities:
    """sigmoid(score) of each fact: with the means (``magnitude``) and per sample ``samples`` [S, N]."""

    magnitude: np.ndarray
    samples: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.samples.mean(0)

    @property
    def std(self) -> np.ndarray:
        return self.samples.std(0)


@dataclass
class FactScores:
    """Scores (logits) of each fact: with the means (``magnitude``, [N]) and per sample ``samples`` [S, N];
    and, when asked of a 1-vs-all model, its ``likelihood`` [N] (``fact_log_likelihood``)."""

    magnitude: np.ndarray
    samples: np.ndarray
    likelihood: np.ndarray | None = None

    def probabilities(self) -> FactProbabilities:
        magnitude, samples = (torch.sigmoid(torch.from_numpy(x)).numpy() for x in (self.magnitude, self.samples))
        return FactProbabilities(magnitude, samples)


@torch.no_grad()
def fact_scores(
    model: KGModel, facts: torch.Tensor, num_samples: int, seed: int, missing: str = "tail", likelihood: bool = False
) -> FactScores:
    """Scores of ``facts`` [N, 3] with the posterior means and over ``num_samples`` draws (one draw, the
    means, for a point model). As answers to head queries (``missing="head"``) a reciprocal model scores
    them as evaluation ranks them: (o, r^-1, s). ``likelihood``: also the 1-vs-all model's own
    ``fact_log_likelihood`` (a model without reciprocal relations has none: left None)."""
    ents, rels = model.entities.full(), model.relations.full()
    s, r, o = facts.unbind(-1)
    if missing == "head" and model.reciprocal:
        s, r, o = o, r + model.num_relations, s

    bias = model.relation_bias(r)  # a reciprocal model has none: only the Bernoulli likelihood learns one

    def score(entity: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        return model.scorer.score(entity[s], relation[r], entity[o]) + bias

    magnitude = score(ents.mean, rels.mean)
    if not model.variational or num_samples == 0:  # 0: the means alone (triple classification)
        draws = magnitude[None]
    else:
        generator = torch.Generator().manual_seed(seed)
        draws = torch.stack([score(ents.sample(generator), rels.sample(generator)) for _ in range(num_samples)])
    found = fact_log_likelihood(model, facts) if likelihood and likelihood_affordable(model, len(facts)) else None
    return FactScores(magnitude.numpy(), draws.numpy(), found)


LIKELIHOOD_SCORE_BYTES = 256 << 20
"""The all-entity scores ``fact_log_likelihood`` holds at a time (it scores facts in chunks within it)."""
LIKELIHOOD_MAX_PAIRS = 1 << 33
"""(fact, entity) pairs above which the likelihood is not computed unasked: each fact's two answers are
scored against every entity, an exact evaluation's work (~8.6G pairs: a minute or two on 2 CPU cores at
128 dimensions; 50k validation facts of Freebase86m would be 500 times that)."""


def likelihood_affordable(model: KGModel, num_facts: int) -> bool:
    """Whether ``fact_log_likelihood`` applies to ``model`` (1-vs-all) and ``num_facts`` facts stay within
    ``LIKELIHOOD_MAX_PAIRS``."""
    return model.reciprocal and num_facts * model.entities.num_rows <= LIKELIHOOD_MAX_PAIRS


@torch.no_grad()
def fact_log_likelihood(model: KGModel, facts: torch.Tensor, max_bytes: int = LIKELIHOOD_SCORE_BYTES) -> np.ndarray:
    """(log p(o | s, r) + log p(s | o, r^-1)) / 2 of each fact [N, 3] under a 1-vs-all (reciprocal) model
    with the posterior means, [N] float64: the mean log-probability of the fact's two answers, each a
    softmax over every entity (the likelihood the model was trained with). Unlike sigmoid(score), it
    weighs an answer against every other answer to the same query, so a plausible but wrong entity of
    the right kind scores low when the right one scores higher. Needs every entity's row in this
    process (a run loaded whole, as ``load_run`` loads it by default)."""
    if not model.reciprocal:
        raise ValueError("fact_log_likelihood: the model has no reciprocal relations (a 1-vs-all likelihood)")
    entities, relations = model.entities.full().mean, model.relations.full().mean
    if len(entities) != model.entities.num_rows:
        raise ValueError(f"fact_log_likelihood: {len(entities):,} of {model.entities.num_rows:,} entity rows here "
                         "(a shard): the softmax needs every entity")  # fmt: skip
    s, r, o = facts.to(entities.device).unbind(-1)
    inverse = r + model.num_relations
    rows = max(1, max_bytes // (4 * max(1, len(entities))))
    out = torch.empty(len(facts), dtype=torch.float64)
    for lo in range(0, len(facts), rows):
        part = slice(lo, lo + rows)
        total = torch.zeros(len(out[part]), dtype=torch.float64, device=entities.device)
        for query, relation, answer in ((s, r, o), (o, inverse, s)):
            scores = model.scorer.score_tails(entities[query[part]], relations[relation[part]], entities)
            answered = scores.gather(1, answer[part, None]).squeeze(1)
            total += (answered - torch.logsumexp(scores, 1)).double()
        out[part] = (total / 2).cpu()
    return out.numpy()


def fact_probabilities(
    model: KGModel, facts: torch.Tensor, num_samples: int, seed: int, missing: str = "tail"
) -> FactProbabilities:
    """sigmoid of ``fact_scores``: the probabilities of ``facts`` with the means and per draw."""
    return fact_scores(model, facts, num_samples, seed, missing).probabilities()


def logit_of_mean_probability(samples: np.ndarray) -> np.ndarray:
    """logit(mean_s sigmoid(z_s)) of scores ``samples`` [S, N], in float64 without rounding the mean to 0
    or 1: log mean sigmoid(z) - log mean sigmoid(-z), each a log-sum-exp of log-sigmoids."""
    z = torch.from_numpy(np.asarray(samples, dtype=np.float64))
    log_true = torch.logsumexp(torch.nn.functional.logsigmoid(z), 0)
    log_false = torch.logsumexp(torch.nn.functional.logsigmoid(-z), 0)
    return (log_true - log_false).numpy()


def binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)  # float32 would round 1 - EPS back to 1
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def mutual_information(samples: np.ndarray) -> np.ndarray:
    """Epistemic part of the predictive entropy: H(mean_s p_s) - mean_s H(p_s) (BALD), per fact."""
    return binary_entropy(samples.mean(0)) - binary_entropy(samples).mean(0)


def probability_confidences(magnitude: np.ndarray, samples: np.ndarray) -> dict[str, np.ndarray]:
    """Ranking keys of the probabilities p = sigmoid(z) of logits ``magnitude`` [N] (the means') and
    ``samples`` [S, N] (each draw's): float64 functions increasing in each measure, not the measure itself,
    because a float32 p rounds to 1 from z ~ 17 (a float64 one from ~37) and every item beyond would be one
    tie, which ``precision_at_coverage`` averages.

    * ``magnitude``: p with the means, ranked by z;
    * ``mc_mean``: the mean of p over the draws, ranked by its logit (``logit_of_mean_probability``);
    * ``mc_lower_bound``: that mean minus the draws' standard deviation, ranked by its odds
      (``lower_bound_odds``).
    """
    return {
        "magnitude": np.asarray(magnitude, dtype=np.float64),
        "mc_mean": logit_of_mean_probability(samples),
        "mc_lower_bound": lower_bound_odds(samples),
    }


def lower_bound_odds(samples: np.ndarray) -> np.ndarray:
    """L / (1 - L) of L = mean_s p_s - std_s p_s, p = sigmoid(z) of scores ``samples`` [S, N], in float64:
    increasing in L, and exact where L rounds to 1 because 1 - L is taken as mean_s q_s + std_s q_s of
    q = sigmoid(-z) = 1 - p (whose spread is p's), never as a difference. Ties only where every draw's score
    is beyond ~700, where sigmoid(-z) underflows."""
    z = torch.from_numpy(np.asarray(samples, dtype=np.float64))
    p, q = torch.sigmoid(z), torch.sigmoid(-z)
    lower = p.mean(0) - p.std(0, correction=0)
    return (lower / (q.mean(0) + q.std(0, correction=0))).numpy()


def truth_confidences(scores: FactScores) -> dict[str, np.ndarray]:
    """Scores ranking facts by how likely they are true (precision against coverage, paper Figure 2):
    ``magnitude``, ``mc_mean`` and ``mc_lower_bound`` of the facts' probabilities, as ranking keys
    (``probability_confidences``)."""
    return probability_confidences(scores.magnitude, scores.samples)


def prediction_confidences(scores: FactScores) -> dict[str, np.ndarray]:
    """How sure each measure is of the predicted label (selective prediction): larger is surer. |p - 1/2|
    of ``magnitude`` and ``mc_mean`` is ranked by |logit p|, which increases with it and does not round to
    one tie where p rounds to 1."""
    probs = scores.probabilities()
    return {
        "magnitude": np.abs(scores.magnitude.astype(np.float64)),
        "mc_mean": np.abs(logit_of_mean_probability(scores.samples)),
        "mc_std": -probs.std,
        "entropy": -binary_entropy(probs.mean),
        "mutual_information": -mutual_information(probs.samples),
    }


COVERAGE_POINTS = 1000


def coverage_grid(num_points: int = COVERAGE_POINTS) -> np.ndarray:
    """``num_points`` coverage values i / num_points, i = 1 .. num_points: in (0, 1]."""
    return np.arange(1, num_points + 1) / num_points


def kept_counts(num_items: int, num_points: int = COVERAGE_POINTS) -> np.ndarray:
    """Items kept at each coverage c = i / num_points of ``coverage_grid``: ceil(c * num_items), at least 1,
    in integers (the float product is not exact: 0.07 * 100 is 7.000000000000001, whose ceiling is 8)."""
    i = np.arange(1, num_points + 1, dtype=np.int64)
    return np.maximum(1, -(-i * num_items // num_points))


def precision_at_coverage(confidence: np.ndarray, correct: np.ndarray, num_points: int = COVERAGE_POINTS) -> np.ndarray:
    """Fraction of ``correct`` among the ceil(c * N) most confident items, for each coverage c of
    ``coverage_grid(num_points)`` (``kept_counts``).

    Ties in confidence are broken by averaging (each tied group counts its mean correctness), so a
    constant confidence gives the base rate at every coverage rather than an order-dependent value.
    """
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], correct[order].astype(np.float64)
    # Replace each item's correctness by its tie group's mean. The groups are runs of equal values of the
    # sorted confidences (NaNs, sorted last, are one group): no second sort, which halves a bootstrap's time.
    same = (conf[1:] == conf[:-1]) | (np.isnan(conf[1:]) & np.isnan(conf[:-1]))
    group = np.concatenate([[0], np.cumsum(~same)]) if len(conf) else np.zeros(0, dtype=np.int64)
    counts = np.bincount(group)
    hits = (np.bincount(group, weights=hits) / counts)[group]
    kept = kept_counts(len(hits), num_points)
    return np.cumsum(hits)[kept - 1] / kept


def area(coverage: np.ndarray, values: np.ndarray) -> float:
    """Mean over the coverage grid (the area under the curve on (0, 1])."""
    return float(np.mean(values)) if len(values) else math.nan


def area_differences(
    confidences: dict[str, np.ndarray],
    correct: np.ndarray,
    *,
    baseline: str = "magnitude",
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float | list[float]]]:
    """For each measure of ``confidences`` but ``baseline``: its area under precision against coverage
    minus the baseline's (``difference``), and a percentile bootstrap ``interval`` of that difference.

    Arrays are [Q] (one model) or [K, Q]: K models (e.g. training seeds) judged on the same Q items
    (queries, facts), in the same order. The difference is then the mean over the K models. Each of the
    ``resamples`` draws Q item indices with replacement (a generator seeded with ``seed``) and uses them
    for every model and every measure, so the comparison is paired: the interval is of the difference
    over the population of items the Q were drawn from, for these K trained models.
    """
    coverage = coverage_grid()
    hits = np.atleast_2d(correct)
    scores = {name: np.atleast_2d(c) for name, c in confidences.items()}
    num_models, num_items = hits.shape

    def areas(items: np.ndarray) -> dict[str, float]:
        return {name: float(np.mean([area(coverage, precision_at_coverage(c[k, items], hits[k, items]))
                                     for k in range(num_models)])) for name, c in scores.items()}  # fmt: skip

    whole = areas(np.arange(num_items))
    others = [name for name in scores if name != baseline]
    rng = np.random.default_rng(seed)
    drawn = np.empty((resamples, len(others)))
    for b in range(resamples):
        resampled = areas(rng.integers(0, num_items, size=(num_items,)))
        drawn[b] = [resampled[name] - resampled[baseline] for name in others]
    tail = (1 - level) / 2
    bounds = np.quantile(drawn, [tail, 1 - tail], axis=0) if resamples else np.full((2, len(others)), math.nan)
    return {name: {"difference": whole[name] - whole[baseline], "interval": [float(bounds[0, i]), float(bounds[1, i])]}
            for i, name in enumerate(others)}  # fmt: skip


# Link prediction: how sure is the model of its top-1 answer? -------------------------------------------

QUERY_CELLS = 1 << 23
"""(query, candidate) scores ``top_answers`` holds at a time: [B, N] float32 matrices of 32 MiB, so WN18RR's
40,943 entities are scored 204 queries at a time, and memory stays bounded on any graph."""


@dataclass
class TopAnswers:
    """The posterior means' top-1 answer of each query, (s, r, ?) or (?, r, o), and how it fares under S
    draws of every embedding."""

    top: np.ndarray
    """[Q] the entity ranked first with the means among the candidates: every entity but the query's
    other known answers (filtered, as evaluation ranks)."""
    correct: np.ndarray
    """[Q] whether it is the query's answer (the event filtered Hits@1 counts)."""
    magnitude: np.ndarray
    """[Q] the logit of its probability with the means (``answer_logit``)."""
    logits: np.ndarray
    """[S, Q] the logit of its probability under each draw (S = 0: a point model)."""
    ranks: np.ndarray
    """[S, Q] its rank among the candidates under each draw (``answer_rank``)."""


def answer_logit(scores_BN: torch.Tensor, answer_B: torch.Tensor, softmax: bool) -> torch.Tensor:
    """[B]: the logit of the probability of answer ``answer_B`` of each query given the scores of its
    candidates ``scores_BN`` (a candidate that is not one at -inf). The probability is its softmax over the
    candidates (a 1-vs-all model's own distribution over answers), whose logit is its score minus the
    log-sum-exp of the others', or, ``softmax`` False, sigmoid of its score (the Bernoulli likelihood),
    whose logit is the score. Kept as a logit: the float32 probability rounds to 1 once the answer leads by
    ~17, and every such answer would tie."""
    chosen_B = scores_BN.gather(1, answer_B.unsqueeze(1)).squeeze(1)
    if not softmax:
        return chosen_B
    others_BN = scores_BN.scatter(1, answer_B.unsqueeze(1), -torch.inf)
    return chosen_B - torch.logsumexp(others_BN, 1)  # +inf for a lone candidate: probability 1


def answer_rank(scores_BN: torch.Tensor, answer_B: torch.Tensor) -> torch.Tensor:
    """[B] float64: the rank of ``answer_B`` among the candidates, 1 + #better + #equal / 2 (evaluation's
    tie rule: a tie with one other candidate is rank 1.5, not top)."""
    chosen_B1 = scores_BN.gather(1, answer_B.unsqueeze(1))
    # Bools summed as bytes into int32: 15x faster than count_nonzero or sum over [B, N] bools (measured,
    # 1 CPU core, [204, 40943]), and exact up to 2^31 candidates.
    better = (scores_BN > chosen_B1).view(torch.uint8).sum(1, dtype=torch.int32)
    equal = (scores_BN == chosen_B1).view(torch.uint8).sum(1, dtype=torch.int32) - 1
    return (1.0 + better + equal / 2).double()


def lexicographic_key(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """[N] float64 ranking key that orders items by ``primary``, then, among equal ``primary``, by
    ``secondary`` (NaN lowest in either): each item's position 1..#distinct in that order, items equal in both
    sharing one."""
    primary = np.nan_to_num(np.asarray(primary, dtype=np.float64), nan=-np.inf)
    secondary = np.nan_to_num(np.asarray(secondary, dtype=np.float64), nan=-np.inf)
    order = np.lexsort((secondary, primary))
    p, s = primary[order], secondary[order]
    starts = np.concatenate([[True], (p[1:] != p[:-1]) | (s[1:] != s[:-1])]) if len(order) else np.zeros(0, bool)
    key = np.empty(len(order))
    key[order] = np.cumsum(starts)
    return key


def link_confidences(answers: TopAnswers) -> dict[str, np.ndarray]:
    """How sure each measure is that a query's top-1 answer is right, as ranking keys: larger is surer.

    * ``magnitude``: its probability with the means;
    * ``mc_mean``: its mean probability over the draws (the predictive probability of that answer);
    * ``mc_lower_bound``: that mean minus the draws' standard deviation;
    * ``stability``: the fraction of draws in which it is still ranked first;
    * ``rank_variance``: minus the variance of its rank over the draws;
    * ``mc_reciprocal_rank``: the mean of 1 / its rank over the draws (stability that also counts how far
      it falls).

    The first three are computed from the logits (``probability_confidences``), so answers whose
    probability rounds to 1 still rank apart. The last three are counts over the draws, so they take few
    values, and every answer ranked first in every draw ties at the top (most of them where the model is
    good): their ties are broken by ``mc_mean`` (``lexicographic_key``), the draws' own probability, rather
    than averaged into one group. A point model (no draws) has ``magnitude`` alone.
    """
    if len(answers.logits) == 0:
        return {"magnitude": answers.magnitude.astype(np.float64)}
    out = probability_confidences(answers.magnitude, answers.logits)
    # Each query's ranks in ascending order: the variance and the mean of 1 / rank then add the same numbers
    # in the same order for two queries with the same ranks in other draws, so they tie exactly.
    rank, mean = np.sort(answers.ranks, axis=0), out["mc_mean"]
    out["stability"] = lexicographic_key((rank == 1).mean(0), mean)
    out["rank_variance"] = lexicographic_key(-rank.var(0), mean)
    out["mc_reciprocal_rank"] = lexicographic_key((1 / rank).mean(0), mean)
    return out


@torch.no_grad()
def top_answers(
    model: KGModel,
    facts: torch.Tensor,
    filters: dict[str, FilterIndex],
    num_samples: int,
    seed: int,
    cells: int = QUERY_CELLS,
) -> TopAnswers:
    """The tail query (s, r, ?) of every fact of ``facts`` [N, 3], then its head query (?, r, o): Q = 2N.

    Each query is scored as evaluation scores it (a reciprocal model's head query as (o, r^-1, ?)) against
    every entity but its other known answers (``filters``: ``evaluate.build_filters`` of the known facts),
    with the means and then under ``num_samples`` draws of every entity and relation embedding (a generator
    seeded with ``seed``; none for a point model). Probabilities, kept as their logits (``answer_logit``),
    are the model's likelihood's: the softmax over the candidates for a reciprocal (1-vs-all) model, else
    sigmoid(score + relation bias). Queries are scored ``cells`` // (number of entities) at a time; each
    draw is made once for all of them.
    """
    ents, rels = model.entities.full(), model.relations.full()
    num_entities, device, softmax = len(ents.mean), ents.mean.device, model.reciprocal
    s, r, o = facts.to(device).unbind(-1)
    step = max(1, cells // max(num_entities, 1))
    batches = [(d, lo, min(lo + step, len(facts))) for d in ("tail", "head") for lo in range(0, len(facts), step)]

    def scores(entities: torch.Tensor, relations: torch.Tensor, direction: str, lo: int, hi: int) -> torch.Tensor:
        known, answer = (s, o) if direction == "tail" else (o, s)
        known, answer, rel = known[lo:hi], answer[lo:hi], r[lo:hi]
        query, relation, side = model.query(entities[known], relations, rel, direction)
        scores_BN = model.score_candidates(query, relation, side, entities)
        bias = model.relation_bias(rel)
        if isinstance(bias, torch.Tensor):
            scores_BN = scores_BN + bias.unsqueeze(1)
        rows, others = (t.to(device) for t in filters[direction].known((known * model.num_relations + rel).cpu()))
        other = others != answer[rows]
        scores_BN[rows[other], others[other]] = -torch.inf
        return scores_BN

    def offset(direction: str, lo: int, hi: int) -> slice:
        return slice(lo, hi) if direction == "tail" else slice(len(facts) + lo, len(facts) + hi)

    num_queries = 2 * len(facts)
    top = torch.empty(num_queries, dtype=torch.long, device=device)
    magnitude = torch.empty(num_queries, device=device)
    for direction, lo, hi in batches:
        scores_BN = scores(ents.mean, rels.mean, direction, lo, hi)
        top[offset(direction, lo, hi)] = best = scores_BN.argmax(1)
        magnitude[offset(direction, lo, hi)] = answer_logit(scores_BN, best, softmax)
    num_samples = num_samples if model.variational else 0
    logits = torch.empty(num_samples, num_queries, device=device)
    ranks = torch.empty(num_samples, num_queries, dtype=torch.float64, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    for k in range(num_samples):
        entities, relations = ents.sample(generator), rels.sample(generator)
        for direction, lo, hi in batches:
            scores_BN = scores(entities, relations, direction, lo, hi)
            chosen = top[offset(direction, lo, hi)]
            logits[k, offset(direction, lo, hi)] = answer_logit(scores_BN, chosen, softmax)
            ranks[k, offset(direction, lo, hi)] = answer_rank(scores_BN, chosen)
    answers = torch.cat([o, s])
    return TopAnswers(
        top.cpu().numpy(), (top == answers).cpu().numpy(), magnitude.cpu().numpy(),
        logits.cpu().numpy(), ranks.cpu().numpy(),
    )  # fmt: skip


def expected_calibration_error(p: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> tuple[float, list[dict]]:
    """ECE over equal-width bins of predicted probability, and the reliability diagram's bins."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, num_bins - 1)
    ece, bins = 0.0, []
    for b in range(num_bins):
        mask = index == b
        if not mask.any():
            continue
        confidence, accuracy = float(p[mask].mean()), float(labels[mask].mean())
        ece += mask.mean() * abs(confidence - accuracy)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(mask.sum()),
                     "mean_probability": confidence, "fraction_true": accuracy})  # fmt: skip
    return float(ece), bins


def ece_if_calibrated(
    p: np.ndarray, num_bins: int = 15, draws: int = 200, seed: int = 0, block_elements: int = 1 << 22
) -> dict[str, float]:
    """The ECE that probabilities ``p`` would show if they were exactly calibrated: labels drawn from p
    itself ``draws`` times (consistency resampling, Broecker and Smith 2007), their ECE's mean and 95th
    percentile. On a few hundred facts it is far from 0 (some 0.05 for 400 facts spread over [0, 1]):
    an ECE inside this band is what a calibrated model would show on that many facts."""
    p = np.asarray(p, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, num_bins - 1)
    rng = np.random.default_rng(seed)
    ece = np.zeros(draws)
    for b in np.unique(index):
        in_bin = p[index == b]
        # A few draws at a time: [draws, facts] uniforms at once would be 1.6 GB for a bin of a million
        # facts. Row blocks take the generator's values in the same order, so the numbers do not change.
        rows = max(1, block_elements // len(in_bin))
        true = np.concatenate([
            (rng.random((min(rows, draws - start), len(in_bin))) < in_bin).mean(1) for start in range(0, draws, rows)
        ])  # fmt: skip
        ece += len(in_bin) / len(p) * np.abs(in_bin.mean() - true)
    return {"mean": float(ece.mean()), "p95": float(np.percentile(ece, 95))}


def brier_score(p: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((p - labels) ** 2))


def log_loss(p: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of ``labels`` under probabilities ``p`` (clipped to [EPS, 1 - EPS], so a
    confident mistake costs -log EPS ~ 27.6 nats rather than infinity)."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, projection [D, 2]) of the two leading principal components."""
    centre = x.mean(0)
    _, _, vt = np.linalg.svd(x - centre, full_matrices=False)
    return centre, vt[:2].T


def nmf_2d(x: np.ndarray, iterations: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative factorisation x ~ w @ h with 2 components (Lee & Seung multiplicative updates)."""
    rng = np.random.default_rng(seed)
    scale = math.sqrt(x.mean() / 2)
    w = rng.random((x.shape[0], 2)) * scale + EPS
    h = rng.random((2, x.shape[1])) * scale + EPS
    for _ in range(iterations):
        h *= (w.T @ x) / (w.T @ w @ h + EPS)
        w *= (x @ h.T) / (w @ h @ h.T + EPS)
    return w, h


def kde_2d(points: np.ndarray, grid_x: np.ndarray, grid_y: np.ndarray) -> np.ndarray:
    """Gaussian kernel density of 2-D ``points`` on a grid, bandwidth by Scott's rule per axis."""
    bandwidth = points.std(0) * len(points) ** (-1 / 6) + EPS
    gx = (grid_x[None, :] - points[:, 0:1]) / bandwidth[0]  # [P, X]
    gy = (grid_y[None, :] - points[:, 1:2]) / bandwidth[1]  # [P, Y]
    density = np.exp(-0.5 * gy**2).T @ np.exp(-0.5 * gx**2)  # [Y, X]
    return density / (len(points) * 2 * math.pi * bandwidth.prod())


def contour_levels(density: np.ndarray, fractions: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> np.ndarray:
    """Contour levels at ``fractions`` of the density's maximum: strictly above 0, so no contour traces
    where the density underflows to 0 (matplotlib's automatic levels start at 0 and draw ragged lines
    along the grid there). Empty when the density is 0 everywhere."""
    top = float(np.max(density)) if np.size(density) else 0.0
    return np.asarray(fractions, dtype=np.float64) * top if top > 0 else np.empty(0)
