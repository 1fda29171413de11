"""Calibration: a map from a fact's score (logit) to the probability that the fact is true, fitted on
validation and stored with the run as ``RUN/calibration.json``.

sigmoid(score) is a probability only under the Bernoulli likelihood, and even then it is fitted against
uniform negatives weighted 1/b-, not against how often a fact of that score is true. A calibrator is
fitted on the validation facts (label 1) and as many corruptions (label 0), one calibrator per measure:

* ``magnitude``: the score with the posterior means (plus the relation's bias, as in
  ``uncertainty.fact_scores``);
* ``mc_mean`` (variational models): the logit of the Monte-Carlo mean probability, logit(mean_s sigmoid(z_s)).
* ``likelihood`` (1-vs-all models): the model's own mean log-probability of the fact's two answers,
  (log p(o | s, r) + log p(s | o, r^-1)) / 2 (``uncertainty.fact_log_likelihood``).

Methods: Platt scaling p = sigmoid(a x + b), globally or per relation with shrinkage toward the global
fit (``Platt``); isotonic regression (``Isotonic``, global only); and Platt per relation followed by a
global isotonic map of its output (``PlattIsotonic``): the relation's scale and offset from Platt, the
shape of the curve from isotonic regression. The default, ``auto``, picks one of the three per measure by
its out-of-fold ECE on validation (``choose_method``). Each is judged on test facts and corruptions drawn
the way ``report`` draws them (``judged``), by ECE, Brier score and log loss, beside the ECE a perfectly
calibrated model would show on as many facts (``quality``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from storage.atomic import atomic_write_json
from trainer import checkpoint, classify, uncertainty
from trainer.model import KGModel
from trainer.runs import Run

FILE = "calibration.json"
FORMAT = 2
"""2 adds the ``likelihood`` measure; files of format 1 (magnitude and mc_mean) are read as they are."""
READS = (1, 2)
METHODS = ("platt-isotonic", "platt", "isotonic")
AUTO = "auto"
"""Per measure, the method of ``METHODS`` with the lowest out-of-fold ECE on validation (``choose_method``)."""
CHOICES = (AUTO, *METHODS)
DEFAULT_METHOD = AUTO
MEASURES = ("magnitude", "mc_mean", "likelihood")
"""The measures a calibrator is fitted for: what ``predict`` shows (``magnitude``, ``mc_mean``) and what
``classify`` may judge by (``classify.MEASURES``: ``magnitude``, ``likelihood``)."""

PSEUDO_FACTS = 50.0
"""Strength of the pull of a relation's (a_r, b_r) toward the global (a, b), in facts: the Gaussian prior
is worth this many validation facts like the average one (its precision is PSEUDO_FACTS times the global
fit's Fisher information per fact), so a relation with n such facts moves about n / (n + 50) of the way
from the global fit to its own: a relation with 3 facts stays near the global fit, one with 2,000 gets
nearly its own. 50 because a logistic fit of 2 parameters needs some 10-20 facts of its rarer class per
parameter before its slope is stable (the events-per-variable rule of thumb), i.e. ~50 facts at the
half true, half corrupted mix fitted here."""


def _finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def pava(y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in weighted squared error (pool adjacent violators):
    each run of values that would decrease is replaced by its weighted mean, until none does."""
    means: list[float] = []
    totals: list[float] = []
    sizes: list[int] = []
    for value, weight in zip(y.tolist(), weights.tolist(), strict=True):
        size = 1
        while means and means[-1] >= value:
            previous, previous_weight = means.pop(), totals.pop()
            value = (previous * previous_weight + value * weight) / (previous_weight + weight)
            weight += previous_weight
            size += sizes.pop()
        means.append(value)
        totals.append(weight)
        sizes.append(size)
    return np.repeat(np.array(means, dtype=np.float64), sizes)


@dataclass
class Isotonic:
    """A non-decreasing map from logit to probability: linear between ``x`` (increasing logits) and
    ``y`` (their probabilities), constant beyond the ends."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray) -> Isotonic:
        """PAVA over the facts sorted by logit (facts of equal logit pooled first). The probabilities are
        clipped to [1/(2N), 1 - 1/(2N)] for N facts: a run of validation facts that are all false is
        evidence of a low probability, not of an impossible fact (its log loss would be infinite)."""
        distinct, group = np.unique(logits, return_inverse=True)
        counts = np.bincount(group).astype(np.float64)
        values = pava(np.bincount(group, weights=labels) / counts, counts)
        # Each constant run is kept by its two ends: interpolation between runs, flat within one.
        ends = np.flatnonzero(np.diff(values))
        keep = np.unique(np.concatenate([[0], ends, ends + 1, [len(values) - 1]]))
        bound = 1 / (2 * len(logits))
        return cls(distinct[keep], np.clip(values[keep], bound, 1 - bound))

    def probability(self, logits: np.ndarray, relations: np.ndarray) -> np.ndarray:
        return np.interp(logits, self.x, self.y)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "isotonic", "x": self.x.tolist(), "y": self.y.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Isotonic:
        x, y = np.asarray(d["x"], dtype=np.float64), np.asarray(d["y"], dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or len(x) == 0 or not _finite(x, y):
            raise ValueError("isotonic: 'x' and 'y' must be equally long lists of finite numbers")
        if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0) or y[0] < 0 or y[-1] > 1:
            raise ValueError("isotonic: 'x' must increase and 'y' be probabilities that never decrease")
        return cls(x, y)


@dataclass
class Platt:
    """p = sigmoid(a x + b): one (a, b), and per relation r its own (a_r, b_r) when ``relation_a`` is set."""

    a: float
    b: float
    relation_a: np.ndarray | None = None
    relation_b: np.ndarray | None = None
    relation_facts: np.ndarray | None = None
    """Facts of each relation the per-relation fit saw (0: the relation has the global (a, b))."""
    pseudo_facts: float = PSEUDO_FACTS

    @classmethod
    def fit(
        cls,
        logits: np.ndarray,
        labels: np.ndarray,
        relations: np.ndarray | None = None,
        num_relations: int = 0,
        pseudo_facts: float = PSEUDO_FACTS,
    ) -> Platt:
        """Minimise the log loss (Newton's method in float64) against Platt's (1999) targets: a true fact
        counts as (N+ + 1)/(N+ + 2), a false one as 1/(N- + 2), so the fit stays finite on separable data.

        With ``relations`` (each fact's relation id, < ``num_relations``), each relation's (a_r, b_r) is
        the MAP under a Gaussian prior centred on the global fit whose precision is ``pseudo_facts`` times
        the global fit's Fisher information per fact (see PSEUDO_FACTS).
        """
        x = torch.from_numpy(np.asarray(logits, dtype=np.float64))
        features = torch.stack([x, torch.ones_like(x)], 1)
        theta, per_relation = _shrunk_fit(features, labels, relations, num_relations, pseudo_facts)
        a, b = (float(v) for v in theta)
        if per_relation is None or relations is None:
            return cls(a, b, pseudo_facts=pseudo_facts)
        facts = np.bincount(relations, minlength=num_relations)
        return cls(a, b, per_relation[:, 0].numpy(), per_relation[:, 1].numpy(), facts, pseudo_facts)

    def probability(self, logits: np.ndarray, relations: np.ndarray) -> np.ndarray:
        if self.relation_a is None or self.relation_b is None:
            a, b = np.float64(self.a), np.float64(self.b)
        else:
            a, b = self.relation_a[relations], self.relation_b[relations]
        return torch.sigmoid(torch.from_numpy(a * np.asarray(logits, dtype=np.float64) + b)).numpy()

    def to_dict(self) -> dict[str, Any]:
        relations = None
        if self.relation_a is not None and self.relation_b is not None and self.relation_facts is not None:
            relations = {"a": self.relation_a.tolist(), "b": self.relation_b.tolist(),
                         "facts": self.relation_facts.tolist()}  # fmt: skip
        return {"kind": "platt", "a": self.a, "b": self.b, "pseudo_facts": self.pseudo_facts, "relations": relations}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Platt:
        relations, (a, b) = d["relations"], (float(d[k]) for k in ("a", "b"))
        if not _finite(np.array([a, b])):
            raise ValueError("platt: 'a' and 'b' must be finite numbers")
        if relations is None:
            return cls(a, b, pseudo_facts=float(d["pseudo_facts"]))
        relation_a, relation_b = (np.asarray(relations[k], dtype=np.float64) for k in ("a", "b"))
        facts = np.asarray(relations["facts"], dtype=np.int64)
        if relation_a.ndim != 1 or relation_a.shape != relation_b.shape or relation_a.shape != facts.shape:
            raise ValueError("platt: 'relations' needs equally long lists 'a', 'b' and 'facts'")
        if not _finite(relation_a, relation_b):
            raise ValueError("platt: 'relations' 'a' and 'b' must be finite numbers")
        return cls(a, b, relation_a, relation_b, facts, float(d["pseudo_facts"]))


def _shrunk_fit(
    features: torch.Tensor, labels: np.ndarray, relations: np.ndarray | None, num_relations: int, pseudo_facts: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logistic fit of ``labels`` on ``features`` [N, k] (float64, a column of ones among them) against
    Platt's targets: the global coefficients [k] and, with ``relations``, each relation's [R, k], the MAP
    under a Gaussian prior centred on the global fit with ``pseudo_facts`` times its Fisher information per
    fact as precision (see PSEUDO_FACTS)."""
    positives = float(labels.sum())
    negatives = len(labels) - positives
    y = torch.from_numpy(np.asarray(labels, dtype=np.float64))
    targets = y * (positives + 1) / (positives + 2) + (1 - y) / (negatives + 2)
    k = features.shape[1]
    one_group = torch.zeros(len(features), dtype=torch.long)
    no_prior = torch.zeros(k, k, dtype=torch.float64)
    theta = _newton(features, targets, one_group, torch.zeros(1, k, dtype=torch.float64), no_prior)
    if relations is None:
        return theta[0], None
    fisher = _hessian(features, targets, one_group, theta, 1)[0] / len(features)
    groups = torch.from_numpy(np.asarray(relations, dtype=np.int64))
    prior_mean = theta.expand(num_relations, k)
    return theta[0], _newton(features, targets, groups, prior_mean, pseudo_facts * fisher)


@dataclass
class StackedPlatt:
    """Platt scaling of several scores of a fact at once: p = sigmoid(w_r . z + c_r), z the scores
    standardised by their validation mean and spread, one weight per score and an offset per relation r,
    each relation's shrunk toward the global fit as ``Platt``'s (a_r, b_r) are (PSEUDO_FACTS).

    ``classify``'s ``combined`` measure: the magnitude of a fact both ways and a 1-vs-all model's likelihood
    of its answers order facts differently, and which one a relation's false facts give away differs."""

    center: np.ndarray
    """[k] each score's mean on the facts fitted."""
    spread: np.ndarray
    """[k] each score's standard deviation there (1 where it was constant)."""
    coefficients: np.ndarray
    """[k + 1] the global fit's weights, then its offset."""
    relation_coefficients: np.ndarray
    """[R, k + 1] each relation's (the global fit's for a relation without facts)."""
    pseudo_facts: float = PSEUDO_FACTS

    @classmethod
    def fit(
        cls,
        scores: np.ndarray,
        labels: np.ndarray,
        relations: np.ndarray,
        num_relations: int,
        pseudo_facts: float = PSEUDO_FACTS,
    ) -> StackedPlatt:
        """Fit on ``scores`` [N, k] of facts labelled ``labels`` [N] of ``relations`` [N]."""
        x = np.asarray(scores, dtype=np.float64)
        if x.ndim != 2 or len(x) != len(labels) or len(x) == 0:
            raise ValueError(f"scores: expected [N, k] with N = {len(labels)} > 0 facts, got {list(x.shape)}")
        if not _finite(x):
            raise ValueError("scores: some are NaN or infinite; a fit on them would be meaningless")
        center, spread = x.mean(0), x.std(0)
        # A score constant up to rounding says nothing: standardised, its rounding noise would be huge.
        spread = np.where(spread > 1e-9 * np.maximum(1.0, np.abs(center)), spread, 1.0)
        stacked = cls(center, spread, np.zeros(x.shape[1] + 1), np.zeros((0, x.shape[1] + 1)), pseudo_facts)
        theta, per_relation = _shrunk_fit(stacked._features(x), labels, relations, num_relations, pseudo_facts)
        assert per_relation is not None  # relations given
        stacked.coefficients, stacked.relation_coefficients = theta.numpy(), per_relation.numpy()
        return stacked

    def _features(self, scores: np.ndarray) -> torch.Tensor:
        z = torch.from_numpy((np.asarray(scores, dtype=np.float64) - self.center) / self.spread)
        return torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)

    def probability(self, scores: np.ndarray, relations: np.ndarray) -> np.ndarray:
        """p [N] of facts with ``scores`` [N, k] (the columns fitted, in order) of ``relations`` [N]."""
        theta = torch.from_numpy(self.relation_coefficients)[torch.from_numpy(np.asarray(relations, np.int64))]
        return torch.sigmoid((self._features(scores) * theta).sum(1)).numpy()


CROSS_FIT_FOLDS = 5
"""Folds of the cross-fitting of ``PlattIsotonic``'s Platt stage."""


def out_of_fold(
    fit: Callable[[np.ndarray, np.ndarray, np.ndarray], Calibrator | StackedPlatt],
    logits: np.ndarray,
    labels: np.ndarray,
    relations: np.ndarray,
    seed: int,
    folds: int = CROSS_FIT_FOLDS,
) -> np.ndarray:
    """Each fact's probability from ``fit(logits, labels, relations)`` on the other folds (a seeded
    random split into ``folds``); ``logits`` [N] or, for a ``StackedPlatt``, [N, k]."""
    fold = classify.fold_assignment(len(logits), seed, folds)
    held_out = np.empty(len(logits), dtype=np.float64)
    for k in range(folds):
        train, test = fold != k, fold == k
        if test.any():
            calibrator = fit(logits[train], labels[train], relations[train])
            held_out[test] = calibrator.probability(logits[test], relations[test])
    return held_out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


@dataclass
class PlattIsotonic:
    """Platt scaling per relation, then a non-decreasing map of its output (as a logit) to a probability.

    Platt per relation gets each relation's scale and offset but forces a sigmoid's shape; isotonic
    regression gets any monotone shape but one for every relation. Why it was the default before ``auto``,
    and what ``auto`` chooses on the small graphs: docs/uncertainty.md."""

    platt: Platt
    isotonic: Isotonic

    @classmethod
    def fit(
        cls,
        logits: np.ndarray,
        labels: np.ndarray,
        relations: np.ndarray,
        num_relations: int,
        pseudo_facts: float = PSEUDO_FACTS,
        seed: int = 0,
    ) -> PlattIsotonic:
        """The isotonic stage is fitted on cross-fitted Platt outputs (each fact's from a Platt fit on the
        other folds), not on the outputs of the Platt fit it follows, which have seen their own labels and
        would look better calibrated than they are on new facts."""

        def platt_fit(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> Platt:
            return Platt.fit(x, y, r, num_relations, pseudo_facts)

        held_out = out_of_fold(platt_fit, logits, labels, relations, seed)
        platt = platt_fit(logits, labels, relations)
        return cls(platt, Isotonic.fit(_logit(held_out), labels))

    def probability(self, logits: np.ndarray, relations: np.ndarray) -> np.ndarray:
        return self.isotonic.probability(_logit(self.platt.probability(logits, relations)), relations)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "platt-isotonic", "platt": self.platt.to_dict(), "isotonic": self.isotonic.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlattIsotonic:
        return cls(Platt.from_dict(d["platt"]), Isotonic.from_dict(d["isotonic"]))


Calibrator = Platt | Isotonic | PlattIsotonic


def _objective(features, targets, groups, theta, prior_mean, precision) -> torch.Tensor:
    """Per group: sum of the log losses of its facts against ``targets`` plus the prior's
    0.5 (theta - mean)^T precision (theta - mean)."""
    z = (features * theta[groups]).sum(1)
    data = torch.zeros(len(theta), dtype=torch.float64).index_add_(0, groups, F.softplus(z) - targets * z)
    offset = theta - prior_mean
    return data + 0.5 * ((offset @ precision) * offset).sum(1)


def _hessian(features, targets, groups, theta, num_groups: int) -> torch.Tensor:
    k = features.shape[1]
    p = torch.sigmoid((features * theta[groups]).sum(1))
    outer = (p * (1 - p))[:, None, None] * features[:, :, None] * features[:, None, :]
    return torch.zeros(num_groups, k, k, dtype=torch.float64).index_add_(0, groups, outer)


def _newton(
    features: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor,
    prior_mean: torch.Tensor,
    precision: torch.Tensor,
    max_steps: int = 100,
) -> torch.Tensor:
    """The coefficients [G, k] of ``features`` [N, k] minimising each group's ``_objective`` (Platt's: (a_g,
    b_g) of [logit, 1]): Newton steps, halved per group until the objective does not increase (the groups
    are independent, so they are solved side by side)."""
    num_groups, k = prior_mean.shape
    theta = prior_mean.clone()
    current = _objective(features, targets, groups, theta, prior_mean, precision)
    # A tiny ridge keeps the solve defined when a group's logits are all equal (a is then unidentified).
    ridge = 1e-9 * (1 + torch.bincount(groups, minlength=num_groups)).to(torch.float64)[:, None, None] * torch.eye(k)
    for _ in range(max_steps):
        p = torch.sigmoid((features * theta[groups]).sum(1))
        residual = (p - targets)[:, None] * features
        gradient = torch.zeros(num_groups, k, dtype=torch.float64).index_add_(0, groups, residual)
        gradient += (theta - prior_mean) @ precision
        hessian = _hessian(features, targets, groups, theta, num_groups) + precision + ridge
        step = torch.linalg.solve(hessian, gradient.unsqueeze(-1)).squeeze(-1)
        scale = torch.ones(num_groups, dtype=torch.float64)
        for _ in range(50):
            candidate = theta - scale[:, None] * step
            value = _objective(features, targets, groups, candidate, prior_mean, precision)
            worse = value > current
            if not worse.any():
                break
            scale = torch.where(worse, scale / 2, scale)
        better = value <= current
        theta = torch.where(better[:, None], candidate, theta)
        current = torch.where(better, value, current)
        if float((scale[:, None] * step).abs().max()) < 1e-10:
            break
    return theta


_CALIBRATORS: dict[str, type[Platt] | type[Isotonic] | type[PlattIsotonic]] = {
    "platt": Platt,
    "isotonic": Isotonic,
    "platt-isotonic": PlattIsotonic,
}


@dataclass
class Calibration:
    """One calibrator per measure, fitted on a run's validation facts with its checkpoint."""

    method: str
    per_relation: bool | None
    """None under ``auto``: each measure has the scope of the method chosen for it (``fitted_on["chosen"]``:
    isotonic global, the others per relation)."""
    calibrators: dict[str, Calibrator]
    fitted_on: dict[str, Any] = field(default_factory=dict)
    """split, positives, negatives, negative_source (``sampled``, ``verified negatives from FILE`` or
    ``given``), seed, samples; under ``auto``, chosen (measure -> method)."""
    checkpoint: dict[str, Any] = field(default_factory=dict)
    """The checkpoint fitted: its directory name, epoch and train seconds (a later one makes this stale)."""

    def describe(self) -> str:
        if self.method == AUTO:
            chosen = ", ".join(f"{name}: {kind}" for name, kind in self.fitted_on.get("chosen", {}).items())
            return f"calibrated on validation (auto, chosen by out-of-fold ECE: {chosen})"
        return f"calibrated on validation ({self.method}, {'per relation' if self.per_relation else 'global'})"

    def probabilities(self, logits: dict[str, np.ndarray], relations: np.ndarray) -> dict[str, np.ndarray]:
        """Calibrated probabilities of the measures in ``logits`` that have a calibrator."""
        return {name: self.calibrators[name].probability(x, relations) for name, x in logits.items()
                if name in self.calibrators}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "per_relation": self.per_relation,
            "fitted_on": self.fitted_on,
            "checkpoint": self.checkpoint,
            "measures": {name: c.to_dict() for name, c in self.calibrators.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        if type(d.get("format")) is not int or d["format"] not in READS:
            raise ValueError(f"format {d.get('format')!r}, this nvkg reads formats {', '.join(map(str, READS))}")
        if d["method"] not in CHOICES:
            raise ValueError(f"method {d['method']!r}: expected one of {', '.join(CHOICES)}")
        for key in ("fitted_on", "checkpoint"):
            if not isinstance(d[key], dict):
                raise ValueError(f"{key}: expected an object, found {d[key]!r}")
        chosen = d["fitted_on"].get("chosen", {})
        if not isinstance(chosen, dict) or any(m not in METHODS for m in chosen.values()):
            raise ValueError(f"fitted_on.chosen: expected measure -> one of {', '.join(METHODS)}, found {chosen!r}")
        calibrators: dict[str, Calibrator] = {}
        for name, values in d["measures"].items():
            if name not in MEASURES or values.get("kind") not in _CALIBRATORS:
                raise ValueError(f"measure {name!r} of kind {values.get('kind')!r}: not a known calibrator")
            calibrators[name] = _CALIBRATORS[values["kind"]].from_dict(values)
        if "magnitude" not in calibrators:
            raise ValueError("measures.magnitude: missing, and predict, classify and report use it")
        # Files written under auto before it stored null hold magnitude's scope alone: fitted_on.chosen says.
        per_relation = None if d["method"] == AUTO else bool(d["per_relation"])
        return cls(d["method"], per_relation, calibrators, d["fitted_on"], d["checkpoint"])

    def check_relations(self, num_relations: int) -> None:
        """A ValueError naming the field unless every per-relation Platt map has one (a, b) per relation:
        a shorter list fails on the first relation beyond it, a longer one is of another graph."""
        for field_name, platt in self._platt_maps():
            if platt.relation_a is not None and len(platt.relation_a) != num_relations:
                raise ValueError(
                    f"{field_name}.relations: 'a' and 'b' have {len(platt.relation_a)} values, one per relation, "
                    f"and the dataset has {num_relations} relations"
                )

    def _platt_maps(self) -> Iterator[tuple[str, Platt]]:
        """(field of calibration.json, Platt map) of each measure's Platt map or Platt stage."""
        for name, calibrator in self.calibrators.items():
            if isinstance(calibrator, Platt):
                yield f"measures.{name}", calibrator
            elif isinstance(calibrator, PlattIsotonic):
                yield f"measures.{name}.platt", calibrator.platt


def judged(run: Run, split: str, seed: int, negatives: torch.Tensor | None = None) -> classify.LabelledFacts:
    """The facts of ``split`` (label 1) and ``negatives`` (label 0). Without ``negatives``, the split's as
    ``classify`` and ``report`` judge it: the dataset's verified negatives when it has them, else one
    corruption of each fact (head or tail, uniformly), redrawn until it is not a known fact, from a
    generator seeded with ``seed``."""
    data = run.dataset
    if negatives is None:
        return classify.labelled_facts(data, split, seed)
    if negatives.ndim != 2 or negatives.shape[1] != 3 or len(negatives) == 0:
        raise ValueError(f"negatives: expected facts [M, 3] with M > 0, got shape {list(negatives.shape)}")
    if not _scorable(negatives, data.num_entities, data.num_relations):
        raise ValueError("negatives: an entity or relation id outside the trained model's")
    classify.check_not_known(data, negatives, "negatives")
    positives = data.valid if split == "valid" else data.test
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    return classify.LabelledFacts(torch.cat([positives, negatives.to(positives.dtype)]), labels, "given")


def _scorable(facts: torch.Tensor, num_entities: int, num_relations: int) -> bool:
    entities, relations = facts[:, [0, 2]], facts[:, 1]
    return bool((entities >= 0).all() and (entities < num_entities).all() and (relations >= 0).all()
                and (relations < num_relations).all())  # fmt: skip


def measure_logits(scores: uncertainty.FactScores, variational: bool) -> dict[str, np.ndarray]:
    """The logit each calibrated measure is a function of (float64)."""
    logits = {"magnitude": scores.magnitude.astype(np.float64)}
    if variational:
        logits["mc_mean"] = uncertainty.logit_of_mean_probability(scores.samples)
    if scores.likelihood is not None:
        logits["likelihood"] = scores.likelihood  # a mean log-probability: the calibrators take any score
    return logits


def finite_logits(scores: uncertainty.FactScores, variational: bool, split: str) -> dict[str, np.ndarray]:
    """``measure_logits``, an error naming the measure where some are not finite (``classify.check_finite``)."""
    return {name: classify.check_finite(x, name, split) for name, x in measure_logits(scores, variational).items()}


def raw_probabilities(scores: uncertainty.FactScores, variational: bool) -> dict[str, np.ndarray]:
    """The uncalibrated probabilities of the measures ``measure_logits`` gives (as ``report`` has them)."""
    probs = scores.probabilities()
    raw = {"magnitude": probs.magnitude, **({"mc_mean": probs.mean} if variational else {})}
    if scores.likelihood is not None:  # the geometric mean of the two answers' probabilities
        raw["likelihood"] = classify.measure_probabilities(scores.likelihood, "likelihood")
    return raw


def fit(
    run: Run,
    *,
    method: str = DEFAULT_METHOD,
    per_relation: bool | None = None,
    seed: int,
    samples: int = 100,
    negatives: torch.Tensor | None = None,
    pseudo_facts: float = PSEUDO_FACTS,
    likelihood: bool = True,
) -> Calibration:
    """Calibrators of ``run``'s measures fitted on its validation facts and ``negatives`` (default: one
    sampled, filtered corruption per fact, seeded with ``seed``). ``per_relation`` defaults to True for
    Platt scaling; isotonic regression is fitted globally only (a step function per relation would need
    far more facts than most relations have); platt-isotonic is per relation (its Platt stage); auto picks
    one of the three per measure by its out-of-fold ECE on the same validation facts (each in its scope).
    ``likelihood``: fit the 1-vs-all likelihood's calibrator too, where ``uncertainty.likelihood_affordable``."""
    if method not in CHOICES:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(CHOICES)}")
    if method == AUTO and per_relation is not None:
        raise ValueError("--per-relation/--global: auto fits each method in its own scope; name a method")
    if per_relation is None:
        per_relation = method != "isotonic"
    if per_relation and method == "isotonic":
        raise ValueError("--per-relation: isotonic regression is fitted globally; use --global or --method platt")
    if not per_relation and method == "platt-isotonic":
        raise ValueError(
            "--global: platt-isotonic's Platt stage is per relation (a global one adds nothing to the "
            "isotonic map); use --method isotonic or --method platt --global"
        )
    data, model = run.dataset, run.model
    if len(data.valid) == 0:
        raise ValueError(f"{data.name}: no validation facts to calibrate on")
    valid = judged(run, "valid", seed, negatives)
    scores = uncertainty.fact_scores(model, valid.facts, samples, seed, likelihood=likelihood)
    logits = finite_logits(scores, model.variational, "valid")
    chosen = {name: method for name in logits}
    if method == AUTO:
        chosen = {
            name: choose_method(out_of_fold_quality(x, valid.labels, valid.relations, data.num_relations, seed,
                                                    pseudo_facts))
            for name, x in logits.items()
        }  # fmt: skip
    calibrators = {
        name: fit_calibrator(
            chosen[name], per_relation if method != AUTO else chosen[name] != "isotonic", x, valid.labels,
            valid.relations, data.num_relations, pseudo_facts, seed,
        )
        for name, x in logits.items()
    }  # fmt: skip
    fitted_on = {"split": "valid", **valid.counts(), "seed": seed, "samples": samples if model.variational else 0}
    if method != AUTO:
        return Calibration(method, per_relation, calibrators, fitted_on, checkpoint_identity(run))
    fitted_on["chosen"] = chosen  # each measure's scope is its chosen method's: no one per_relation
    return Calibration(method, None, calibrators, fitted_on, checkpoint_identity(run))


def choose_method(qualities: dict[str, dict[str, Any]]) -> str:
    """The method of ``METHODS`` whose out-of-fold probabilities on the validation facts have the lowest ECE
    (ties: the earlier one), given ``out_of_fold_quality`` of every method: chosen on validation, never on
    test."""
    return min(METHODS, key=lambda m: (qualities[m]["ece"], METHODS.index(m)))


def out_of_fold_quality(
    logits: np.ndarray,
    labels: np.ndarray,
    relations: np.ndarray,
    num_relations: int,
    seed: int,
    pseudo_facts: float = PSEUDO_FACTS,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, dict[str, Any]]:
    """Per method of ``methods``, ECE / Brier / log loss of its out-of-fold probabilities (each fact's from
    the method fitted on the other folds with the shrinkage ``pseudo_facts`` that a final fit would use;
    seeded with ``seed`` + 1, apart from the cross-fit inside platt-isotonic)."""
    qualities = {}
    for method in methods:

        def fit(x: np.ndarray, y: np.ndarray, r: np.ndarray, method: str = method) -> Calibrator:
            return fit_calibrator(method, method != "isotonic", x, y, r, num_relations, pseudo_facts, seed)

        held_out = out_of_fold(fit, logits, labels, relations, seed + 1)
        qualities[method] = {k: v for k, v in quality(held_out, labels).items() if k != "bins"}
    return qualities


def fit_calibrator(
    method: str,
    per_relation: bool,
    logits: np.ndarray,
    labels: np.ndarray,
    relations: np.ndarray,
    num_relations: int,
    pseudo_facts: float = PSEUDO_FACTS,
    seed: int = 0,
) -> Calibrator:
    if method == "isotonic":
        return Isotonic.fit(logits, labels)
    if method == "platt-isotonic":
        return PlattIsotonic.fit(logits, labels, relations, num_relations, pseudo_facts, seed)
    if per_relation:
        return Platt.fit(logits, labels, relations, num_relations, pseudo_facts)
    return Platt.fit(logits, labels, pseudo_facts=pseudo_facts)


def cross_validated(
    run: Run,
    methods: tuple[str, ...] = METHODS,
    *,
    seed: int,
    samples: int = 100,
    pseudo_facts: float = PSEUDO_FACTS,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per measure and method, ``out_of_fold_quality`` on validation: what ``auto`` chooses by, without
    looking at test."""
    data, model = run.dataset, run.model
    valid = judged(run, "valid", seed)
    scores = uncertainty.fact_scores(model, valid.facts, samples, seed, likelihood=True)
    return {
        name: out_of_fold_quality(x, valid.labels, valid.relations, data.num_relations, seed, pseudo_facts, methods)
        for name, x in measure_logits(scores, model.variational).items()
    }


def calibrated_probabilities(calibration: Calibration) -> dict[str, classify.CalibratedProbability]:
    """Per measure ``classify`` judges by (``classify.MEASURES``) that ``calibration`` has a calibrator
    for: (facts' scores under it with the posterior means, no draws (``classify.measure_scores``), their
    relations) -> their calibrated probabilities, what ``classify`` judges at 0.5."""
    return {name: calibration.calibrators[name].probability for name in classify.MEASURES
            if name in calibration.calibrators}  # fmt: skip


def checkpoint_identity(run: Run) -> dict[str, Any]:
    """What tells ``run``'s checkpoint from a later one of the same run."""
    if run.checkpoint is None:
        return {}
    state = checkpoint.read_index(run.checkpoint)["state"]
    return {"name": run.checkpoint.name, "epoch": state["epoch"], "train_seconds": state["train_seconds"]}


def quality(p: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """ECE (with the reliability diagram's bins and the band a calibrated model's ECE would fall in on
    as many facts), Brier score and log loss of probabilities ``p``."""
    ece, bins = uncertainty.expected_calibration_error(p, labels)
    return {"ece": ece, "ece_if_calibrated": uncertainty.ece_if_calibrated(p),
            "brier": uncertainty.brier_score(p, labels), "log_loss": uncertainty.log_loss(p, labels),
            "bins": bins}  # fmt: skip


def compare(
    calibration: Calibration, scores: uncertainty.FactScores, facts: classify.LabelledFacts, variational: bool
) -> dict[str, dict[str, dict[str, Any]]]:
    """``quality`` of each calibrated measure before and after calibration."""
    before = raw_probabilities(scores, variational)
    after = calibration.probabilities(measure_logits(scores, variational), facts.relations)
    return {name: {"before": quality(before[name], facts.labels), "after": quality(p, facts.labels)}
            for name, p in after.items()}  # fmt: skip


def fitted_draws(calibration: Calibration, samples: int) -> int:
    """The draws to score facts with for ``calibration``'s MC mean: as many as it was fitted with, else
    ``samples``. The mean of S draws' probabilities is another quantity for each S (its spread shrinks as S
    grows), and a calibrator maps the one it was fitted on (on nations, 1 draw instead of 50 took the
    calibrated MC mean's test ECE from 0.088 to 0.189)."""
    fitted = calibration.fitted_on.get("samples")
    return fitted if type(fitted) is int and fitted > 0 else samples


def scores_for(
    calibration: Calibration, model: KGModel, facts: torch.Tensor, samples: int, seed: int
) -> uncertainty.FactScores:
    """``uncertainty.fact_scores`` of ``facts`` with every measure ``calibration`` has a calibrator of: the
    likelihood whenever it has one (fitted on validation, it is judged on any number of facts)."""
    scores = uncertainty.fact_scores(model, facts, samples, seed)
    if "likelihood" in calibration.calibrators:
        scores.likelihood = uncertainty.fact_log_likelihood(model, facts)
    return scores


def calibrate(
    run: Run,
    *,
    method: str = DEFAULT_METHOD,
    per_relation: bool | None = None,
    seed: int,
    samples: int = 100,
    negatives: torch.Tensor | None = None,
) -> tuple[Path, dict[str, Any]]:
    """``trainer calibrate``: fit on validation, judge on test (its positives and sampled corruptions, as
    ``report`` draws them), write RUN/calibration.json atomically. Returns its path and contents."""
    if run.directory is None:
        raise ValueError("calibrate: the run has no directory to store calibration.json in")
    calibration = fit(run, method=method, per_relation=per_relation, seed=seed, samples=samples, negatives=negatives)
    test = judged(run, "test", seed)
    scores = scores_for(calibration, run.model, test.facts, samples, seed)
    finite_logits(scores, run.model.variational, "test")
    compared = compare(calibration, scores, test, run.model.variational)
    stored = calibration.to_dict()
    stored["test"] = {
        **test.counts(),
        "seed": seed,
        **{name: {when: {k: v for k, v in q.items() if k != "bins"} for when, q in result.items()}
           for name, result in compared.items()},
    }  # fmt: skip
    path = run.directory / FILE
    atomic_write_json(path, stored)
    return path, stored


def format_calibrated(path: Path, stored: dict[str, Any]) -> str:
    fitted, test = stored["fitted_on"], stored["test"]
    calibration = Calibration.from_dict(stored)
    lines = [
        f"wrote {path}: {calibration.describe()}, {fitted['positives']:,} facts + {fitted['negatives']:,} "
        f"negatives ({fitted['negative_source']})",
        f"test ({test['positives']:,} facts + {test['negatives']:,} negatives, {test['negative_source']}), "
        "before -> after:",
    ]
    metrics = (("ece", "ECE"), ("brier", "Brier"), ("log_loss", "log loss"))
    for name in (name for name in MEASURES if name in test):
        before, after = test[name]["before"], test[name]["after"]
        numbers = [f"{label} {before[key]:.4f} -> {after[key]:.4f}" for key, label in metrics]
        band = after["ece_if_calibrated"]
        numbers[0] += f" (a calibrated model: {band['mean']:.4f}, 95% below {band['p95']:.4f})"
        lines.append(f"  {name:10s} " + "   ".join(numbers))
    return "\n".join(lines)


def stored(run: Run) -> tuple[Calibration | None, str]:
    """The run's calibration.json, if there is one fitted on the checkpoint loaded, and a line saying
    what the probabilities shown are."""
    how = f"`python -m trainer calibrate {run.directory or 'RUN'}` fits one on validation"
    path = None if run.directory is None else run.directory / FILE
    if path is None or not path.is_file():
        return None, f"uncalibrated: sigmoid(score), not fitted to how often facts are true ({how})"
    try:
        calibration = Calibration.from_dict(json.loads(path.read_text()))
        calibration.check_relations(run.dataset.num_relations)
    except (KeyError, TypeError, AttributeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not an nvkg calibration of this run ({err})") from None
    current = checkpoint_identity(run)
    if calibration.checkpoint != current:
        fitted = calibration.checkpoint.get("epoch", "?")
        return None, (f"uncalibrated: {path} was fitted on the checkpoint of epoch {fitted}, this one is of "
                      f"epoch {current.get('epoch', '?')} ({how} again)")  # fmt: skip
    return calibration, calibration.describe()
