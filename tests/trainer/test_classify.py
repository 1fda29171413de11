import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.dataset import open_dataset
from tests.trainer.conftest import make_config
from trainer import calibration, uncertainty
from trainer import classify as classification
from trainer.classify import (
    FOLDS,
    LabelledFacts,
    Thresholds,
    best_threshold,
    binary_metrics,
    choose_thresholds,
    classify,
    held_out_accuracy,
    labelled_facts,
    measure_scores,
    write_classification,
)
from trainer.loop import train
from trainer.report import analyse
from trainer.runs import load_run

ROOT = Path(__file__).parents[2]


def test_best_threshold_is_the_accuracy_maximising_midpoint():
    p = np.array([0.1, 0.3, 0.35, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1])
    # Right, cut by cut from "all true": 3, 4, 5 (wrong on 0.6), 4, 5 (wrong on 0.35), 4, 3. The two
    # best, 0.2 and 0.65, tie at 5 of 6: the one nearer 0.5 is chosen.
    assert best_threshold(p, labels) == (pytest.approx(0.65), pytest.approx(5 / 6))
    assert best_threshold(p[1:], labels[1:]) == (pytest.approx(0.65), pytest.approx(4 / 5))
    # All true: any threshold below the lowest is right; the one chosen is the midpoint with 0.
    assert best_threshold(np.array([0.8, 0.9]), np.array([1, 1])) == (pytest.approx(0.4), 1.0)
    # Equal values are never split; equally accurate thresholds go to the one nearest 0.5.
    assert best_threshold(np.array([0.2, 0.2, 0.9]), np.array([1, 0, 1]))[0] == pytest.approx(0.55)
    # Adjacent floats: their midpoint rounds to the upper one, where "p > t" would judge that fact false.
    below_one = np.nextafter(1.0, 0.0)
    t, accuracy = best_threshold(np.array([below_one, 1.0]), np.array([0, 1]))
    assert accuracy == 1.0 and below_one <= t < 1.0
    assert ((np.array([below_one, 1.0]) > t) == [False, True]).all()


def test_per_relation_thresholds_are_chosen_on_each_relation_with_a_global_fallback():
    p = np.array([0.2, 0.4, 0.6, 0.8, 0.1, 0.3, 0.5, 0.7])
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    relations = np.array([0, 0, 0, 0, 3, 3, 3, 3])
    thresholds = choose_thresholds(p, labels, relations)
    # Relation 0 splits between 0.4 and 0.6, relation 3 between 0.1 and 0.3: each is right 4 of 4.
    assert thresholds.by_relation == {0: pytest.approx(0.5), 3: pytest.approx(0.2)}
    # One threshold for all is right at most 7 of 8: at 0.25 (wrong on 0.4) or at 0.45 (wrong on 0.3),
    # the one nearer 0.5.
    assert thresholds.fallback == pytest.approx(0.45)
    assert thresholds.judge(p, relations).tolist() == labels.astype(bool).tolist()
    # A relation without validation facts (1) is judged at the fallback.
    assert thresholds.of(np.array([1, 0, 3])).tolist() == pytest.approx([0.45, 0.5, 0.2])
    assert Thresholds(0.5, {}).judge(np.array([0.4, 0.6]), np.array([2, 2])).tolist() == [False, True]
    # A relation with one class in validation (5: only true facts; 6: only false) takes the fallback too.
    one_class = choose_thresholds(np.append(p, [0.9, 0.35, 0.2]), np.append(labels, [1, 1, 0]),
                                  np.append(relations, [5, 5, 6]))  # fmt: skip
    assert set(one_class.by_relation) == {0, 3}


def test_binary_metrics_hand_values():
    predicted = np.array([True, True, False, False, True])
    labels = np.array([1, 0, 1, 0, 1])
    metrics = binary_metrics(predicted, labels)
    assert metrics == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})


def _planted(directory: Path, negatives: bool) -> Path:
    """40 entities in 4 groups of 10; (h, r, t) is true iff h and t share a group, for 2 relations. Train,
    valid and test are disjoint samples of the true facts; the negatives files hold cross-group facts."""
    rng = np.random.default_rng(0)
    group = np.arange(40) // 10
    true = [(h, r, t) for r in range(2) for h in range(40) for t in range(40) if group[h] == group[t]]
    true = [true[i] for i in rng.permutation(len(true))]
    false = [(h, r, t) for r in range(2) for h in range(40) for t in range(40) if group[h] != group[t]]
    false = [false[i] for i in rng.permutation(len(false))[:200]]

    def write(name: str, facts: list) -> None:
        (directory / f"{name}.txt").write_text("".join(f"e{h}\tr{r}\te{t}\n" for h, r, t in facts))

    directory.mkdir()
    write("train", true[:600])
    write("valid", true[600:700])
    write("test", true[700:800])
    if negatives:
        write("valid_negatives", false[:100])
        write("test_negatives", false[100:])
    return directory


@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory) -> dict[bool, Path]:
    """One short run on the planted graph with its negatives files, one without (same training facts)."""
    root = tmp_path_factory.mktemp("planted")
    runs = {}
    for negatives in (True, False):
        dataset = _planted(root / f"data-{negatives}", negatives)
        config = make_config(f"data.dataset={dataset}", f"data.cache_dir={root / 'cache'}", "model.dim=8",
                             "model.scorer=distmult", "train.epochs=15", "train.batch_size=128",
                             "optim.lr=0.05")  # fmt: skip
        runs[negatives] = root / f"run-{negatives}"
        train(config, runs[negatives])
    return runs


def test_classify_with_verified_negatives(planted_runs):
    run = load_run(planted_runs[True])
    result = classify(run, seed=0)
    assert result["valid"]["negative_source"] == "verified negatives from valid_negatives.txt"
    assert result["test"]["negative_source"] == "verified negatives from test_negatives.txt"
    assert (result["test"]["positives"], result["test"]["negatives"]) == (100, 100)
    assert result["test"]["accuracy"] > 0.8 and result["test"]["f1"] > 0.8
    assert result["thresholds"]["num_per_relation"] == 2 and set(result["thresholds"]["per_relation"]) == {"r0", "r1"}
    assert result["test"]["facts_at_global_threshold"] == 0
    # The report judges the same verified negatives and says so.
    report = analyse(run, samples=2, seed=0)
    assert report["facts"]["negative_source"] == "verified negatives from test_negatives.txt"
    assert report["facts"]["negatives"] == 100


def test_classify_samples_negatives_without_files_and_writes_json_from_the_cli(planted_runs):
    run_dir = planted_runs[False]
    done = subprocess.run([sys.executable, "-m", "trainer", "classify", str(run_dir), "--seed", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((run_dir / "classification.json").read_text())
    assert result["seed"] == 3 and "sampled" in done.stdout
    assert f"measure: {result['measure']}, " in done.stdout
    assert set(result["measures"]) == {"magnitude", "likelihood", "combined"}
    assert result["valid"]["negative_source"] == result["test"]["negative_source"] == "sampled"
    assert result["test"]["positives"] == result["test"]["negatives"] == 100
    # Every same-group fact is in train, valid or test: sampled corruptions are cross-group facts too.
    assert result["test"]["accuracy"] > 0.8
    # Sampled negatives are those the report judges with the same seed.
    run = load_run(run_dir)
    report = analyse(run, samples=2, seed=3)
    assert report["facts"]["negative_source"] == "sampled"


def test_calibrated_probabilities_are_judged_at_one_half(planted_runs, monkeypatch):
    run = load_run(planted_runs[True])
    test = labelled_facts(run.dataset, "test", 0)
    scores = measure_scores(run.model, test.facts, "magnitude")
    cut = float(np.quantile(scores, 0.3))
    # A calibrator is handed each test fact's score under the measure and its relation.
    seen = {}

    def step(s, relations):
        seen["scores"], seen["relations"] = s, relations
        return (s > cut).astype(np.float64)

    result = classify(run, seed=0, calibrated={"magnitude": step}, measure="magnitude")
    np.testing.assert_array_equal(seen["scores"], scores)
    np.testing.assert_array_equal(seen["relations"], test.relations)
    expected = binary_metrics(scores > cut, test.labels)
    assert result["calibrated"] == {"measure": "magnitude", "threshold": 0.5, **expected}
    assert expected["accuracy"] != result["test"]["accuracy"] or expected["f1"] != result["test"]["f1"]
    # The chosen measure's calibrated probability when there is one, from the likelihood's own scores,
    # computed once per split (valid, test): the calibrator is handed the test ones the thresholds judged.
    likelihood = measure_scores(run.model, test.facts, "likelihood")
    computed = []
    scored = uncertainty.fact_log_likelihood
    monkeypatch.setattr(uncertainty, "fact_log_likelihood", lambda *a, **k: computed.append(1) or scored(*a, **k))

    def chance(s, relations):
        seen["scores"] = s
        return np.full(len(s), 0.25)

    result = classify(run, seed=0, calibrated={"magnitude": step, "likelihood": chance}, measure="likelihood")
    assert result["calibrated"]["measure"] == "likelihood" and result["calibrated"]["accuracy"] == 0.5
    np.testing.assert_array_equal(seen["scores"], likelihood)
    assert len(computed) == 2
    # Judged by the likelihood with only magnitude's calibrator: magnitude's scores, not the likelihood's.
    seen.clear()
    result = classify(run, seed=0, calibrated={"magnitude": step}, measure="likelihood")
    assert result["calibrated"]["measure"] == "magnitude"
    np.testing.assert_array_equal(seen["scores"], scores)


def test_auto_judges_by_the_measure_more_accurate_on_held_out_validation_facts(planted_runs, monkeypatch):
    run = load_run(planted_runs[True])
    each = {measure: classify(run, seed=0, measure=measure) for measure in ("magnitude", "likelihood")}
    assert each["magnitude"]["probability"].startswith("sigmoid(score")
    # Thresholded is the geometric mean of the two answers' probabilities.
    test = labelled_facts(run.dataset, "test", 0)
    likelihood = np.exp(uncertainty.fact_log_likelihood(run.model, test.facts))
    valid = labelled_facts(run.dataset, "valid", 0)
    valid_p = np.exp(uncertainty.fact_log_likelihood(run.model, valid.facts))
    judged = choose_thresholds(valid_p, valid.labels, valid.relations).judge(likelihood, test.relations)
    expected = binary_metrics(judged, test.labels)
    assert {k: each["likelihood"]["test"][k] for k in expected} == expected
    each["combined"] = classify(run, seed=0, measure="combined")
    auto = classify(run, seed=0)
    held_out = {m: r["measures"][m]["valid_accuracy_held_out"] for m, r in each.items()}
    best = max(held_out, key=held_out.__getitem__)  # magnitude, likelihood, combined: the earlier wins a tie
    assert auto["measure"] == best and auto["test"] == each[best]["test"]
    assert auto["measures"] == {m: {"valid_accuracy": r["valid"]["accuracy"], "valid_accuracy_held_out": held_out[m],
                                    "test_accuracy": r["test"]["accuracy"], "test_f1": r["test"]["f1"]}
                                for m, r in each.items()}  # fmt: skip
    # The likelihood's held-out accuracy: each fold judged by the thresholds chosen on the other four.
    fold = np.random.default_rng(0).permutation(len(valid.labels)) % FOLDS
    right = 0
    for k in range(FOLDS):
        inside = fold != k
        chosen = choose_thresholds(valid_p[inside], valid.labels[inside], valid.relations[inside])
        right += int((chosen.judge(valid_p[~inside], valid.relations[~inside]) == (valid.labels[~inside] == 1)).sum())
    assert held_out["likelihood"] == right / len(valid.labels)
    # Chosen by the held-out accuracy, whatever the accuracy on the facts the thresholds were chosen on.
    for preset, expected in (((0.9, 0.5, 0.5), "magnitude"), ((0.5, 0.9, 0.5), "likelihood"),
                             ((0.5, 0.5, 0.9), "combined")):  # fmt: skip
        values = iter(preset)  # asked in the order of the measures
        monkeypatch.setattr(classification, "held_out_accuracy", lambda *_, values=values, **__: next(values))
        assert classify(run, seed=0)["measure"] == expected
    with pytest.raises(ValueError, match="--measure 'entropy'"):
        classify(run, seed=0, measure="entropy")


def test_thresholds_fitted_to_noise_look_accurate_on_their_own_facts_and_not_on_held_out_ones():
    rng = np.random.default_rng(4)
    n = 2000
    relations = rng.integers(0, 200, n)  # 10 facts a relation: thresholds that fit them fit noise
    labels = rng.integers(0, 2, n).astype(np.float64)
    p = rng.random(n)  # says nothing about the labels
    valid = LabelledFacts(torch.zeros(n, 3, dtype=torch.long), labels, "sampled")
    valid.facts[:, 1] = torch.from_numpy(relations)
    in_sample = choose_thresholds(p, labels, relations).judge(p, relations)
    assert binary_metrics(in_sample, labels)["accuracy"] > 0.65
    assert abs(held_out_accuracy(lambda inside: (p[inside], p[~inside]), valid, seed=0) - 0.5) < 0.05
    # A probability that tells the labels apart keeps its accuracy on held-out facts.
    informative = np.where(labels == 1, 0.5 + 0.5 * p, 0.5 * p)
    assert held_out_accuracy(lambda inside: (informative[inside], informative[~inside]), valid, seed=0) > 0.9


def test_the_combined_measure_stacks_magnitude_both_ways_and_the_likelihood_fitted_on_validation(planted_runs):
    run = load_run(planted_runs[True])
    result = classify(run, seed=0, measure="combined")
    valid, test = labelled_facts(run.dataset, "valid", 0), labelled_facts(run.dataset, "test", 0)

    def stacked(facts: torch.Tensor) -> np.ndarray:
        scores = uncertainty.fact_scores(run.model, facts, 0, 0, likelihood=True)
        reverse = uncertainty.fact_scores(run.model, facts, 0, 0, missing="head").magnitude
        assert scores.likelihood is not None
        return np.stack([scores.magnitude, reverse, scores.likelihood], 1).astype(np.float64)

    valid_x, test_x = stacked(valid.facts), stacked(test.facts)
    assert not np.allclose(valid_x[:, 0], valid_x[:, 1])  # DistMult is symmetric, but not (o, r^-1, s)

    def fit(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> calibration.StackedPlatt:
        return calibration.StackedPlatt.fit(x, y, r, run.dataset.num_relations)

    # Thresholds on out-of-fold validation probabilities, judged on the fit on every validation fact.
    valid_p = calibration.out_of_fold(fit, valid_x, valid.labels, valid.relations, 0)
    test_p = fit(valid_x, valid.labels, valid.relations).probability(test_x, test.relations)
    thresholds = choose_thresholds(valid_p, valid.labels, valid.relations)
    expected = binary_metrics(thresholds.judge(test_p, test.relations), test.labels)
    assert {k: result["test"][k] for k in expected} == expected
    assert result["thresholds"]["global"] == thresholds.fallback
    # Its probability is fitted on validation: judged at 0.5 as it is, with no calibration.json.
    assert result["calibrated"] == {"measure": "combined", "threshold": 0.5,
                                    **binary_metrics(test_p > 0.5, test.labels)}  # fmt: skip
    assert result["test"]["accuracy"] > 0.8


def test_the_combined_measure_s_held_out_accuracy_is_on_facts_its_fit_did_not_see(planted_runs, monkeypatch):
    run = load_run(planted_runs[True])
    valid = labelled_facts(run.dataset, "valid", 0)
    rng = np.random.default_rng(5)
    # Scores that say nothing about the labels: a fit that saw the fold it is judged on would look right.
    noise = {"magnitude": rng.normal(size=len(valid.labels)), "likelihood": rng.normal(size=len(valid.labels)),
             classification.REVERSED: rng.normal(size=len(valid.labels))}  # fmt: skip
    # Every probability comes from a fit that did not see the fact (the noise tells the facts apart).
    fit, judged_by = calibration.StackedPlatt.fit, []

    def spy(x, *args, **kwargs):
        fitted = fit(x, *args, **kwargs)
        seen, probability = set(x[:, 0].tolist()), fitted.probability

        def judge(scores, relations):
            judged_by.append(seen & set(scores[:, 0].tolist()))
            return probability(scores, relations)

        fitted.probability = judge
        return fitted

    monkeypatch.setattr(calibration.StackedPlatt, "fit", spy)
    folds = classification.combined_folds(run.model, valid, noise, seed=0)
    assert abs(held_out_accuracy(folds, valid, seed=0) - 0.5) < 0.1
    assert len(judged_by) == 5 * 6 and not any(judged_by)  # per fold 5 fits within it, and the fold's own
    # Given its labels as a score, it is right.
    told = {**noise, "likelihood": valid.labels * 4.0 - 2.0}
    assert held_out_accuracy(classification.combined_folds(run.model, valid, told, seed=0), valid, seed=0) == 1.0


def test_without_the_likelihood_the_combined_measure_stacks_magnitude_both_ways(planted_runs, monkeypatch):
    run = load_run(planted_runs[True])
    monkeypatch.setattr(uncertainty, "LIKELIHOOD_MAX_PAIRS", 10)  # a graph too large to score every entity
    result = classify(run, seed=0)
    assert list(result["measures"]) == ["magnitude", "combined"]
    combined = classify(run, seed=0, measure="combined")
    valid, test = labelled_facts(run.dataset, "valid", 0), labelled_facts(run.dataset, "test", 0)

    def both_ways(facts: torch.Tensor) -> np.ndarray:
        return np.stack([measure_scores(run.model, facts, "magnitude"),
                         uncertainty.fact_scores(run.model, facts, 0, 0, missing="head").magnitude], 1)  # fmt: skip

    def fit(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> calibration.StackedPlatt:
        return calibration.StackedPlatt.fit(x, y, r, run.dataset.num_relations)

    valid_p = calibration.out_of_fold(fit, both_ways(valid.facts), valid.labels, valid.relations, 0)
    test_p = fit(both_ways(valid.facts), valid.labels, valid.relations).probability(both_ways(test.facts),
                                                                                     test.relations)  # fmt: skip
    judged = choose_thresholds(valid_p, valid.labels, valid.relations).judge(test_p, test.relations)
    assert combined["test"]["accuracy"] == binary_metrics(judged, test.labels)["accuracy"]


def test_a_validation_split_too_small_to_fold_is_not_judged_by_the_combined_measure(planted_runs, monkeypatch):
    run = load_run(planted_runs[True])
    facts = labelled_facts
    monkeypatch.setattr(classification, "labelled_facts", lambda data, split, seed: facts(data, split, seed, 9))
    result = classify(run, seed=0)  # 9 validation facts and 9 negatives, fewer than 4 x 5
    assert list(result["measures"]) == ["magnitude", "likelihood"]
    with pytest.raises(ValueError, match=r"combined: a model with reciprocal relations, 20 validation facts"):
        classify(run, seed=0, measure="combined")


def test_a_model_without_reciprocal_relations_is_judged_by_magnitude(tmp_path):
    dataset = _planted(tmp_path / "data", negatives=True)
    config = make_config(f"data.dataset={dataset}", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2",
                         "objective.likelihood=bernoulli", "objective.num_negatives=2")  # fmt: skip
    train(config, tmp_path / "run")
    result = classify(load_run(tmp_path / "run"), seed=0)
    assert result["measure"] == "magnitude" and list(result["measures"]) == ["magnitude"]
    with pytest.raises(ValueError, match=r"this run offers auto, magnitude \(likelihood: a 1-vs-all"):
        classify(load_run(tmp_path / "run"), seed=0, measure="likelihood")


def test_dataset_negatives_are_none_without_files(tmp_path):
    data = open_dataset(_planted(tmp_path / "g", negatives=False), cache_dir=tmp_path / "cache")
    assert data.negatives("valid") is None and data.negatives("test") is None
    with pytest.raises(ValueError, match="expected valid or test"):
        data.negatives("train")


def test_a_stored_calibration_is_reported_at_one_half(planted_runs, tmp_path):
    from trainer.calibration import calibrate

    run = load_run(planted_runs[True])
    calibrate(run, method="platt", seed=0, samples=2)
    result = write_classification(run, tmp_path / "classification.json", seed=0)
    assert result["calibration"].startswith("calibrated on validation (platt")
    assert result["calibrated"]["threshold"] == 0.5 and result["calibrated"]["accuracy"] > 0.8
    assert json.loads((tmp_path / "classification.json").read_text()) == result


def test_classify_counts_the_verified_negatives_it_could_not_score_on_both_splits(tmp_path):
    dataset = _planted(tmp_path / "data", negatives=True)
    with (dataset / "valid_negatives.txt").open("a") as handle:
        handle.write("unseen\tr0\te1\n")
    with (dataset / "test_negatives.txt").open("a") as handle:
        handle.write("e1\tr9\te2\ne1\tr0\tunseen\n")
    config = make_config(f"data.dataset={dataset}", f"data.cache_dir={tmp_path / 'cache'}", "model.dim=4",
                         "model.scorer=distmult", "train.epochs=1", "train.batch_size=256")  # fmt: skip
    train(config, tmp_path / "run")
    result = classify(load_run(tmp_path / "run"), seed=0, measure="magnitude")
    assert (result["valid"]["dropped_negatives"], result["test"]["dropped_negatives"]) == (1, 2)
    assert (result["valid"]["negatives"], result["test"]["negatives"]) == (100, 100)


def test_negatives_given_to_calibration_that_are_known_true_facts_are_refused_naming_the_first(planted_runs):
    run = load_run(planted_runs[False])
    known = run.dataset.train[:3]
    entities, relations = run.dataset.names("entities")["name"], run.dataset.names("relations")["name"]
    h, r, t = known[0].tolist()
    first = repr(f"{entities[h].as_py()}\t{relations[r].as_py()}\t{entities[t].as_py()}")
    unknown = labelled_facts(run.dataset, "valid", 0).facts[100:103]  # sampled: never known
    with pytest.raises(
        ValueError, match=r"negatives: 3 of its 6 negatives are known true facts .*, the first " + re.escape(first)
    ):
        calibration.fit(run, seed=0, samples=2, negatives=torch.cat([unknown, known]), method="platt")
    calibration.fit(run, seed=0, samples=2, negatives=unknown, method="platt")


def test_a_split_larger_than_max_facts_is_judged_on_a_seeded_sample_of_it(planted_runs, monkeypatch):
    import trainer.classify as classify_module

    data = load_run(planted_runs[True]).dataset
    small = labelled_facts(data, "valid", 0, max_facts=30)
    assert small.counts() == {"positives": 30, "negatives": 30, "positives_available": 100,
                              "negative_source": "verified negatives from valid_negatives.txt"}  # fmt: skip
    valid, negatives = {tuple(f) for f in data.valid.tolist()}, {tuple(f) for f in data.negatives("valid").tolist()}
    chosen = [tuple(f) for f in small.facts.tolist()]
    assert set(chosen[:30]) <= valid and set(chosen[30:]) <= negatives and len(set(chosen)) == 60
    assert labelled_facts(data, "valid", 0, max_facts=30).facts.equal(small.facts)  # seeded
    assert not labelled_facts(data, "valid", 1, max_facts=30).facts.equal(small.facts)
    # Within the limit, every fact, and no count of what was available.
    assert "positives_available" not in labelled_facts(data, "valid", 0).counts()
    # Sampled negatives are drawn for the facts kept; classify reports the sample it judged.
    sampled = load_run(planted_runs[False])
    assert labelled_facts(sampled.dataset, "test", 0, max_facts=40).counts()["negatives"] == 40
    monkeypatch.setattr(classify_module, "MAX_FACTS", 40)
    result = classify(sampled, seed=0, measure="magnitude")
    assert result["valid"]["positives"] == result["test"]["positives"] == 40
    assert result["test"]["positives_available"] == 100
