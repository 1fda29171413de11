"""Triple classification: is a fact true? ``python -m trainer classify RUN [--seed N] [--measure M]``.

A fact is judged true when its probability under a measure (``MEASURES``) is above its relation's
threshold: ``magnitude``, sigmoid(score + relation bias) with the posterior means, for every model, and
for a 1-vs-all model also ``likelihood``, the geometric mean of p(o | s, r) and p(s | o, r^-1), the
model's own probabilities of the fact's two answers against every other entity; and for a model with
reciprocal relations ``combined``, Platt scaling per relation of the magnitude of the fact, of its
reciprocal (o, r^-1, s) and its likelihood together (``calibration.StackedPlatt``), fitted on validation.
Under ``auto`` (the default) the measure is the one whose thresholds are the more accurate on validation
facts they were not chosen on (``held_out_accuracy``; the earlier in that order on a tie).

Thresholds are chosen on validation: the positives are the valid facts, the negatives the dataset's facts
known to be false (``valid_negatives.txt``) when it has them, else one sampled corruption per positive (head
or tail replaced by a uniform entity, never a known fact, drawn as ``report`` draws them). Each relation
with validation facts gets the threshold that maximises its validation accuracy; a relation without any gets
the one that maximises accuracy over all of them.
Accuracy and F1 are then measured on the test facts against ``test_negatives.txt``, or sampled negatives.

A calibration step plugs in through ``calibrated`` (measure -> (the facts' scores under it, their relations)
-> calibrated probabilities): the chosen measure's calibrated probability (else magnitude's) is judged at 0.5
beside the thresholds; a measure's test scores are computed once, for its thresholds and its calibrator. The
combined measure's probability is fitted on validation, a calibration of its own: it is judged at 0.5 as it
is, and ``calibrated`` is not used then.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from storage.atomic import atomic_write_json
from storage.dataset import KGDataset
from trainer import uncertainty
from trainer.evaluate import sample_facts
from trainer.model import KGModel
from trainer.runs import Run

if TYPE_CHECKING:
    from trainer.calibration import StackedPlatt

SAMPLED = "sampled"
"""``negative_source`` of negatives drawn as corruptions of the positives."""
# Facts scored at a time: the gathered embeddings stay bounded whatever the size of the split.
CHUNK_ROWS = 1 << 20
# The probability a calibrated model is judged at.
CALIBRATED_THRESHOLD = 0.5

AUTO = "auto"
COMBINED = "combined"
MEASURES = {
    "magnitude": "sigmoid(score + relation bias) with the posterior means",
    "likelihood": "the geometric mean of p(o | s, r) and p(s | o, r^-1) with the posterior means (1-vs-all)",
    COMBINED: "Platt scaling per relation of the fact's magnitude, its reciprocal's and its likelihood together, "
    "fitted on validation (reciprocal models)",
}
"""What a fact's probability is under each measure ``classify`` can judge by."""

FOLDS = 5
"""Folds of the validation facts that ``auto`` chooses a measure by (``held_out_accuracy``)."""

CalibratedProbability = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Calibrated probabilities [N] of facts from their scores under a measure (``measure_scores``) [N] and their
relations [N] (e.g. ``probability`` of a trainer/calibration.py calibrator)."""


@dataclass
class LabelledFacts:
    """The facts judged on one split: positives (label 1) then negatives (label 0)."""

    facts: torch.Tensor
    """[N, 3] (head, relation, tail)."""
    labels: np.ndarray
    """[N] 1.0 for a true fact, 0.0 for a false one."""
    negative_source: str
    """``sampled`` or ``verified negatives from FILE``."""
    positives_available: int | None = None
    """The split's facts, where more than ``MAX_FACTS`` and these are a sample of them."""

    @property
    def relations(self) -> np.ndarray:
        return self.facts[:, 1].numpy()

    def counts(self) -> dict:
        positives = int(self.labels.sum())
        counts = {"positives": positives, "negatives": len(self.labels) - positives,
                  "negative_source": self.negative_source}  # fmt: skip
        if self.positives_available is not None:
            counts["positives_available"] = self.positives_available
        return counts


MAX_FACTS = 200_000
"""The facts of a split that ``calibrate``, ``classify`` and ``report`` judge at most, a seeded sample of them
beyond (and as many of its verified negatives): Freebase86m's 17M validation facts, each scored under 100
draws, would take some 13 GB; 200,000 facts leave an ECE's sampling noise near 0.002."""


def labelled_facts(data: KGDataset, split: str, seed: int, max_facts: int | None = None) -> LabelledFacts:
    """``split``'s facts and its negatives: the dataset's verified ones (``{split}_negatives.txt``), else
    one corruption per fact (head or tail, uniformly), redrawn until it is not a known fact, from a
    generator seeded with ``seed`` (``classify``, ``calibrate`` and ``report`` judge the same facts). Of a
    split with more than ``max_facts`` (default ``MAX_FACTS``) facts, a seeded sample of that many, and of
    as many verified negatives."""
    limit = max_facts or MAX_FACTS
    every = data.valid if split == "valid" else data.test
    positives = sample_facts(every, limit, seed)
    negatives = data.negatives(split)
    if negatives is not None:
        negatives = sample_facts(negatives, limit, seed)
    source = f"verified negatives from {data.negatives_file(split)}"
    if negatives is None:
        is_known = lambda facts: uncertainty.known_mask(facts, data.known_chunks())  # noqa: E731
        generator = torch.Generator().manual_seed(seed)
        negatives, source = uncertainty.sampled_negatives(positives, is_known, data.num_entities, generator), SAMPLED
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    available = len(every) if len(positives) < len(every) else None
    return LabelledFacts(torch.cat([positives, negatives]), labels, source, available)


def check_not_known(data: KGDataset, negatives: torch.Tensor, source: str) -> None:
    """Refuse negatives of which some are known true facts (train, valid or test): labelled both true and
    false, a fact would pull a calibrator and a threshold both ways. The error names ``source``, how many
    and the first such fact by its names. (Negatives files are checked when converted, naming the line.)"""
    known = uncertainty.known_mask(negatives, data.known_chunks())
    if not bool(known.any()):
        return
    h, r, t = negatives[int(known.nonzero()[0, 0])].tolist()
    entities, relations = data.names("entities")["name"], data.names("relations")["name"]
    fact = f"{entities[h].as_py()}\t{relations[r].as_py()}\t{entities[t].as_py()}"
    raise ValueError(
        f"{source}: {int(known.sum())} of its {len(negatives)} negatives are known true facts (in train, "
        f"valid or test), the first {fact!r}; a fact cannot be both true and false: remove them"
    )


def mean_scores(model: KGModel, facts: torch.Tensor, chunk_rows: int = CHUNK_ROWS, missing: str = "tail") -> np.ndarray:
    """score + relation bias of ``facts`` [N, 3] with the posterior means (the ``magnitude`` logit), [N]
    float64, ``chunk_rows`` facts at a time; ``missing="head"``: of the reciprocal facts (o, r^-1, s) of a
    reciprocal model (``uncertainty.fact_scores``)."""
    chunks = [uncertainty.fact_scores(model, facts[lo : lo + chunk_rows], 0, 0, missing=missing).magnitude
              for lo in range(0, len(facts), chunk_rows)]  # fmt: skip
    return np.concatenate(chunks).astype(np.float64) if chunks else np.empty(0)


def measure_scores(model: KGModel, facts: torch.Tensor, measure: str) -> np.ndarray:
    """What each fact [N, 3] scores under ``measure`` (``MEASURES``), [N] float64, as a calibrator takes it:
    the score with the posterior means (magnitude), the mean log-probability of its answers (likelihood)."""
    if measure == "magnitude":
        return mean_scores(model, facts)
    if measure == "likelihood":
        return uncertainty.fact_log_likelihood(model, facts)
    raise ValueError(f"measure {measure!r}: expected one of {', '.join(MEASURES)}")


def check_finite(scores: np.ndarray, measure: str, split: str) -> np.ndarray:
    """``scores``, unless some are NaN or infinite: thresholds and calibrators fitted on them would be
    meaningless without a word (a NaN compares false with every threshold)."""
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{measure}: {bad} of {len(scores)} {split} facts score NaN or infinity; "
                         "the checkpoint holds non-finite values")  # fmt: skip
    return scores


def measure_probabilities(scores: np.ndarray, measure: str) -> np.ndarray:
    """The probability under ``measure`` of facts that score ``scores`` under it (``measure_scores``), [N]
    float64: sigmoid of the magnitude, exp of the likelihood's mean log-probability."""
    return torch.sigmoid(torch.from_numpy(scores)).numpy() if measure == "magnitude" else np.exp(scores)


COMBINED_MIN_FACTS = 4 * FOLDS
"""Validation facts the combined measure needs: its held-out accuracy fits it on the facts a fold leaves in,
out of fold within them, so every fit keeps a few facts."""


def available_measures(model: KGModel, num_facts: int, valid_facts: int) -> tuple[str, ...]:
    """The measures ``auto`` chooses among for ``num_facts`` facts, ``valid_facts`` of them validation's:
    likelihood for a 1-vs-all model while scoring them against every entity stays affordable
    (``uncertainty.likelihood_affordable``); combined for a model with reciprocal relations (it stacks at
    least magnitude both ways) and at least ``COMBINED_MIN_FACTS`` validation facts."""
    likelihood = ("likelihood",) if uncertainty.likelihood_affordable(model, num_facts) else ()
    combined = (COMBINED,) if model.reciprocal and valid_facts >= COMBINED_MIN_FACTS else ()
    return ("magnitude", *likelihood, *combined)


REVERSED = "magnitude of the reciprocal fact"


def combined_scores(model: KGModel, facts: torch.Tensor, scored: dict[str, np.ndarray], split: str) -> np.ndarray:
    """[N, k] what the combined measure stacks for ``facts``: magnitude, the magnitude of the reciprocal
    facts (o, r^-1, s), and the likelihood when ``scored`` (the measures' scores already computed for these
    facts) has it; the reciprocal's is kept in ``scored`` too."""
    if REVERSED not in scored:
        scored[REVERSED] = check_finite(mean_scores(model, facts, missing="head"), REVERSED, split)
    likelihood = [scored["likelihood"]] if "likelihood" in scored else []
    return np.stack([scored["magnitude"], scored[REVERSED], *likelihood], 1)


def stack_fitter(num_relations: int) -> Callable[[np.ndarray, np.ndarray, np.ndarray], StackedPlatt]:
    """(scores [N, k], labels, relations) -> the combined measure's ``calibration.StackedPlatt`` fitted on them."""
    from trainer import calibration

    return lambda x, y, r: calibration.StackedPlatt.fit(x, y, r, num_relations)


def fold_assignment(n: int, seed: int, folds: int) -> np.ndarray:
    """Each of ``n`` facts' fold, of ``folds``: a seeded random split into (nearly) equal parts."""
    return np.random.default_rng(seed).permutation(n) % folds


def combined_probabilities(
    model: KGModel, valid: LabelledFacts, test: LabelledFacts, scored: dict[str, dict[str, np.ndarray]], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The combined measure's probabilities of the valid facts, each from the fit on the other folds (its
    thresholds and validation accuracy are then chosen on facts the fit did not see, as the single
    measures' scores did not see theirs), and of the test facts, from the fit on every valid fact."""
    from trainer import calibration  # imported here: calibration builds on this module's labelled facts

    fit = stack_fitter(model.num_relations)
    valid_x = combined_scores(model, valid.facts, scored["valid"], "valid")
    test_x = combined_scores(model, test.facts, scored["test"], "test")
    valid_p = calibration.out_of_fold(fit, valid_x, valid.labels, valid.relations, seed)
    return valid_p, fit(valid_x, valid.labels, valid.relations).probability(test_x, test.relations)


def stored_calibration(run: Run) -> tuple[dict[str, CalibratedProbability], str]:
    """The calibrated probabilities of the measures ``classify`` judges by (those the run's
    calibration.json has, when it is fitted on the checkpoint loaded), and a line saying which."""
    from trainer import calibration  # imported here: calibration builds on this module's labelled facts

    fitted, description = calibration.stored(run)
    return ({} if fitted is None else calibration.calibrated_probabilities(fitted)), description


def best_threshold(p: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The threshold t for which "true iff p > t" labels (``p``, ``labels``) right most often, and that
    accuracy. The candidates are the midpoints between consecutive distinct values of 0, ``p`` and 1 (a
    threshold anywhere between two values labels alike; the lower value where the midpoint of two adjacent
    floats rounds onto the upper); equally accurate ones go to the one nearest 0.5, then the lower.
    O(N log N): one sort, then the accuracy of every cut from cumulative sums."""
    if len(p) == 0:
        raise ValueError("no facts to choose a threshold on")
    order = np.argsort(p, kind="stable")
    sorted_p, sorted_y = np.asarray(p, np.float64)[order], np.asarray(labels, np.float64)[order]
    # Cut i judges the i lowest facts false: right on the negatives below it and the positives above.
    negatives_below = np.concatenate([[0.0], np.cumsum(1.0 - sorted_y)])
    positives_below = np.concatenate([[0.0], np.cumsum(sorted_y)])
    right = negatives_below + (positives_below[-1] - positives_below)
    bounds = np.concatenate([[0.0], sorted_p, [1.0]])
    lower, upper = bounds[:-1], bounds[1:]  # cut i lies between lower[i] and upper[i]
    cut = upper > lower  # not inside a run of equal values
    best = np.flatnonzero(cut & (right == right[cut].max()))
    thresholds = (lower[best] + upper[best]) / 2
    # Between two adjacent floats the midpoint rounds to one of them; at the upper one "p > t" would judge
    # the facts there false. The lower one cuts the same way.
    thresholds = np.where(thresholds < upper[best], thresholds, lower[best])
    pick = np.lexsort((thresholds, np.abs(thresholds - 0.5)))[0]
    return float(thresholds[pick]), float(right[best[pick]] / len(p))


@dataclass
class Thresholds:
    """Per-relation thresholds, with a global one for relations that have none."""

    fallback: float
    """Chosen on every validation fact together."""
    by_relation: dict[int, float]
    """Relation id -> threshold chosen on that relation's validation facts."""

    def of(self, relations: np.ndarray) -> np.ndarray:
        """The threshold of each fact's relation [N]."""
        top = max(int(relations.max(initial=-1)), max(self.by_relation, default=-1)) + 1
        table = np.full(top, self.fallback)
        table[list(self.by_relation)] = list(self.by_relation.values())
        return table[relations]

    def judge(self, p: np.ndarray, relations: np.ndarray) -> np.ndarray:
        """True where ``p`` is above its relation's threshold."""
        return p > self.of(relations)


def choose_thresholds(p: np.ndarray, labels: np.ndarray, relations: np.ndarray) -> Thresholds:
    """The accuracy-maximising threshold (``best_threshold``) of each relation with true and false facts in
    (``p``, ``labels``, ``relations``), and of all of them together as the fallback. A relation whose
    validation facts are all true (or all false: verified negatives need not cover every relation) says
    nothing about where its false facts start, and is judged at the fallback."""
    fallback, _ = best_threshold(p, labels)
    order = np.argsort(relations, kind="stable")
    ids, starts = np.unique(relations[order], return_index=True)
    by_relation = {
        int(r): best_threshold(p[rows], labels[rows])[0]
        for r, rows in zip(ids, np.split(order, starts[1:]), strict=True)
        if 0 < labels[rows].sum() < len(rows)
    }
    return Thresholds(fallback, by_relation)


def binary_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, and precision, recall and F1 of the true class (0 where undefined)."""
    truth = np.asarray(labels).astype(bool)
    tp = int((predicted & truth).sum())
    fp, fn = int((predicted & ~truth).sum()), int((~predicted & truth).sum())
    return {
        "accuracy": float((predicted == truth).mean()),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
    }


FoldProbabilities = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(mask [N] of the validation facts a fold leaves in) -> the probabilities of those facts to choose
thresholds on, and of the facts left out to judge."""


def held_out_accuracy(probabilities: FoldProbabilities, valid: LabelledFacts, seed: int, folds: int = FOLDS) -> float:
    """The accuracy of per-relation thresholds on validation facts they were not chosen on: over a seeded
    split of ``valid`` into ``folds``, each fold judged by the thresholds chosen on the others. What ``auto``
    chooses by: on a small graph a relation has a handful of validation facts, and thresholds judged on the
    facts they were chosen on look right far more often than they are on test (nations: 0.85-0.91 on
    validation for 0.74-0.82 on test), the more so the more freely a measure separates them."""
    fold = fold_assignment(len(valid.labels), seed, folds)
    right = 0
    for k in range(folds):
        inside = fold != k
        if inside.all():
            continue
        p_in, p_out = probabilities(inside)
        thresholds = choose_thresholds(p_in, valid.labels[inside], valid.relations[inside])
        judged = thresholds.judge(p_out, valid.relations[~inside])
        right += int((judged == valid.labels[~inside].astype(bool)).sum())
    return right / len(valid.labels)


def fixed_folds(p: np.ndarray) -> FoldProbabilities:
    """``held_out_accuracy``'s probabilities of a measure that is not fitted: ``p`` [N] split by the fold."""
    return lambda inside: (p[inside], p[~inside])


def combined_folds(model: KGModel, valid: LabelledFacts, scored: dict[str, np.ndarray], seed: int) -> FoldProbabilities:
    """``held_out_accuracy``'s probabilities of the combined measure: fitted on the facts a fold leaves
    in, whose own probabilities (to choose thresholds on) are out of fold within them."""
    from trainer import calibration

    x, fit = combined_scores(model, valid.facts, scored, "valid"), stack_fitter(model.num_relations)

    def probabilities(inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x_in, y_in, r_in = x[inside], valid.labels[inside], valid.relations[inside]
        fitted = fit(x_in, y_in, r_in)
        own = calibration.out_of_fold(fit, x_in, y_in, r_in, seed)
        return own, fitted.probability(x[~inside], valid.relations[~inside])

    return probabilities


@torch.no_grad()
def classify(
    run: Run, *, seed: int, calibrated: Mapping[str, CalibratedProbability] | None = None, measure: str = AUTO
) -> dict:
    """Thresholds chosen on validation, accuracy and F1 on test, by ``measure`` (``auto``: of
    ``available_measures``, the one more accurate on validation facts its thresholds were not chosen on);
    with ``calibrated``, also accuracy and F1 of the chosen measure's calibrated probabilities (else
    magnitude's) on test at 0.5; the combined measure's own probability is judged at 0.5 whatever
    ``calibrated`` holds."""
    data, model = run.dataset, run.model
    valid, test = labelled_facts(data, "valid", seed), labelled_facts(data, "test", seed)
    available = available_measures(model, len(valid.facts) + len(test.facts), len(valid.facts))
    if measure != AUTO and measure not in available:
        why = {"likelihood": " (likelihood: a 1-vs-all model's, within uncertainty.LIKELIHOOD_MAX_PAIRS "
                             "fact-entity pairs)",
               COMBINED: f" (combined: a model with reciprocal relations, {COMBINED_MIN_FACTS} validation facts "
                         "or more)"}  # fmt: skip
        raise ValueError(f"--measure {measure!r}: this run offers {', '.join((AUTO, *available))}"
                         f"{why.get(measure, '')}")  # fmt: skip
    judging = available if measure == AUTO else (measure,)
    # The single measures' scores, each computed once: the combined measure stacks them.
    scored: dict[str, dict[str, np.ndarray]] = {"valid": {}, "test": {}}
    for name in (m for m in available if m != COMBINED and (m in judging or COMBINED in judging)):
        for split_name, split in (("valid", valid), ("test", test)):
            scored[split_name][name] = check_finite(measure_scores(model, split.facts, name), name, split_name)
    test_scores = scored["test"]
    judged, held_out = {}, {}
    for name in judging:
        if name == COMBINED:
            valid_p, test_p = combined_probabilities(model, valid, test, scored, seed)
            held_out[name] = held_out_accuracy(combined_folds(model, valid, scored["valid"], seed), valid, seed)
        else:
            valid_p = measure_probabilities(scored["valid"][name], name)
            test_p = measure_probabilities(test_scores[name], name)
            held_out[name] = held_out_accuracy(fixed_folds(valid_p), valid, seed)
        thresholds = choose_thresholds(valid_p, valid.labels, valid.relations)
        judged[name] = (thresholds, test_p, binary_metrics(thresholds.judge(valid_p, valid.relations), valid.labels),
                        binary_metrics(thresholds.judge(test_p, test.relations), test.labels))  # fmt: skip
    chosen = max(judged, key=lambda name: held_out[name])  # the earlier on a tie
    thresholds, test_p, valid_metrics, test_metrics = judged[chosen]
    names = data.names("relations")["name"].to_pylist()
    own = np.isin(test.relations, list(thresholds.by_relation))
    each = {name: {"valid_accuracy": v["accuracy"], "valid_accuracy_held_out": held_out[name],
                   "test_accuracy": t["accuracy"], "test_f1": t["f1"]}
            for name, (*_, v, t) in judged.items()}  # fmt: skip
    result = {
        "seed": seed,
        "measure": chosen,
        "probability": MEASURES[chosen],
        "measures": each,
        "valid": {
            **valid.counts(),
            **({"dropped_negatives": data.dropped_negatives["valid"]} if "valid" in data.dropped_negatives else {}),
            **valid_metrics,
        },
        "thresholds": {
            "global": thresholds.fallback,
            "num_per_relation": len(thresholds.by_relation),
            "num_relations": data.num_relations,
            "per_relation": {names[r]: t for r, t in sorted(thresholds.by_relation.items())},
        },
        "test": {
            **test.counts(),
            **({"dropped_negatives": data.dropped_negatives["test"]} if "test" in data.dropped_negatives else {}),
            **test_metrics,
            "facts_at_global_threshold": int((~own).sum()),
            "global_threshold_only": binary_metrics(test_p > thresholds.fallback, test.labels),
        },
    }
    if chosen == COMBINED:  # its probability is fitted on validation: judged at 0.5 as it is
        result["calibrated"] = {"measure": COMBINED, "threshold": CALIBRATED_THRESHOLD,
                                **binary_metrics(test_p > CALIBRATED_THRESHOLD, test.labels)}  # fmt: skip
        return result
    calibrated_by = chosen if calibrated and chosen in calibrated else "magnitude"
    if calibrated and calibrated_by in calibrated:
        if calibrated_by not in test_scores:  # judged by the likelihood, calibrated by magnitude's
            test_scores[calibrated_by] = measure_scores(model, test.facts, calibrated_by)
        probabilities = np.asarray(calibrated[calibrated_by](test_scores[calibrated_by], test.relations))
        result["calibrated"] = {
            "measure": calibrated_by,
            "threshold": CALIBRATED_THRESHOLD,
            **binary_metrics(probabilities > CALIBRATED_THRESHOLD, test.labels),
        }
    return result


def write_classification(run: Run, out: Path, *, seed: int, measure: str = AUTO) -> dict:
    """``classify`` the run, with its stored calibration when there is one, and write the result to
    ``out`` (atomically); returns it."""
    calibrated, description = stored_calibration(run)
    result = classify(run, seed=seed, calibrated=calibrated, measure=measure)
    if result["measure"] == COMBINED:
        description = "combined: its own Platt scaling per relation, fitted on validation (calibration.json unused)"
    result["calibration"] = description
    atomic_write_json(out, result)
    return result


def format_classification(result: dict) -> str:
    valid, test, thresholds = result["valid"], result["test"], result["thresholds"]
    others = ", ".join(f"{name} {m['valid_accuracy_held_out']:.4f}" for name, m in result["measures"].items())
    lines = [
        f"measure: {result['measure']}, {result['probability']} (seed {result['seed']}; accuracy on validation "
        f"folds the thresholds were not chosen on: {others})",
        f"valid: {valid['positives']:,} facts, {valid['negatives']:,} negatives ({valid['negative_source']}); "
        f"thresholds for {thresholds['num_per_relation']:,} of {thresholds['num_relations']:,} relations, "
        f"global {thresholds['global']:.4f}; valid accuracy {valid['accuracy']:.4f}",
        f"test: {test['positives']:,} facts, {test['negatives']:,} negatives ({test['negative_source']}); "
        f"{test['facts_at_global_threshold']:,} judged at the global threshold",
        f"  per-relation thresholds: accuracy {test['accuracy']:.4f}  F1 {test['f1']:.4f}",
        f"  global threshold only:   accuracy {test['global_threshold_only']['accuracy']:.4f}  "
        f"F1 {test['global_threshold_only']['f1']:.4f}",
    ]
    if "calibrated" in result:
        calibrated = result["calibrated"]
        lines.append(f"  calibrated, at {calibrated['threshold']}:   accuracy {calibrated['accuracy']:.4f}  "
                     f"F1 {calibrated['f1']:.4f}  ({calibrated['measure']})")  # fmt: skip
    if "calibration" in result:
        lines.append(f"calibration: {result['calibration']}")
    return "\n".join(lines)
