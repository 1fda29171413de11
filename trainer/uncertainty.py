"""Uncertainty measures as pure functions: Monte-Carlo fact probabilities, confidence measures,
precision against coverage, calibration, and the projections of the fact visualisation.

Probabilities are the Bernoulli likelihood's, sigmoid(score) (the paper's), for every model. The facts
judged are test facts (label 1) and as many corrupted facts (label 0: head or tail replaced by a uniform
entity, never a known fact), so half the facts are true.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from sharding.rng import splitmix64
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


def sampled_negatives(
    facts: torch.Tensor,
    is_known: Callable[[torch.Tensor], torch.Tensor],
    num_entities: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One corruption per fact (head or tail, uniformly), redrawn until ``is_known`` says it is not a
    known fact (e.g. ``known_mask`` over a dataset's ``known_chunks``)."""
    out = facts.clone()
    todo = torch.ones(len(facts), dtype=torch.bool)
    while todo.any():
        rows = todo.nonzero().squeeze(1)
        side = torch.randint(2, (len(rows),), generator=generator) * 2  # column 0 (head) or 2 (tail)
        candidate = facts[rows].clone()
        candidate[torch.arange(len(rows)), side] = torch.randint(num_entities, (len(rows),), generator=generator)
        clash = is_known(candidate)
        out[rows[~clash]] = candidate[~clash]
        todo[rows[~clash]] = False
    return out


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
    """Scores (logits) of each fact: with the means (``magnitude``, [N]) and per sample ``samples`` [S, N]."""

    magnitude: np.ndarray
    samples: np.ndarray

    def probabilities(self) -> FactProbabilities:
        magnitude, samples = (torch.sigmoid(torch.from_numpy(x)).numpy() for x in (self.magnitude, self.samples))
        return FactProbabilities(magnitude, samples)


@torch.no_grad()
def fact_scores(model: KGModel, facts: torch.Tensor, num_samples: int, seed: int, missing: str = "tail") -> FactScores:
    """Scores of ``facts`` [N, 3] with the posterior means and over ``num_samples`` draws (one draw, the
    means, for a point model). As answers to head queries (``missing="head"``) a reciprocal model scores
    them as evaluation ranks them: (o, r^-1, s)."""
    ents, rels = model.entities.full(), model.relations.full()
    s, r, o = facts.unbind(-1)
    if missing == "head" and model.reciprocal:
        s, r, o = o, r + model.num_relations, s

    bias = model.relation_bias(r)  # a reciprocal model has none: only the Bernoulli likelihood learns one

    def score(entity: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        return model.scorer.score(entity[s], relation[r], entity[o]) + bias

    magnitude = score(ents.mean, rels.mean)
    if not model.variational or num_samples == 0:  # 0: the means alone (triple classification)
        return FactScores(magnitude.numpy(), magnitude.numpy()[None])
    generator = torch.Generator().manual_seed(seed)
    draws = [score(ents.sample(generator), rels.sample(generator)) for _ in range(num_samples)]
    return FactScores(magnitude.numpy(), torch.stack(draws).numpy())


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


def truth_confidences(probs: FactProbabilities) -> dict[str, np.ndarray]:
    """Scores ranking facts by how likely they are true (precision against coverage, paper Figure 2)."""
    return {
        "magnitude": probs.magnitude,
        "mc_mean": probs.mean,
        "mc_lower_bound": probs.mean - probs.std,  # the mean penalised by its spread
    }


def prediction_confidences(probs: FactProbabilities) -> dict[str, np.ndarray]:
    """How sure each measure is of the predicted label (selective prediction): larger is surer."""
    return {
        "magnitude": np.abs(probs.magnitude - 0.5),
        "mc_mean": np.abs(probs.mean - 0.5),
        "mc_std": -probs.std,
        "entropy": -binary_entropy(probs.mean),
        "mutual_information": -mutual_information(probs.samples),
    }


def coverage_grid(num_points: int = 1000) -> np.ndarray:
    """``num_points`` coverage values in (0, 1]."""
    return np.arange(1, num_points + 1) / num_points


def precision_at_coverage(confidence: np.ndarray, correct: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Fraction of ``correct`` among the ceil(c * N) most confident items, for each coverage c.

    Ties in confidence are broken by averaging (each tied group counts its mean correctness), so a
    constant confidence gives the base rate at every coverage rather than an order-dependent value.
    """
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], correct[order].astype(np.float64)
    # Replace each item's correctness by its tie group's mean.
    _, group, counts = np.unique(-conf, return_inverse=True, return_counts=True)
    hits = (np.bincount(group, weights=hits) / counts)[group]
    kept = np.maximum(1, np.ceil(coverage * len(hits)).astype(int))
    return np.cumsum(hits)[kept - 1] / kept


def area(coverage: np.ndarray, values: np.ndarray) -> float:
    """Mean over the coverage grid (the area under the curve on (0, 1])."""
    return float(np.mean(values)) if len(values) else math.nan


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
