"""Confidence a user can act on (#16): calibration, triple classification, and whether sampling the
embeddings ranks right answers before the probability's magnitude does.

For every bundled graph (nations, umls, kinships, wn18rr, wn18), V-ComplEx (LIM) and V-DistMult (LIM), seeds
0-2: train (the tuned small-graph configs; wn18rr and wn18: configs/wn18rr-vcomplex-lim.yaml for a fixed
number of epochs instead of its time budget, so the numbers do not depend on the machine's load), then on
each run's best checkpoint:

* calibrate on validation, judged on test (trainer/calibration.py): ECE, Brier score and log loss of
  ``magnitude`` and ``mc_mean`` before -> after the default (``auto``: per measure, the method with the
  lowest out-of-fold ECE on validation; stored as the run's calibration.json) and each method alone (Platt
  per relation then isotonic, Platt per relation, global isotonic regression); target: ECE <= 0.03 after
  calibration; beside it the ECE a calibrated model would show on as many test facts;
* classify (trainer/classify.py): test accuracy with per-relation thresholds, and of the calibrated
  probability judged at 0.5;
* the confidence study: each measure's area under precision against coverage, for the top-1 answers of
  link prediction (``uncertainty.link_confidences``: right or wrong) and for facts
  (``uncertainty.truth_confidences``: true or corrupted).

Which sampling measure to set against ``magnitude`` is chosen per dataset and model on validation (the
largest area difference, mean over seeds), so the test comparison is not a maximum over noisy test
numbers. On test its difference is the mean over seeds, with a 95% percentile bootstrap interval over the
test queries (facts): 1,000 resamples, seeded, each applied to every seed alike (every seed is judged on
the same queries and facts: negatives and draws use EVAL_SEED whatever the training seed). That interval
is of the seed-averaged difference; three seeds are too few to estimate the spread between trainings,
which each seed's own interval (in the JSON) shows instead.

With ``--negatives typed`` each dataset is judged against false facts of the right kind, as a graph that
ships verified false facts (WN11 and FB13 for triple classification, Socher et al., 2013) has them: a copy
of the dataset under bench/results/runs/ gets ``valid_negatives.txt`` and ``test_negatives.txt``, one
corruption of each fact whose new head (tail) is an entity seen as a head (tail) of that relation in train,
never a known fact (``typed_negatives``), and every run reads them through the converter, ``classify`` and
``calibrate`` as a user's files would be read. Uniform corruptions (the default, ``sampled``) are mostly of
the wrong kind and easy to reject; these are what the model has to tell apart by more than type.

``--rejudge`` judges again, without training, a run left under bench/results/runs whose metrics.json holds
the very config this run would train it with and the record of today's training code, libraries, device
and data (trainer/provenance.py: training is deterministic, the same config and record give the same
checkpoint), for a change to what judges a run, not to what trains it; any other run is trained again, and
the header names those judged again.

    make bench-uncertainty                                                    # the full run (see --help)
    python -m bench.uncertainty --datasets wn18rr --rejudge                   # judge the runs left here again
    python -m bench.uncertainty --datasets nations --seeds 0 --samples 10     # a short look
    python -m bench.uncertainty --datasets nations umls kinships --negatives typed

Results go to bench/results/uncertainty.{json,md}, or uncertainty-<datasets>.{json,md} for some datasets
(uncertainty-typed-<datasets> with typed negatives).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, machine, markdown_table, write_results
from sharding.launch import choose_device
from storage.dataset import BUNDLED_DIR, KGDataset, load_data
from trainer import calibration, classify, uncertainty
from trainer.config import RunConfig, load_config, to_dict
from trainer.loop import train
from trainer.provenance import same_training, training_record
from trainer.report import link_answers
from trainer.runs import Run, load_run

CONFIGS = Path(__file__).parents[1] / "configs"
MODELS = {"V-ComplEx (LIM)": ["model.scorer=complex"], "V-DistMult (LIM)": ["model.scorer=distmult"]}
DATASETS = ("nations", "umls", "kinships", "wn18rr", "wn18")
WORDNET = ("wn18rr", "wn18")
"""Trained with the WN18RR config for ``--wn18rr-epochs``: WN18 is WN18RR with the inverse relations kept."""
EVAL_SEED = 0
"""Seed of the negatives and of the draws of every run: each training seed is judged on the same facts."""
ECE_TARGET = 0.03
SHOWN = ("magnitude", "mc_mean")
"""The calibrated probabilities ``predict`` and ``report`` show, which the ECE target is judged on (the
likelihood's, a measure ``classify`` may judge by, is reported beside them)."""
METRICS = ("ece", "brier", "log_loss")
DEFAULT = calibration.DEFAULT_METHOD
WHEN = tuple(dict.fromkeys(("before", DEFAULT, *calibration.METHODS)))
NEGATIVES = {
    "sampled": "one uniform corruption of each fact, never a known fact",
    "typed": "one corruption of each fact by an entity seen in that role of its relation, never a known fact, "
    "given to every run as the dataset's verified negatives files",
}
WN18RR_EPOCHS = 5
"""About 60 s an epoch on 2 idle cores (the config's 3,300 s budget fitted ~56), so a wn18rr run trains in
~5 minutes plus its evaluations and the study; wn18, with 1.6x the training facts, ~8."""


def config_for(dataset: str, model: str, seed: int, wn18rr_epochs: int, data: str | Path | None = None
               ) -> tuple[Path, list[str]]:  # fmt: skip
    """The run config of ``dataset`` (trained on the directory ``data`` when given: its typed copy)."""
    common = [f"data.dataset={data or dataset}", "train.progress=false", f"train.seed={seed}", *MODELS[model]]
    if dataset in WORDNET:
        fixed = [f"train.epochs={wn18rr_epochs}", "train.time_budget_s=null"]
        return CONFIGS / "wn18rr-vcomplex-lim.yaml", [*common, *fixed]
    return CONFIGS / f"small-{dataset}.yaml", common


def _read_facts(path: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.rstrip("\n").split("\t")) for line in path.read_text().splitlines() if line.strip()]  # type: ignore[misc]


def _typed_corruption(
    fact: tuple[str, str, str], roles: tuple[list[str], list[str]], every: list[str], taken: set, rng: random.Random
) -> tuple[str, ...] | None:
    """One corruption of ``fact`` not in ``taken``: the side by a fair coin, the entity drawn from that
    side's role of the relation (``roles``: its heads, its tails, sorted); after 100 draws, uniformly from
    those left of the role, else of ``every`` entity, then the same on the other side; None when every one
    is taken."""
    head, relation, tail = fact
    first = rng.random() < 0.5  # corrupt the head

    def corrupt(on_head: bool, entity: str) -> tuple[str, ...]:
        return (entity, relation, tail) if on_head else (head, relation, entity)

    kind = roles[0 if first else 1]
    for _ in range(100 if kind else 0):
        drawn = corrupt(first, rng.choice(kind))
        if drawn not in taken:
            return drawn
    for on_head in (first, not first):
        for pool in (roles[0 if on_head else 1], every):
            left = [c for c in (corrupt(on_head, e) for e in pool) if c not in taken]
            if left:
                return rng.choice(left)
    return None


def typed_negatives(source: Path, out: Path, seed: int = EVAL_SEED) -> dict[str, dict[str, int]]:
    """A copy of the dataset directory ``source`` in ``out`` with ``valid_negatives.txt`` and
    ``test_negatives.txt``: for each valid (test) fact, its head or its tail (a fair coin) replaced by an
    entity seen in that role of that relation in train, never a known fact nor one drawn before
    (``_typed_corruption``: on a small graph, such as nations with 14 entities, some facts have none of
    the kind left, and take any entity, or the other side).
    Returns, per split, how many negatives it wrote and how many of them are not of the kind."""
    splits = {name: _read_facts(source / f"{name}.txt") for name in ("train", "valid", "test")}
    known = {fact for facts in splits.values() for fact in facts}
    seen: dict[str, tuple[set[str], set[str]]] = defaultdict(lambda: (set(), set()))
    for head, relation, tail in splits["train"]:
        seen[relation][0].add(head)
        seen[relation][1].add(tail)
    roles = defaultdict(lambda: ([], []), {r: (sorted(heads), sorted(tails)) for r, (heads, tails) in seen.items()})
    every = sorted({e for head, _, tail in splits["train"] for e in (head, tail)})
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "test"):
        shutil.copyfile(source / f"{name}.txt", out / f"{name}.txt")
    counts = {}
    for name in ("valid", "test"):
        negatives, taken, off_kind = [], set[tuple[str, ...]](known), 0
        for head, relation, tail in splits[name]:
            fact = _typed_corruption((head, relation, tail), roles[relation], every, taken, rng)
            if fact is None:
                raise ValueError(f"{source / name}.txt: every corruption of {head} {relation} {tail} is a known fact")
            taken.add(fact)
            negatives.append("\t".join(fact) + "\n")
            replaced_head = fact[0] != head  # the other entity is the fact's own, of whatever kind
            off_kind += fact[0] not in seen[relation][0] if replaced_head else fact[2] not in seen[relation][1]
        (out / f"{name}_negatives.txt").write_text("".join(negatives))
        counts[name] = {"negatives": len(negatives), "not_of_the_kind": off_kind}
    return counts


def calibration_numbers(run: Run, samples: int) -> tuple[dict[str, Any], calibration.Calibration]:
    """Per measure, ECE (with a calibrated model's band) / Brier / log loss on test before and after each
    method: the default (auto) stored with the run, then each of ``calibration.METHODS``; and the default."""
    _, stored = calibration.calibrate(run, seed=EVAL_SEED, samples=samples)
    default = calibration.Calibration.from_dict(stored)
    test = calibration.judged(run, "test", EVAL_SEED)
    scores = calibration.scores_for(default, run.model, test.facts, samples, EVAL_SEED)
    out: dict[str, Any] = {name: {"before": stored["test"][name]["before"], DEFAULT: stored["test"][name]["after"]}
                           for name in stored["test"] if name in calibration.MEASURES}  # fmt: skip
    for method in (m for m in calibration.METHODS if m != DEFAULT):
        fitted = calibration.fit(run, method=method, seed=EVAL_SEED, samples=samples)
        for name, result in calibration.compare(fitted, scores, test, run.model.variational).items():
            out[name][method] = {k: v for k, v in result["after"].items() if k != "bins"}
    for name, methods in calibration.cross_validated(run, seed=EVAL_SEED, samples=samples).items():
        out[name]["valid_cross_validated"] = methods
    return out, default


def study_inputs(run: Run, split: str, samples: int) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """(confidences, right or wrong) of the link-prediction top-1 answers and of the facts of ``split``."""
    answers = link_answers(run, split, samples=samples, seed=EVAL_SEED)
    facts = calibration.judged(run, split, EVAL_SEED)
    scores = uncertainty.fact_scores(run.model, facts.facts, samples, EVAL_SEED)
    return {
        "link": (uncertainty.link_confidences(answers), answers.correct),
        "triples": (uncertainty.truth_confidences(scores), facts.labels),
    }


def _slug(model: str) -> str:
    return model.split()[0].lower()  # V-ComplEx (LIM) -> v-complex


def _length(args: argparse.Namespace) -> str:
    return f"-{args.wn18rr_epochs}epochs" if args.wn18rr_epochs != WN18RR_EPOCHS else ""


def run_name(dataset: str, model: str, seed: int, args: argparse.Namespace) -> str:
    """The directory of one trained run under bench/results/runs: a WN18RR (WN18) run of another length than
    the default's beside the default's, not over it."""
    length = _length(args) if dataset in WORDNET else ""
    kind = "-typed" if args.negatives == "typed" else ""
    return f"uncertainty{kind}-{dataset}-{_slug(model)}{length}-seed{seed}"


def results_name(args: argparse.Namespace) -> str:
    """The results files' name: the negatives, and whatever is not the default (a subset of the datasets or
    the models, another WN18RR length), so a partial run is written beside the full one, not over it."""
    name = "uncertainty" + ("-typed" if args.negatives == "typed" else "")
    name += "" if set(args.datasets) == set(DATASETS) else "-" + "-".join(args.datasets)
    name += "" if set(args.models) == set(MODELS) else "-" + "-".join(map(_slug, args.models))
    return name + (_length(args) if set(WORDNET) & set(args.datasets) else "")


def trained_metrics(config: RunConfig, out: Path, dataset: KGDataset) -> dict[str, Any] | None:
    """The metrics of the finished run in ``out`` when it is the run ``train(config, out, dataset)`` would
    train here, bit for bit (the same config, and the same code, libraries, device and data:
    trainer/provenance.py), else None, saying why the run is trained again."""
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("config") != to_dict(config):
        print(f"{out}: trained with another config; training it again", flush=True)
        return None
    expected = training_record(config, choose_device(config.train.device), dataset, config.sharding.streams or 1)
    if not same_training(metrics.get("code"), expected):
        print(f"{out}: trained by other code, libraries, device or data than today's; training it again", flush=True)
        return None
    return metrics


def one_run(dataset: str, model: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    data, typed = None, None
    if args.negatives == "typed":
        data = RESULTS / "runs" / f"typed-{dataset}"
        typed = typed_negatives(BUNDLED_DIR / dataset, data)
    path, overrides = config_for(dataset, model, seed, args.wn18rr_epochs, data)
    config = load_config(path, overrides)
    out = RESULTS / "runs" / run_name(dataset, model, seed, args)
    start = time.perf_counter()
    graph = load_data(config.data)
    metrics = trained_metrics(config, out, graph) if args.rejudge else None
    rejudged = metrics is not None
    if metrics is None:
        shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume of an earlier benchmark's
        metrics = train(config, out, graph)
    trained = time.perf_counter()
    run = load_run(out)
    calibrated, default = calibration_numbers(run, args.samples)
    probabilities = calibration.calibrated_probabilities(default)
    classified = classify.classify(run, seed=EVAL_SEED, calibrated=probabilities)
    magnitude = classify.classify(run, seed=EVAL_SEED, calibrated=probabilities, measure="magnitude")
    inputs = {split: study_inputs(run, split, args.samples) for split in ("valid", "test")}
    return {
        "seed": seed,
        "test_mrr": metrics["test"]["filtered"]["mrr"],
        "test_hits@1": metrics["test"]["filtered"]["hits@1"],
        "calibration": calibrated,
        "classification": {
            "per_relation_thresholds": classified["test"]["accuracy"],
            "global_threshold": classified["test"]["global_threshold_only"]["accuracy"],
            "calibrated_at_0.5": classified["calibrated"]["accuracy"],
            "magnitude_per_relation_thresholds": magnitude["test"]["accuracy"],
            "magnitude_calibrated_at_0.5": magnitude["calibrated"]["accuracy"],
        },
        "measure": classified["measure"],
        **({"typed_negatives": typed} if typed else {}),
        "inputs": inputs,
        "seconds": {"train": trained - start, "after": time.perf_counter() - trained},
        "rejudged": rejudged,
    }


def compare_measures(runs: list[dict[str, Any]], task: str, resamples: int) -> dict[str, Any]:
    """The sampling measure chosen on validation, and its test area minus magnitude's: mean over seeds with
    a pooled bootstrap interval, and each seed's own."""
    valid = [r["inputs"]["valid"][task] for r in runs]
    test = [r["inputs"]["test"][task] for r in runs]
    measures = list(test[0][0])
    sampling = [m for m in measures if m != "magnitude"]
    coverage = uncertainty.coverage_grid()

    def area(confidence: np.ndarray, correct: np.ndarray) -> float:
        return uncertainty.area(coverage, uncertainty.precision_at_coverage(confidence, correct))

    valid_area = {m: float(np.mean([area(c[m], y) for c, y in valid])) for m in measures}
    test_area = {m: float(np.mean([area(c[m], y) for c, y in test])) for m in measures}
    rate = float(np.mean([y.mean() for _, y in test]))
    out: dict[str, Any] = {"valid_area": valid_area, "test_area": test_area,
                           "top1_accuracy" if task == "link" else "positive_rate": rate}  # fmt: skip
    if not sampling:
        return out
    chosen = max(sampling, key=lambda m: valid_area[m] - valid_area["magnitude"])
    pair = [{"magnitude": c["magnitude"], chosen: c[chosen]} for c, _ in test]
    correct = np.stack([y for _, y in test])
    pooled = uncertainty.area_differences(
        {k: np.stack([p[k] for p in pair]) for k in ("magnitude", chosen)}, correct, resamples=resamples,
        seed=EVAL_SEED,
    )[chosen]  # fmt: skip
    each = [uncertainty.area_differences(p, y, resamples=resamples, seed=EVAL_SEED)[chosen]
            for p, (_, y) in zip(pair, test, strict=True)]  # fmt: skip
    out.update(chosen=chosen, difference=pooled["difference"], interval=pooled["interval"], per_seed=each)
    return out


def summarise(dataset: str, model: str, runs: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    row: dict[str, Any] = {"dataset": dataset, "model": model, "seeds": [r["seed"] for r in runs]}
    row["test_mrr"] = float(np.mean([r["test_mrr"] for r in runs]))
    for measure in runs[0]["calibration"]:
        for when in WHEN:
            for metric in METRICS:
                values = [r["calibration"][measure][when][metric] for r in runs]
                row[f"{metric}_{measure}_{when}"] = float(np.mean(values))
                if metric == "ece" and when != "before":
                    row[f"ece_{measure}_{when}_max"] = float(np.max(values))
        for method in calibration.METHODS:
            values = [r["calibration"][measure]["valid_cross_validated"][method]["ece"] for r in runs]
            row[f"valid_cv_ece_{measure}_{method}"] = float(np.mean(values))
        bands = [r["calibration"][measure][DEFAULT]["ece_if_calibrated"] for r in runs]
        row[f"ece_{measure}_if_calibrated"] = float(np.mean([b["mean"] for b in bands]))
        row[f"ece_{measure}_within_band"] = [
            r["calibration"][measure][DEFAULT]["ece"] <= b["p95"] for r, b in zip(runs, bands, strict=True)
        ]
    for key in runs[0]["classification"]:
        row[f"accuracy_{key}"] = float(np.mean([r["classification"][key] for r in runs]))
    row["classified_by"] = [r["measure"] for r in runs]
    if "typed_negatives" in runs[0]:
        row["typed_negatives"] = runs[0]["typed_negatives"]
    row["link"] = compare_measures(runs, "link", resamples)
    row["triples"] = compare_measures(runs, "triples", resamples)
    row["seconds"] = [r["seconds"] for r in runs]
    row["rejudged"] = [r["rejudged"] for r in runs]
    return row


def rejudged_note(rows: list[dict[str, Any]]) -> str:
    """What the header says of runs judged again (``--rejudge``) rather than trained."""
    runs = [(row, judged) for row in rows for judged in row.get("rejudged", [])]
    if not any(judged for _, judged in runs):
        return ""
    names = sorted({f"{row['dataset']} {row['model']}" for row, judged in runs if judged})
    return (f"{sum(judged for _, judged in runs)} of {len(runs)} runs ({', '.join(names)}) judged again "
            "(--rejudge) from checkpoints an earlier benchmark trained with the same config and training "
            "code. ")  # fmt: skip


def _ece_met(row: dict[str, Any]) -> bool:
    """ECE <= ECE_TARGET on test after the default calibration for every seed and ``SHOWN`` measure."""
    return all(row[f"ece_{m}_{DEFAULT}_max"] <= ECE_TARGET for m in SHOWN if f"ece_{m}_{DEFAULT}_max" in row)


def _within_band(row: dict[str, Any]) -> str:
    """In how many (seed, ``SHOWN`` measure) pairs the default's ECE is below a calibrated model's 95th
    percentile."""
    flags = [flag for m in SHOWN for flag in row.get(f"ece_{m}_within_band", [])]
    return f"{sum(flags)} of {len(flags)}"


def _arrow(row: dict[str, Any], metric: str, measure: str, methods: tuple[str, ...] = (DEFAULT,)) -> str:
    if f"{metric}_{measure}_before" not in row:
        return ""
    after = " / ".join(f"{row[f'{metric}_{measure}_{when}']:.4f}" for when in methods)
    return f"{row[f'{metric}_{measure}_before']:.4f} → {after}"


def _difference(result: dict[str, Any]) -> str:
    if "chosen" not in result:
        return "no sampling measure"
    lo, hi = result["interval"]
    return f"{result['chosen']}: {result['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _typed_lines(rows: list[dict[str, Any]]) -> list[str]:
    """How many typed negatives of each dataset are not of the relation's kind (the fallbacks)."""
    counts = {row["dataset"]: row["typed_negatives"] for row in rows if "typed_negatives" in row}
    if not counts:
        return []
    parts = [", ".join(f"{name} {c['not_of_the_kind']:,} of {c['negatives']:,}" for name, c in splits.items())
             for splits in counts.values()]  # fmt: skip
    listed = "; ".join(f"{dataset}: {part}" for dataset, part in zip(counts, parts, strict=True))
    return [f"Typed negatives not of the relation's kind (no corruption of the kind left): {listed}.\n"]


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    calibration_rows, study_rows = [], []
    for row in rows:
        name = {"dataset": row["dataset"], "model": row["model"]}
        methods = tuple(m for m in WHEN if m != "before")
        calibration_rows.append({
            **name, "test_mrr": row["test_mrr"],
            "valid: cross-validated ECE (magnitude)": " / ".join(
                f"{row[f'valid_cv_ece_magnitude_{m}']:.4f}" for m in calibration.METHODS
            ),
            **{f"ECE {k}": _arrow(row, "ece", k, methods) for k in ("magnitude", "mc_mean", "likelihood")},
            "ECE a calibrated model shows": row["ece_magnitude_if_calibrated"],
            **{f"{m} magnitude": _arrow(row, m, "magnitude") for m in ("brier", "log_loss")},
            f"ECE ≤ {ECE_TARGET} (every seed; magnitude, mc_mean)": "met" if _ece_met(row) else "missed",
            "ECE within a calibrated model's 95%": _within_band(row),
            "accuracy thresholds: magnitude": row["accuracy_magnitude_per_relation_thresholds"],
            "accuracy thresholds: auto (measure per seed)": f"{row['accuracy_per_relation_thresholds']:.4f} "
                                                            f"({', '.join(row['classified_by'])})",
            "accuracy calibrated@0.5: magnitude / auto": f"{row['accuracy_magnitude_calibrated_at_0.5']:.4f} / "
                                                         f"{row['accuracy_calibrated_at_0.5']:.4f}",
        })  # fmt: skip
        study_rows.append({
            **name, "top-1 accuracy": row["link"]["top1_accuracy"],
            "link: magnitude area": row["link"]["test_area"]["magnitude"],
            "link: chosen − magnitude [95%]": _difference(row["link"]),
            "facts: magnitude area": row["triples"]["test_area"]["magnitude"],
            "facts: chosen − magnitude [95%]": _difference(row["triples"]),
        })  # fmt: skip
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    wordnet = [d for d in datasets if d in WORDNET]
    trained = f"{' and '.join(wordnet)} trained {args.wn18rr_epochs} epochs. " if wordnet else ""
    trained += rejudged_note(rows)
    lines = [
        "# Confidence a user can act on: calibration, triple classification, sampling against magnitude\n",
        f"Seeds {args.seeds}, {args.samples} draws of the embeddings, {args.resamples} bootstrap resamples; "
        f"{trained}Means over seeds. Negatives: {NEGATIVES[args.negatives]}\n",
        "## Calibration on test and triple classification\n",
        "Validation: ECE of each method's out-of-fold probabilities (5 folds of the validation facts), "
        "Platt per relation then isotonic / Platt per relation / global isotonic: what the default (auto) "
        "chooses by, without test. Test: ECE before → after the default, then after each method in the same "
        "order; Brier and log "
        'loss before → after the default. "A calibrated model shows": the mean ECE '
        "of labels drawn from the default's own probabilities (magnitude), the ECE a perfectly calibrated "
        'model would show on as many test facts; "within": in how many (seed, measure) pairs the default\'s '
        "ECE is below that band's 95th percentile. Accuracy: per-relation thresholds chosen on validation "
        "by magnitude (sigmoid(score)), and by the measure auto chooses by the accuracy of thresholds on "
        "validation facts they were not chosen on (magnitude; a 1-vs-all model's likelihood of the fact's two "
        "answers; combined, Platt scaling per relation of both and the reciprocal fact's magnitude); the "
        "calibrated probability of either judged at 0.5 (the combined measure's own).\n",
        markdown_table(calibration_rows, list(calibration_rows[0])),
        *_typed_lines(rows),
        "## Area under precision against coverage: magnitude, and the sampling measure chosen on validation\n",
        "Link prediction: the posterior means' top-1 answer of each test query (filtered), right or wrong. "
        "Facts: test facts against as many negatives. Difference: mean over seeds, 95% bootstrap interval over "
        "test queries (facts), resampled alike for every seed.\n",
        markdown_table(study_rows, list(study_rows[0])),
    ]
    for task, label in (("link", "link prediction"), ("triples", "facts")):
        wins = [row for row in rows if "chosen" in row[task] and row[task]["interval"][0] > 0]
        won = sorted({row["dataset"] for row in wins})
        if won:
            pairs = ", ".join(f"{row['dataset']} {row['model']} ({row[task]['chosen']})" for row in wins)
            verdict = (f"For {label}, a sampling-based confidence beats magnitude on {len(won)} of {len(datasets)} "
                       f"datasets with the interval above 0 ({len(wins)} of {len(rows)} dataset-model pairs: "
                       f"{pairs}).")  # fmt: skip
        else:
            verdict = (f"For {label}, a sampling-based confidence does not beat magnitude with the interval above 0 "
                       f"on any of the {len(datasets)} datasets.")  # fmt: skip
        lines.append(verdict + "\n")
    missed = [f"{row['dataset']} {row['model']}" for row in rows if not _ece_met(row)]
    outcome = f"missed by {', '.join(missed)}." if missed else "met for every dataset and model."
    lines.append(f"Target ECE ≤ {ECE_TARGET} after calibration ({DEFAULT}) on test, every seed, of the "
                 f"probabilities predict shows ({', '.join(SHOWN)}): {outcome}\n")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=50, help="draws of the embeddings (calibration, study)")
    parser.add_argument("--wn18rr-epochs", type=int, default=WN18RR_EPOCHS, help="epochs of a wn18rr or wn18 run")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    about = "; ".join(f"{k}: {v}" for k, v in NEGATIVES.items())
    parser.add_argument("--negatives", choices=tuple(NEGATIVES), default="sampled", help=f"judged against: {about}")
    parser.add_argument(
        "--rejudge", action="store_true",
        help="judge the runs an earlier benchmark left under bench/results/runs without training them again, "
        "where their saved config is the one this run would train with (else train)",
    )  # fmt: skip
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        for model in args.models:
            runs = []
            for seed in args.seeds:
                runs.append(one_run(dataset, model, seed, args))
                print(f"{dataset} {model} seed {seed}: test MRR {runs[-1]['test_mrr']:.4f}, "
                      f"{runs[-1]['seconds']}", flush=True)  # fmt: skip
            rows.append(summarise(dataset, model, runs, args.resamples))
    payload = {"machine": machine(), "seeds": args.seeds, "samples": args.samples, "resamples": args.resamples,
               "wn18rr_epochs": args.wn18rr_epochs, "eval_seed": EVAL_SEED, "negatives": args.negatives,
               "rows": rows}  # fmt: skip
    write_results(results_name(args), payload, markdown(rows, args))


if __name__ == "__main__":
    main()
