import inspect
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from tests.trainer.conftest import make_config
from trainer import calibration, classify, uncertainty
from trainer.calibration import Calibration, Isotonic, Platt, PlattIsotonic, StackedPlatt, pava
from trainer.cli import main
from trainer.loop import train
from trainer.report import format_predictions, predict, write_report
from trainer.runs import load_run


def _bernoulli(rng: np.random.Generator, x: np.ndarray, a: float, b: float) -> np.ndarray:
    return (rng.random(len(x)) < 1 / (1 + np.exp(-(a * x + b)))).astype(np.float64)


def test_platt_recovers_the_parameters_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1.5, 50_000)
    fitted = Platt.fit(x, _bernoulli(rng, x, 2.0, -1.0))
    assert fitted.a == pytest.approx(2.0, abs=0.06) and fitted.b == pytest.approx(-1.0, abs=0.06)
    assert fitted.relation_a is None
    # Per relation, with plenty of facts each: each relation's own law.
    r = np.repeat([0, 1], 20_000)
    x2 = rng.normal(0, 1.5, 40_000)
    y2 = np.concatenate([_bernoulli(rng, x2[:20_000], 2.0, -1.0), _bernoulli(rng, x2[20_000:], 0.5, 1.0)])
    per = Platt.fit(x2, y2, r, 2)
    assert per.relation_a is not None and per.relation_b is not None
    np.testing.assert_allclose(per.relation_a, [2.0, 0.5], atol=0.1)
    np.testing.assert_allclose(per.relation_b, [-1.0, 1.0], atol=0.1)


def test_platt_stays_finite_on_separable_data():
    fitted = Platt.fit(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0.0, 0.0, 1.0, 1.0]))
    assert math.isfinite(fitted.a) and 0 < fitted.a < 20  # Platt's targets (N+ + 1)/(N+ + 2), 1/(N- + 2)


def test_shrinkage_pulls_a_rare_relation_to_the_global_fit_and_leaves_a_common_one_its_own():
    rng = np.random.default_rng(1)
    x_common, x_big = rng.normal(0, 1.5, 2000), rng.normal(0, 1.5, 20_000)
    x = np.concatenate([x_big, x_common, [-1.0, 0.0, 1.0]])
    y = np.concatenate([_bernoulli(rng, x_big, 2.0, -1.0), _bernoulli(rng, x_common, 0.5, 1.0), [1.0, 0.0, 1.0]])
    r = np.concatenate([np.zeros(20_000, int), np.ones(2000, int), np.full(3, 2)])
    shrunk, own = Platt.fit(x, y, r, 4), Platt.fit(x, y, r, 4, pseudo_facts=0.0)
    assert shrunk.relation_a is not None and shrunk.relation_b is not None
    assert own.relation_a is not None and own.relation_b is not None
    glob = np.array([shrunk.a, shrunk.b])
    theta = np.stack([shrunk.relation_a, shrunk.relation_b], 1)
    alone = np.stack([own.relation_a, own.relation_b], 1)
    distance = lambda u, v: float(np.linalg.norm(u - v))  # noqa: E731
    assert distance(theta[2], glob) < 0.2 * distance(alone[2], glob)  # 3 facts: near the global fit
    assert distance(theta[1], alone[1]) < 0.05 * distance(alone[1], glob)  # 2,000 facts: near its own
    np.testing.assert_allclose(theta[3], glob)  # no facts: the global fit
    assert shrunk.relation_facts is not None and shrunk.relation_facts.tolist() == [20_000, 2000, 3, 0]


def test_stacked_platt_learns_from_two_scores_what_neither_gives_alone():
    rng = np.random.default_rng(2)
    n = 40_000
    x = np.stack([rng.normal(0, 1.0, n), rng.normal(5.0, 3.0, n)], 1)  # another scale: standardised
    r = rng.integers(0, 2, n)
    offset = np.where(r == 0, 1.0, -1.0)
    y = (rng.random(n) < 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0 * x[:, 1] + 5.0 + offset)))).astype(np.float64)
    stacked = StackedPlatt.fit(x, y, r, 3)
    # Weights of the standardised scores, and each relation's offset on top of them.
    weights = stacked.relation_coefficients[:, :2] / stacked.spread
    np.testing.assert_allclose(weights[:2], [[2.0, -1.0], [2.0, -1.0]], atol=0.12)
    offsets = stacked.relation_coefficients[:, 2] - (stacked.relation_coefficients[:, :2] * stacked.center
                                                     / stacked.spread).sum(1)  # fmt: skip
    np.testing.assert_allclose(offsets[:2], [6.0, 4.0], atol=0.25)
    np.testing.assert_allclose(stacked.relation_coefficients[2], stacked.coefficients)  # no facts: the global fit
    # Both scores together lose less than Platt per relation on either one alone.
    test = np.stack([rng.normal(0, 1.0, n), rng.normal(5.0, 3.0, n)], 1)
    r_test = rng.integers(0, 2, n)
    logit = 2.0 * test[:, 0] - test[:, 1] + 5.0 + np.where(r_test == 0, 1.0, -1.0)
    y_test = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    both = uncertainty.log_loss(stacked.probability(test, r_test), y_test)
    for k in (0, 1):
        alone = Platt.fit(x[:, k], y, r, 3).probability(test[:, k], r_test)
        assert both < uncertainty.log_loss(alone, y_test) - 0.05


def test_stacked_platt_of_one_score_is_platt_per_relation():
    """The same shrinkage: the prior's precision follows the Fisher information, so standardising the score
    moves no fitted probability."""
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 4.0, 3000)
    r = np.concatenate([rng.integers(0, 3, 2990), np.full(10, 4)])  # relation 4: 10 facts, shrunk hard
    y = _bernoulli(rng, x, 0.7, np.asarray([-1.0, 0.0, 1.0, 0.0, 2.0])[r])
    for pseudo_facts in (0.0, 50.0):
        platt = Platt.fit(x, y, r, 5, pseudo_facts)
        stacked = StackedPlatt.fit(x[:, None], y, r, 5, pseudo_facts)
        grid = np.linspace(-10, 10, 41)
        for relation in range(5):
            at = np.full(len(grid), relation)
            np.testing.assert_allclose(stacked.probability(grid[:, None], at), platt.probability(grid, at), atol=1e-7)


def test_pava_and_isotonic_on_hand_cases():
    np.testing.assert_allclose(pava(np.array([1.0, 3, 2, 4, 3, 5]), np.ones(6)), [1, 2.5, 2.5, 3.5, 3.5, 5])
    np.testing.assert_allclose(pava(np.array([3.0, 1.0]), np.array([1.0, 3.0])), [1.5, 1.5])  # weighted mean
    # Labels 0 1 0 1 1 0 at logits 0..5: blocks [0], [1, 0] -> 1/2, [1, 1, 0] -> 2/3; 0 is clipped to 1/12.
    iso = Isotonic.fit(np.arange(6.0), np.array([0.0, 1, 0, 1, 1, 0]))
    np.testing.assert_allclose(iso.x, [0, 1, 2, 3, 5])
    np.testing.assert_allclose(iso.y, [1 / 12, 0.5, 0.5, 2 / 3, 2 / 3])
    np.testing.assert_allclose(iso.probability(np.array([-9.0, 1.5, 2.5, 9.0]), np.zeros(4, int)),
                               [1 / 12, 0.5, 7 / 12, 2 / 3])  # fmt: skip
    tied = Isotonic.fit(np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 1.0]))  # equal logits pooled first
    np.testing.assert_allclose(tied.y, [0.5, 5 / 6])


def test_isotonic_is_monotone():
    rng = np.random.default_rng(2)
    x = rng.normal(size=3000)
    iso = Isotonic.fit(x, _bernoulli(rng, x, 1.5, 0.0))
    grid = np.linspace(-5, 5, 1001)
    p = iso.probability(grid, np.zeros(len(grid), int))
    assert (np.diff(p) >= 0).all() and (np.diff(iso.x) > 0).all()
    assert p[0] < 0.2 and p[-1] > 0.8


def test_platt_isotonic_learns_a_curve_platt_cannot_and_each_relation_s_offset():
    """True probability: a relation's offset plus a step in the score, not a sigmoid of it."""
    rng = np.random.default_rng(4)

    def draw(n):
        x, r = rng.normal(size=n), rng.integers(0, 2, n)
        p = np.where(x + np.where(r == 1, 1.0, -1.0) > 0, 0.95, 0.05)
        return x, r, (rng.random(n) < p).astype(np.float64), p

    x, r, y, _ = draw(4000)
    test_x, test_r, _, truth = draw(4000)
    both = PlattIsotonic.fit(x, y, r, 2)
    p = both.probability(test_x, test_r)
    platt = Platt.fit(x, y, r, 2).probability(test_x, test_r)
    isotonic = Isotonic.fit(x, y).probability(test_x, test_r)
    error = {name: float(np.abs(q - truth).mean()) for name, q in
             (("both", p), ("platt", platt), ("isotonic", isotonic))}  # fmt: skip
    assert error["both"] < 0.5 * min(error["platt"], error["isotonic"]), error
    for relation in (0, 1):  # monotone in the score within a relation
        order = np.argsort(test_x[test_r == relation])
        assert (np.diff(p[test_r == relation][order]) >= -1e-12).all()


def test_ece_a_calibrated_model_shows_matches_its_closed_form():
    # One bin at p = 0.5: ECE = |mean(y) - 0.5|, whose mean for n labels is sqrt(2 / pi) * sqrt(0.25 / n).
    band = uncertainty.ece_if_calibrated(np.full(400, 0.5), draws=4000)
    assert band["mean"] == pytest.approx(math.sqrt(2 / math.pi) * math.sqrt(0.25 / 400), rel=0.05)
    # The 95th percentile of |N(0, sigma)| is 1.96 sigma.
    assert band["p95"] == pytest.approx(1.96 * math.sqrt(0.25 / 400), rel=0.08)
    assert uncertainty.ece_if_calibrated(np.full(400, 1.0))["p95"] == 0.0  # certain and right: no spread
    # Drawn a few draws at a time (bounded memory), the same numbers as all at once.
    p = np.random.default_rng(1).random(3000)
    whole = uncertainty.ece_if_calibrated(p, draws=50, seed=3, block_elements=50 * 3000)
    assert uncertainty.ece_if_calibrated(p, draws=50, seed=3, block_elements=700) == whole


def test_calibration_round_trips_through_json():
    rng = np.random.default_rng(3)
    x, r = rng.normal(size=500), rng.integers(0, 3, 500)
    y = _bernoulli(rng, x, 1.0, 0.2)
    original = Calibration(
        "platt-isotonic", True, {"magnitude": PlattIsotonic.fit(x, y, r, 3), "mc_mean": Isotonic.fit(x, y)},
        {"split": "valid", "positives": 250}, {"name": "best", "epoch": 3, "train_seconds": 1.5},
    )  # fmt: skip
    text = json.dumps(original.to_dict())
    loaded = Calibration.from_dict(json.loads(text))
    assert json.dumps(loaded.to_dict()) == text
    logits = {"magnitude": x, "mc_mean": x}
    for name, p in original.probabilities(logits, r).items():
        np.testing.assert_array_equal(loaded.probabilities(logits, r)[name], p)
    with pytest.raises(ValueError, match="format 99, this nvkg reads formats 1, 2"):
        Calibration.from_dict({**original.to_dict(), "format": 99})
    # Format 1 (before the likelihood measure) reads as it is.
    assert json.dumps(Calibration.from_dict({**json.loads(text), "format": 1}).calibrators["magnitude"].to_dict()) == (
        json.dumps(original.calibrators["magnitude"].to_dict())
    )


def test_auto_stores_no_single_scope_and_reads_older_files_that_stored_magnitude_s():
    rng = np.random.default_rng(5)
    x, r = rng.normal(size=300), rng.integers(0, 3, 300)
    y = _bernoulli(rng, x, 1.0, 0.0)
    auto = Calibration(
        "auto", None, {"magnitude": Isotonic.fit(x, y), "mc_mean": PlattIsotonic.fit(x, y, r, 3)},
        {"chosen": {"magnitude": "isotonic", "mc_mean": "platt-isotonic"}}, {},
    )  # fmt: skip
    stored = auto.to_dict()
    assert stored["per_relation"] is None
    assert Calibration.from_dict(json.loads(json.dumps(stored))).to_dict() == stored
    older = {**stored, "per_relation": False}  # written before: magnitude's (isotonic, global) alone
    assert Calibration.from_dict(older).per_relation is None
    assert Calibration.from_dict({**stored, "method": "platt-isotonic", "per_relation": True}).per_relation


def test_a_per_relation_map_is_checked_against_the_dataset_s_number_of_relations():
    rng = np.random.default_rng(6)
    x, r = rng.normal(size=300), rng.integers(0, 3, 300)
    y = _bernoulli(rng, x, 1.0, 0.0)
    fitted = Calibration("platt-isotonic", True, {"magnitude": PlattIsotonic.fit(x, y, r, 3)}, {}, {})
    fitted.check_relations(3)
    with pytest.raises(ValueError, match=r"measures\.magnitude\.platt\.relations: 'a' and 'b' have 3 .* 4 relations"):
        fitted.check_relations(4)
    Calibration("isotonic", False, {"magnitude": Isotonic.fit(x, y)}, {}, {}).check_relations(4)  # global


def test_log_loss_and_the_logit_of_the_mean_probability():
    assert uncertainty.log_loss(np.array([0.8, 0.3]), np.array([1.0, 0.0])) == pytest.approx(
        -(math.log(0.8) + math.log(0.7)) / 2
    )
    assert uncertainty.log_loss(np.array([0.0]), np.array([1.0])) == pytest.approx(-math.log(uncertainty.EPS))
    samples = np.array([[40.0, -1.0], [38.0, 2.0]])
    mean = 1 / (1 + np.exp(-samples))
    logit = uncertainty.logit_of_mean_probability(samples)
    assert logit[1] == pytest.approx(math.log(mean[:, 1].mean() / (1 - mean[:, 1].mean())))
    assert 38 < logit[0] < 40  # far beyond float64's sigmoid(x) = 1 rounding of the mean


@pytest.fixture(scope="module")
def overconfident_run(tmp_path_factory):
    """A short nations run (1-vs-all, variational DistMult) whose relation means are then scaled by 100:
    its scores are 100 times too large, so sigmoid(score) is overconfident."""
    out = tmp_path_factory.mktemp("calibration") / "run"
    config = make_config("data.dataset=nations", "model.dim=16", "train.epochs=10", "train.batch_size=256",
                         "model.scorer=distmult")  # fmt: skip
    train(config, out)
    checkpoint = load_run(out).checkpoint
    assert checkpoint is not None
    state = torch.load(checkpoint / "relations.pt")
    state["weight"][:, :16] *= 100  # the means; the log-variances follow
    torch.save(state, checkpoint / "relations.pt")
    return out


@pytest.fixture
def run_dir(overconfident_run, tmp_path):
    """A fresh copy of the run, without calibration.json."""
    return shutil.copytree(overconfident_run, tmp_path / "run")


def test_calibrate_writes_the_file_and_lowers_the_ece_of_an_overconfident_model(run_dir, capsys):
    assert main(["calibrate", str(run_dir), "--method", "platt-isotonic", "--samples", "10"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run_dir / 'calibration.json'}: calibrated on validation (platt-isotonic, per relation)" in out
    assert "(a calibrated model: " in out
    stored = json.loads((run_dir / "calibration.json").read_text())
    assert stored["format"] == 2 and set(stored["measures"]) == {"magnitude", "mc_mean", "likelihood"}
    assert stored["fitted_on"]["positives"] == stored["fitted_on"]["negatives"] == 199
    assert stored["measures"]["magnitude"]["kind"] == "platt-isotonic"
    assert len(stored["measures"]["magnitude"]["platt"]["relations"]["a"]) == 55
    band = stored["test"]["magnitude"]["after"]["ece_if_calibrated"]
    assert 0 < band["mean"] < band["p95"] < 0.2  # 402 test facts: a calibrated model's ECE is well above 0
    for name in ("magnitude", "mc_mean", "likelihood"):
        before, after = stored["test"][name]["before"], stored["test"][name]["after"]
        assert after["ece"] < before["ece"] / 2, name
        assert after["log_loss"] < before["log_loss"] and after["brier"] < before["brier"]
    assert stored["test"]["magnitude"]["before"]["ece"] > 0.2
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # written atomically, nothing left
    assert main(["calibrate", str(run_dir), "--method", "isotonic", "--samples", "10"]) == 0
    stored = json.loads((run_dir / "calibration.json").read_text())
    assert stored["method"] == "isotonic" and not stored["per_relation"]
    assert stored["measures"]["magnitude"]["kind"] == "isotonic"
    assert main(["calibrate", str(run_dir), "--method", "isotonic", "--per-relation"]) == 2
    assert "isotonic regression is fitted globally" in capsys.readouterr().err
    assert main(["calibrate", str(run_dir), "--method", "platt-isotonic", "--global"]) == 2
    assert "platt-isotonic's Platt stage is per relation" in capsys.readouterr().err
    assert main(["calibrate", str(run_dir), "--global"]) == 2
    assert "auto fits each method in its own scope" in capsys.readouterr().err
    assert main(["calibrate", str(run_dir), "--method", "platt", "--samples", "10"]) == 0
    assert json.loads((run_dir / "calibration.json").read_text())["measures"]["magnitude"]["kind"] == "platt"


def test_a_likelihood_fitted_on_validation_is_judged_on_test_whatever_the_budget(run_dir, monkeypatch, capsys):
    run = load_run(run_dir)
    valid, test = (len(calibration.judged(run, split, 0).facts) for split in ("valid", "test"))
    assert test > valid  # nations: 199 valid facts, 201 test facts, as many negatives each
    monkeypatch.setattr(uncertainty, "LIKELIHOOD_MAX_PAIRS", valid * run.model.entities.num_rows)
    path, stored = calibration.calibrate(run, seed=0, samples=2)
    assert "likelihood" in stored["measures"] and "likelihood" in stored["test"]
    assert "likelihood" in calibration.format_calibrated(path, stored)
    # Without the likelihood (the report's fit), nothing is fitted or judged of it.
    assert "likelihood" not in calibration.fit(run, seed=0, samples=2, likelihood=False).calibrators


def test_classify_falls_back_to_magnitude_s_calibration_when_the_file_has_no_likelihood(run_dir):
    run = load_run(run_dir)
    _, stored = calibration.calibrate(run, seed=0, samples=2)
    del stored["measures"]["likelihood"]
    (run_dir / "calibration.json").write_text(json.dumps({**stored, "format": 1}))
    result = classify.classify(run, seed=0, calibrated=classify.stored_calibration(run)[0], measure="likelihood")
    assert result["measure"] == "likelihood" and result["calibrated"]["measure"] == "magnitude"


def test_predict_shows_the_calibrated_probability_once_the_run_is_calibrated(run_dir):
    before = predict(load_run(run_dir), head="usa", relation="embassy", tail=None, top_k=5, samples=10)
    assert not before["query"]["calibrated"] and "calibrated_probability" not in before["predictions"][0]
    assert "uncalibrated: sigmoid(score)" in format_predictions(before)
    assert f"python -m trainer calibrate {run_dir}" in format_predictions(before)

    run = load_run(run_dir)
    calibration.calibrate(run, seed=0, samples=10)
    after = predict(run, head="usa", relation="embassy", tail=None, top_k=5, samples=10)
    text = format_predictions(after)
    assert (
        "calibrated on validation (auto, chosen by out-of-fold ECE" in text and "cal(p)" in text and "p(t|h,r)" in text
    )
    for old, new in zip(before["predictions"], after["predictions"], strict=True):
        assert {k: new[k] for k in old} == old  # the existing fields, unchanged
    # The calibrated column is the stored map of the fact's score; the softmax is over every entity.
    found, _ = calibration.stored(run)
    assert found is not None
    names = run.dataset.names("entities")["name"].to_pylist()
    usa, embassy = names.index("usa"), run.dataset.names("relations")["name"].to_pylist().index("embassy")
    facts = torch.tensor([[usa, embassy, names.index(row["tail"])] for row in after["predictions"]])
    scores = uncertainty.fact_scores(run.model, facts, 10, run.config.train.seed)
    expected = found.probabilities(calibration.measure_logits(scores, True), facts[:, 1].numpy())
    assert [row["calibrated_probability"] for row in after["predictions"]] == pytest.approx(expected["magnitude"])
    assert [row["calibrated_mc_mean"] for row in after["predictions"]] == pytest.approx(expected["mc_mean"])
    by_means = calibration.calibrated_probabilities(found)  # what classify judges at 0.5
    assert set(by_means) == {"magnitude", "likelihood"}
    relations = facts[:, 1].numpy()
    by_magnitude = by_means["magnitude"](classify.measure_scores(run.model, facts, "magnitude"), relations)
    np.testing.assert_allclose(by_magnitude, expected["magnitude"])
    with_likelihood = uncertainty.fact_scores(run.model, facts, 10, run.config.train.seed, likelihood=True)
    expected = found.probabilities(calibration.measure_logits(with_likelihood, True), facts[:, 1].numpy())
    by_likelihood = by_means["likelihood"](classify.measure_scores(run.model, facts, "likelihood"), relations)
    np.testing.assert_allclose(by_likelihood, expected["likelihood"])
    ents, rels = run.model.entities.full().mean, run.model.relations.full().mean
    softmax = torch.softmax(run.model.scorer.score_tails(ents[[usa]], rels[[embassy]], ents)[0], 0)
    assert [row["softmax_probability"] for row in after["predictions"]] == pytest.approx(
        softmax[facts[:, 2]].tolist(), rel=1e-5
    )
    # Head answers: the calibrated probability is of the fact (s, r, o), as for tail answers.
    heads = predict(run, head=None, relation="embassy", tail="usa", top_k=3, samples=10)
    assert "p(h|r,t)" in format_predictions(heads) and "calibrated_probability" in heads["predictions"][0]
    facts = torch.tensor([[names.index(row["head"]), embassy, usa] for row in heads["predictions"]])
    triple = uncertainty.fact_scores(run.model, facts, 10, run.config.train.seed)  # scored as (s, r, o)
    expected = found.probabilities(calibration.measure_logits(triple, True), facts[:, 1].numpy())
    assert [row["calibrated_probability"] for row in heads["predictions"]] == pytest.approx(expected["magnitude"])
    assert [row["calibrated_mc_mean"] for row in heads["predictions"]] == pytest.approx(expected["mc_mean"])


def test_a_calibration_of_another_checkpoint_is_not_used(run_dir):
    run = load_run(run_dir)
    calibration.calibrate(run, seed=0, samples=5)
    stored = json.loads((run_dir / "calibration.json").read_text())
    stored["checkpoint"]["epoch"] = 99
    (run_dir / "calibration.json").write_text(json.dumps(stored))
    found, note = calibration.stored(run)
    assert found is None and "fitted on the checkpoint of epoch 99" in note
    (run_dir / "calibration.json").write_text("{")
    with pytest.raises(ValueError, match="not an nvkg calibration"):
        calibration.stored(run)


def test_report_shows_calibration_before_and_after(run_dir, tmp_path):
    fitted_here = write_report(load_run(run_dir), tmp_path / "a", samples=10, seed=0)
    assert not fitted_here["calibrator"]["stored"] and not (run_dir / "calibration.json").exists()
    assert "fitted for this report and not stored" in fitted_here["calibrator"]["description"]
    _, stored = calibration.calibrate(load_run(run_dir), seed=0, samples=10)
    summary = write_report(load_run(run_dir), tmp_path / "b", samples=10, seed=0)
    chosen = ", ".join(f"{name}: {kind}" for name, kind in stored["fitted_on"]["chosen"].items())
    assert summary["calibrator"]["stored"] and summary["calibrator"]["description"] == (
        f"calibrated on validation (auto, chosen by out-of-fold ECE: {chosen})"
    )
    for name in ("magnitude", "mc_mean"):
        numbers = summary["calibration"][name]
        assert set(numbers) == {"ece", "ece_if_calibrated", "brier", "log_loss", "bins", "calibrated"}
        # The same test facts, draws and calibrator as `trainer calibrate`: the same numbers.
        for key in ("ece", "brier", "log_loss"):
            assert numbers[key] == pytest.approx(stored["test"][name]["before"][key])
            assert numbers["calibrated"][key] == pytest.approx(stored["test"][name]["after"][key])
    assert (tmp_path / "b" / "reliability.png").stat().st_size > 1000
    # With fewer draws than the calibration was fitted on, the calibrated MC mean still takes its 10: the
    # same calibrated numbers as `trainer calibrate`, while the uncalibrated one is of the 2 asked for.
    fewer = write_report(load_run(run_dir), tmp_path / "c", samples=2, seed=0)
    assert "its MC mean from the 10 draws it was fitted with" in fewer["calibrator"]["description"]
    after = fewer["calibration"]["mc_mean"]["calibrated"]
    assert after["ece"] == pytest.approx(stored["test"]["mc_mean"]["after"]["ece"])
    assert fewer["calibration"]["mc_mean"]["ece"] != pytest.approx(stored["test"]["mc_mean"]["before"]["ece"])


def test_cross_validated_methods_judge_out_of_fold_probabilities_on_validation(run_dir):
    run = load_run(run_dir)
    numbers = calibration.cross_validated(run, seed=0, samples=5)
    assert set(numbers) == {"magnitude", "mc_mean", "likelihood"}
    assert set(numbers["magnitude"]) == set(calibration.METHODS)
    valid = calibration.judged(run, "valid", 0)
    raw = uncertainty.fact_scores(run.model, valid.facts, 0, 0).probabilities().magnitude
    before = calibration.quality(raw, valid.labels)
    for method, result in numbers["magnitude"].items():
        # The overconfident model's scores are 100 times too large: every method fitted on other folds
        # still beats them on facts it did not see.
        assert result["log_loss"] < before["log_loss"] and result["ece"] < before["ece"] / 2, method


def test_auto_fits_per_measure_the_method_with_the_lowest_out_of_fold_ece_on_validation(run_dir, capsys):
    run = load_run(run_dir)
    numbers = calibration.cross_validated(run, seed=0, samples=10)
    expected = {name: min(calibration.METHODS, key=lambda m, r=results: (r[m]["ece"], calibration.METHODS.index(m)))
                for name, results in numbers.items()}  # fmt: skip
    assert main(["calibrate", str(run_dir), "--samples", "10"]) == 0  # auto is the default
    assert "calibrated on validation (auto, chosen by out-of-fold ECE: magnitude: " in capsys.readouterr().out
    stored = json.loads((run_dir / "calibration.json").read_text())
    assert stored["method"] == "auto" and stored["fitted_on"]["chosen"] == expected
    assert stored["per_relation"] is None  # each measure has its chosen method's scope
    assert {name: m["kind"] for name, m in stored["measures"].items()} == expected
    assert calibration.Calibration.from_dict(stored).calibrators.keys() == expected.keys()


def test_auto_chooses_with_the_shrinkage_it_then_fits_with(run_dir, monkeypatch):
    used = []
    fit_calibrator = calibration.fit_calibrator

    def spy(*args, **kwargs):
        bound = inspect.signature(fit_calibrator).bind(*args, **kwargs)
        bound.apply_defaults()
        used.append((bound.arguments["method"], bound.arguments["pseudo_facts"]))
        return fit_calibrator(*args, **kwargs)

    monkeypatch.setattr(calibration, "fit_calibrator", spy)
    calibration.fit(load_run(run_dir), method="auto", pseudo_facts=10.0, seed=0, samples=2)
    assert {method for method, _ in used} == set(calibration.METHODS)  # every method judged out of fold
    assert {pseudo_facts for _, pseudo_facts in used} == {10.0}


def test_a_hand_edited_calibration_is_refused_naming_the_file_and_the_field(run_dir):
    run = load_run(run_dir)
    path, stored = calibration.calibrate(run, method="platt", seed=0, samples=2)
    file = re.escape(str(path))
    path.write_text(json.dumps({**stored, "measures": {}}))
    with pytest.raises(ValueError, match=rf"{file}: .*measures\.magnitude: missing"):
        predict(run, head="usa", relation="embassy", tail=None, top_k=3, samples=2)
    platt = stored["measures"]["magnitude"]
    short = {k: v[:-1] for k, v in platt["relations"].items()}  # 54 of the 55 relations
    path.write_text(json.dumps({**stored, "measures": {"magnitude": {**platt, "relations": short}}}))
    with pytest.raises(ValueError, match=rf"{file}: .*measures\.magnitude\.relations: .* 54 values.* 55 relations"):
        calibration.stored(run)
    path.write_text(json.dumps(stored))
    assert calibration.stored(run)[0] is not None


def test_a_calibration_with_fields_of_the_wrong_kind_or_values_no_map_could_give_is_refused(run_dir):
    run = load_run(run_dir)
    path, stored = calibration.calibrate(run, method="isotonic", seed=0, samples=2)
    file = re.escape(str(path))
    isotonic = stored["measures"]["magnitude"]
    platt = {"kind": "platt", "a": 1.0, "b": 0.0, "pseudo_facts": 50.0, "relations": None}
    for edit, field in [
        ({"checkpoint": None}, "checkpoint"),
        ({"fitted_on": []}, "fitted_on"),
        ({"fitted_on": {**stored["fitted_on"], "chosen": ["x"]}}, "fitted_on.chosen"),
        ({"format": True}, "format"),
        ({"measures": {"magnitude": {**isotonic, "y": [5.0] * len(isotonic["y"])}}}, "isotonic"),
        ({"measures": {"magnitude": {**isotonic, "x": [float("nan"), *isotonic["x"][1:]]}}}, "isotonic"),
        ({"measures": {"magnitude": {**platt, "a": float("nan")}}}, "platt"),
    ]:
        path.write_text(json.dumps({**stored, **edit}))
        with pytest.raises(ValueError, match=rf"{file}: .*{field}"):
            predict(run, head="usa", relation="embassy", tail=None, top_k=3, samples=2)
    path.write_text(json.dumps(stored))
    assert calibration.stored(run)[0] is not None


def test_non_finite_scores_are_an_error_not_a_calibration_or_thresholds(run_dir):
    run = load_run(run_dir)
    with torch.no_grad():
        run.model.entities.weight[run.dataset.valid[0, 0]] = float("nan")
    with pytest.raises(ValueError, match=r"magnitude: \d+ of 398 valid facts score NaN or infinity"):
        calibration.fit(run, seed=0, samples=2)
    with pytest.raises(ValueError, match=r"magnitude: \d+ of 398 valid facts score NaN or infinity"):
        classify.classify(run, seed=0)


def test_calibrate_refuses_non_finite_test_scores_and_writes_nothing(run_dir, monkeypatch):
    scores_for = calibration.scores_for

    def one_nan(*args, **kwargs):  # a test fact whose score is NaN, as a non-finite entity row gives
        scores = scores_for(*args, **kwargs)
        scores.magnitude[0] = np.nan
        return scores

    monkeypatch.setattr(calibration, "scores_for", one_nan)
    with pytest.raises(ValueError, match=r"magnitude: 1 of 402 test facts score NaN or infinity"):
        calibration.calibrate(load_run(run_dir), seed=0, samples=2)
    assert not (run_dir / "calibration.json").exists()


def test_the_mc_mean_is_calibrated_from_as_many_draws_as_it_was_fitted_with(run_dir, tmp_path):
    run = load_run(run_dir)
    calibration.calibrate(run, seed=0, samples=6)
    found, _ = calibration.stored(run)
    assert found is not None and calibration.fitted_draws(found, 1) == 6
    shown = predict(run, head="usa", relation="embassy", tail=None, top_k=4, samples=1)
    assert "its MC mean from the 6 draws it was fitted with" in shown["query"]["calibration"]
    names = run.dataset.names("entities")["name"].to_pylist()
    usa, embassy = names.index("usa"), run.dataset.names("relations")["name"].to_pylist().index("embassy")
    facts = torch.tensor([[usa, embassy, names.index(row["tail"])] for row in shown["predictions"]])
    seed = run.config.train.seed
    six = found.probabilities(calibration.measure_logits(uncertainty.fact_scores(run.model, facts, 6, seed), True),
                              facts[:, 1].numpy())  # fmt: skip
    assert [row["calibrated_mc_mean"] for row in shown["predictions"]] == pytest.approx(six["mc_mean"])
    # The uncalibrated MC mean is still of the draws asked for.
    one = uncertainty.fact_scores(run.model, facts, 1, seed).probabilities().mean
    assert [row["mc_mean"] for row in shown["predictions"]] == pytest.approx(one.tolist())
    same = predict(run, head="usa", relation="embassy", tail=None, top_k=4, samples=6)
    assert "draws it was fitted with" not in same["query"]["calibration"]
