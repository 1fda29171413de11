import json
import math
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.trainer.conftest import make_config
from trainer import report as reporting
from trainer import uncertainty
from trainer.evaluate import build_filters, evaluate, sample_facts
from trainer.loop import train
from trainer.report import _uniform_other, export, predict, variance_vs_frequency, write_report
from trainer.runs import load_run


def test_a_confidence_that_ranks_true_facts_first_has_precision_one_up_to_the_positive_rate():
    labels = np.array([1] * 30 + [0] * 70)
    confidence = labels + np.random.default_rng(0).random(100) * 0.5  # every true fact above every false one
    coverage = uncertainty.coverage_grid()
    precision = uncertainty.precision_at_coverage(confidence, labels)
    assert np.all(precision[coverage <= 0.3] == 1.0)
    kept = (np.arange(1, 1001) * 100 + 999) // 1000  # ceil(c * 100) for c = i / 1000, in integers
    np.testing.assert_allclose(precision[coverage > 0.3], 30 / kept[coverage > 0.3])
    assert len(coverage) == 1000 and coverage[0] > 0 and coverage[-1] == 1.0


def test_constant_confidence_gives_the_base_rate_everywhere():
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    precision = uncertainty.precision_at_coverage(np.zeros(8), labels, num_points=10)
    np.testing.assert_allclose(precision, 0.25)


def test_the_kept_counts_are_exact_ceilings_of_the_coverage_times_the_items():
    # Coverage 0.07 of 100 items keeps 7: the float 0.07 * 100 is 7.000000000000001, whose ceiling is 8.
    assert uncertainty.kept_counts(100, 100)[6] == 7
    labels = np.array([1] * 7 + [0] * 93)
    assert uncertainty.precision_at_coverage(-np.arange(100.0), labels, num_points=100)[6] == 1.0
    for num_points in (10, 100, 1000):
        for num_items in range(1, 300):
            expected = [max(1, math.ceil(Fraction(i, num_points) * num_items)) for i in range(1, num_points + 1)]
            assert uncertainty.kept_counts(num_items, num_points).tolist() == expected


def test_confidences_of_facts_whose_probability_rounds_to_one_rank_as_their_scores():
    # float32 sigmoid is exactly 1 from a score of ~17: ranked by probability, these facts are one tie.
    magnitude = np.array([30.0, 18.0, 25.0, 20.0], dtype=np.float32)
    scores = uncertainty.FactScores(magnitude, magnitude + np.array([[-1.0], [1.0]], dtype=np.float32))
    probs = scores.probabilities()
    assert (probs.magnitude == 1).all() and (probs.samples == 1).all()
    labels = np.array([1, 0, 1, 0])  # the true facts have the larger scores
    for name, confidence in uncertainty.truth_confidences(scores).items():
        precision = uncertainty.precision_at_coverage(confidence, labels, num_points=4)
        np.testing.assert_allclose(precision, [1, 1, 2 / 3, 1 / 2], err_msg=name)
    # Selective prediction: |p - 1/2| is 1/2 in float32 for all four; ranked by |score|, negated facts alike.
    negated = (
        np.concatenate([scores.magnitude, -scores.magnitude]),
        np.concatenate([scores.samples, -scores.samples], 1),
    )
    for name in ("magnitude", "mc_mean"):
        confidence = uncertainty.prediction_confidences(uncertainty.FactScores(*negated))[name]
        assert np.argsort(-confidence, kind="stable").tolist() == [0, 4, 2, 6, 3, 7, 1, 5], name


def test_ece_of_a_calibrated_predictor_is_near_zero_and_of_a_confident_one_is_not():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    labels = (rng.random(200_000) < p).astype(float)
    ece, bins = uncertainty.expected_calibration_error(p, labels)
    assert ece < 0.01 and len(bins) == 15
    overconfident, _ = uncertainty.expected_calibration_error(np.where(p > 0.5, 1.0, 0.0), labels)
    assert overconfident > 0.2


def test_brier_entropy_and_mutual_information_hand_values():
    assert uncertainty.brier_score(np.array([0.8, 0.3]), np.array([1.0, 0.0])) == pytest.approx((0.04 + 0.09) / 2)
    assert uncertainty.binary_entropy(np.array([0.5]))[0] == pytest.approx(math.log(2))
    agree = np.full((10, 3), 0.7)
    assert np.allclose(uncertainty.mutual_information(agree), 0.0)
    disagree = np.array([[0.0], [1.0]] * 5)  # half the samples say no, half say yes: all epistemic
    assert uncertainty.mutual_information(disagree)[0] == pytest.approx(math.log(2), rel=1e-6)


def test_sampled_negatives_are_never_known_facts():
    known = torch.tensor([[0, 0, 1], [1, 0, 2], [2, 0, 0], [0, 0, 2]])
    is_known = lambda facts: uncertainty.known_mask(facts, [known])  # noqa: E731
    negatives = uncertainty.sampled_negatives(known, is_known, 3, torch.Generator().manual_seed(0))
    known_set = {tuple(f) for f in known.tolist()}
    assert not any(tuple(f) in known_set for f in negatives.tolist())
    assert ((known != negatives).sum(1) == 1).all()  # exactly one side corrupted


def test_a_fact_whose_every_corruption_is_known_is_an_error_that_names_it():
    one_entity = torch.tensor([[0, 0, 0]])
    is_known = lambda facts: uncertainty.known_mask(facts, [one_entity])  # noqa: E731
    with pytest.raises(ValueError, match=r"fact \(head, relation, tail\) = \(0, 0, 0\): every corruption .* known"):
        uncertainty.sampled_negatives(one_entity, is_known, 1, torch.Generator().manual_seed(0))


def test_a_fact_left_after_the_redraws_gets_one_of_its_unknown_corruptions(monkeypatch):
    # Of the corruptions of (0, 0, 0) and (1, 0, 0) with 2 entities, only (0, 0, 1) and (1, 0, 1) are unknown.
    known = torch.tensor([[0, 0, 0], [1, 0, 0]])
    is_known = lambda facts: uncertainty.known_mask(facts, [known])  # noqa: E731
    drawn = uncertainty.sampled_negatives(known, is_known, 2, torch.Generator().manual_seed(0))
    monkeypatch.setattr(uncertainty, "MAX_DRAWS", 0)  # no redraws: every fact's corruptions enumerated
    enumerated = uncertainty.sampled_negatives(known, is_known, 2, torch.Generator().manual_seed(0))
    assert drawn.tolist() == enumerated.tolist() == [[0, 0, 1], [1, 0, 1]]


def test_pca_and_nmf_recover_low_rank_structure():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)) @ rng.normal(size=(2, 6))
    centre, projection = uncertainty.pca_2d(x)
    reconstructed = (x - centre) @ projection @ projection.T + centre
    np.testing.assert_allclose(reconstructed, x, atol=1e-8)
    nonneg = rng.random((50, 2)) @ rng.random((2, 8))
    w, h = uncertainty.nmf_2d(nonneg, iterations=2000)
    assert np.abs(w @ h - nonneg).max() < 0.05 and (w >= 0).all() and (h >= 0).all()


def test_kde_integrates_to_one():
    points = np.random.default_rng(0).normal(size=(1000, 2))
    grid = np.linspace(-6, 6, 200)
    density = uncertainty.kde_2d(points, grid, grid)
    assert density.sum() * (grid[1] - grid[0]) ** 2 == pytest.approx(1.0, rel=0.01)


@pytest.fixture(scope="module")
def nations_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nations") / "run"
    config = make_config("data.dataset=nations", "model.dim=16", "train.epochs=20", "train.batch_size=256",
                         "train.eval_every=10", "model.scorer=distmult")  # fmt: skip
    train(config, out)
    return out


def test_fact_log_likelihood_is_the_mean_log_softmax_of_the_two_answers(nations_run):
    run = load_run(nations_run)
    model, facts = run.model, run.dataset.test[:37]
    entities, relations = model.entities.full().mean.double(), model.relations.full().mean.double()
    expected = []
    for s, r, o in facts.tolist():  # one fact at a time, in float64, by the scorer's own score
        tails = model.scorer.score(entities[s], relations[r], entities)
        heads = model.scorer.score(entities[o], relations[r + model.num_relations], entities)
        expected.append((torch.log_softmax(tails, 0)[o] + torch.log_softmax(heads, 0)[s]).item() / 2)
    # Chunks of one fact (a score budget of one row) give what one chunk gives.
    np.testing.assert_allclose(uncertainty.fact_log_likelihood(model, facts), expected, rtol=1e-5)
    np.testing.assert_allclose(uncertainty.fact_log_likelihood(model, facts, max_bytes=1), expected, rtol=1e-5)
    scores = uncertainty.fact_scores(model, facts, 2, 0, likelihood=True)
    np.testing.assert_allclose(scores.likelihood, expected, rtol=1e-5)
    assert uncertainty.fact_scores(model, facts, 2, 0).likelihood is None


def test_the_likelihood_is_skipped_beyond_its_budget_and_refused_without_reciprocal_relations(
    nations_run, tmp_path, monkeypatch
):
    model, facts = load_run(nations_run).model, load_run(nations_run).dataset.test[:11]
    monkeypatch.setattr(uncertainty, "LIKELIHOOD_MAX_PAIRS", 14 * 10)  # nations: 14 entities
    assert uncertainty.likelihood_affordable(model, 10) and not uncertainty.likelihood_affordable(model, 11)
    assert uncertainty.fact_scores(model, facts[:10], 1, 0, likelihood=True).likelihood is not None
    assert uncertainty.fact_scores(model, facts, 1, 0, likelihood=True).likelihood is None
    config = make_config("data.dataset=nations", "model.dim=4", "train.epochs=1", "train.batch_size=512",
                         "objective.likelihood=bernoulli", "objective.num_negatives=2")  # fmt: skip
    train(config, tmp_path / "run")
    bernoulli = load_run(tmp_path / "run").model
    with pytest.raises(ValueError, match="no reciprocal relations"):
        uncertainty.fact_log_likelihood(bernoulli, facts)
    assert not uncertainty.likelihood_affordable(bernoulli, 1)
    assert uncertainty.fact_scores(bernoulli, facts, 1, 0, likelihood=True).likelihood is None


def test_report_on_a_short_nations_run_writes_every_file(nations_run, tmp_path):
    summary = write_report(load_run(nations_run), tmp_path, samples=20, seed=0)
    for name in ("variance_vs_frequency.png", "precision_coverage.png", "selective_prediction.png",
                 "reliability.png", "confidence.png", "fact.png", "report.json"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 1000, name
    assert set(summary["precision_coverage_area"]) == {"magnitude", "mc_mean", "mc_lower_bound"}
    assert set(summary["selective_prediction_area"]) == {"magnitude", "mc_mean", "mc_std", "entropy",
                                                         "mutual_information"}  # fmt: skip
    assert set(summary["calibration"]["mc_mean"]) == {"ece", "ece_if_calibrated", "brier", "log_loss", "bins",
                                                      "calibrated"}  # fmt: skip
    assert not summary["calibrator"]["stored"]  # no calibration.json: fitted for the report, not written
    assert -1 <= summary["variance_vs_frequency"]["entities"]["correlation"] <= 1
    assert len(summary["fact_visualisation"]) == 4
    assert summary["facts"]["positives"] == summary["facts"]["negatives"] > 0


def test_a_link_facts_below_one_is_refused_before_any_work(nations_run, tmp_path, monkeypatch):
    run = load_run(nations_run)
    monkeypatch.setattr(reporting, "analyse", lambda *args, **kwargs: pytest.fail("analysed before link_facts"))
    with pytest.raises(ValueError, match=r"link_facts \(--link-facts\) 0: expected at least 1"):
        write_report(run, tmp_path / "report", samples=2, seed=0, link_facts=0)
    assert not (tmp_path / "report").exists()


def test_a_fact_index_outside_the_test_split_is_refused_before_any_work(nations_run, tmp_path, monkeypatch):
    run = load_run(nations_run)
    monkeypatch.setattr(reporting, "analyse", lambda *args, **kwargs: pytest.fail("analysed before --fact was checked"))
    last = len(run.dataset.test) - 1
    with pytest.raises(ValueError, match=rf"--fact 999999: the test split has facts 0 to {last}"):
        write_report(run, tmp_path / "report", samples=2, seed=0, fact_index=999999)
    assert not (tmp_path / "report").exists()


def test_a_report_that_fails_part_way_leaves_the_previous_one_as_it_was(nations_run, tmp_path, monkeypatch):
    run, out = load_run(nations_run), tmp_path / "report"
    out.mkdir()
    previous = {name: f"previous {name}" for name in ("precision_coverage.png", "report.json", "notes.txt")}
    for name, text in previous.items():
        (out / name).write_text(text)

    def fails(*args: object) -> str:
        raise RuntimeError("the fact figure failed")

    monkeypatch.setattr(reporting, "_plot_fact", fails)  # the last figure: every other one is written by then
    with pytest.raises(RuntimeError, match="the fact figure failed"):
        write_report(run, out, samples=2, seed=0, link_samples=2, resamples=2)
    assert {p.name: p.read_text() for p in out.iterdir()} == previous
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging directory left beside it
    monkeypatch.undo()
    summary = write_report(run, out, samples=2, seed=0, link_samples=2, resamples=2)
    assert {p.name for p in out.iterdir()} == {*summary["figures"].values(), "report.json", "notes.txt"}
    assert json.loads((out / "report.json").read_text())["figures"] == summary["figures"]


def test_report_json_holds_the_confidence_study(nations_run, tmp_path):
    run = load_run(nations_run)
    write_report(run, tmp_path, samples=10, seed=0, link_samples=8, resamples=50)
    study = json.loads((tmp_path / "report.json").read_text())["confidence"]
    link, triples = study["link_prediction"], study["triples"]
    sampling = {"mc_mean", "mc_lower_bound", "stability", "rank_variance", "mc_reciprocal_rank"}
    assert set(link["area"]) == set(link["curves"]) == {"magnitude"} | sampling
    assert set(link["versus_magnitude"]) == sampling
    assert set(triples["versus_magnitude"]) == {"mc_mean", "mc_lower_bound"}
    assert link["queries"] == 2 * len(run.dataset.test) and link["samples"] == 8
    assert link["probability"] == "softmax over the candidates"  # a 1-vs-all model
    assert 0 < link["top1_accuracy"] < 1 and len(link["curves"]["stability"]) == 1000
    for compared in (link["versus_magnitude"], triples["versus_magnitude"]):
        for d in compared.values():
            lo, hi = d["interval"]
            assert lo <= hi and -1 <= d["difference"] <= 1
    assert link["area"]["stability"] - link["area"]["magnitude"] == pytest.approx(
        link["versus_magnitude"]["stability"]["difference"]
    )
    assert study["bootstrap"] == {"resamples": 50, "seed": 0, "level": 0.95,
                                  "resampled": "queries (link prediction), facts (triples)"}  # fmt: skip
    # A top-1 answer is right when evaluation ranks the answer first: the filtered Hits@1 of the means.
    filters = build_filters(run.dataset.all_known(), run.dataset.num_relations)
    assert link["top1_accuracy"] == pytest.approx(evaluate(run.model, run.dataset.test, filters)["filtered"]["hits@1"])


def test_the_link_study_of_a_split_beyond_link_facts_is_a_seeded_sample_of_it(nations_run, tmp_path):
    from trainer.cli import main

    run = load_run(nations_run)
    main(["report", str(nations_run), "--out", str(tmp_path), "--samples", "3", "--link-samples", "2",
          "--link-facts", "50"])  # fmt: skip
    link = json.loads((tmp_path / "report.json").read_text())["confidence"]["link_prediction"]
    assert link["queries"] == 100 and link["facts_available"] == len(run.dataset.test) == 201
    assert link["samples"] == 2
    # The study's facts are evaluate.sample_facts's: its top-1 accuracy is their filtered Hits@1.
    facts = sample_facts(run.dataset.test, 50, run.config.train.seed)
    filters = build_filters(run.dataset.all_known(), run.dataset.num_relations)
    assert link["top1_accuracy"] == pytest.approx(evaluate(run.model, facts, filters)["filtered"]["hits@1"])
    answers = reporting.link_answers(run, "test", samples=0, seed=0, max_facts=len(run.dataset.test))
    assert len(answers.correct) == 2 * len(run.dataset.test)  # a split within the cap: every fact
    with pytest.raises(ValueError, match=r"link_facts \(--link-facts\) 0"):
        reporting.link_answers(run, "test", samples=0, seed=0, max_facts=0)


def test_predict_ranks_names_marks_known_facts_and_suggests_close_names(nations_run):
    run = load_run(nations_run)
    result = predict(run, head="usa", relation="embassy", tail=None, top_k=5, samples=10)
    rows = result["predictions"]
    assert len(rows) == 5 and all(0 <= r["probability"] <= 1 and r["mc_std"] >= 0 for r in rows)
    assert rows == sorted(rows, key=lambda r: -r["probability"])
    known = {tuple(f) for f in run.dataset.all_known().tolist()}
    entity_names = run.dataset.names("entities")["name"].to_pylist()
    usa, embassy = entity_names.index("usa"), run.dataset.names("relations")["name"].to_pylist().index("embassy")
    for row in rows:
        fact = (usa, embassy, entity_names.index(row["tail"]))
        assert row["known"] == (fact in known)
    heads = predict(run, head=None, relation="embassy", tail="usa", top_k=3, samples=5)
    assert len(heads["predictions"]) == 3 and "head" in heads["predictions"][0]
    # Head answers are ranked as evaluation ranks them: the tail query (usa, embassy^-1, ?).
    model, rels = run.model, run.model.relations.full().mean
    assert model.reciprocal
    ents = model.entities.full().mean
    scores = model.scorer.score_tails(ents[[usa]], rels[[embassy + model.num_relations]], ents)[0]
    expected = torch.sigmoid(scores).topk(3)
    assert [entity_names.index(row["head"]) for row in heads["predictions"]] == expected.indices.tolist()
    assert [row["probability"] for row in heads["predictions"]] == pytest.approx(expected.values.tolist())
    with pytest.raises(ValueError, match=r"unknown entity 'uas'; close matches: usa"):
        predict(run, head="uas", relation="embassy", tail=None, top_k=5, samples=10)


def test_predict_ranks_by_score_where_probabilities_round_to_one(nations_run, monkeypatch):
    run = load_run(nations_run)
    scores = torch.zeros(run.dataset.num_entities)
    scores[[1, 3, 0, 2]] = torch.tensor([30.0, 25.0, 20.0, 18.0])  # sigmoid in float32: 1 for all four
    monkeypatch.setattr(reporting, "_candidate_scores", lambda *args, **kwargs: scores)
    rows = predict(run, head="usa", relation="embassy", tail=None, top_k=4, samples=2)["predictions"]
    names = run.dataset.names("entities")["name"].to_pylist()
    assert [names.index(row["tail"]) for row in rows] == [1, 3, 0, 2]
    probabilities = [row["probability"] for row in rows]
    assert probabilities == sorted(probabilities, reverse=True) and len(set(probabilities)) == 4  # float64
    assert probabilities[0] == pytest.approx(1 / (1 + math.exp(-30.0)), rel=0, abs=1e-16)


def test_export_parquet_and_tsv(nations_run, tmp_path):
    run = load_run(nations_run)
    table = pq.read_table(export(run, tmp_path / "emb.parquet")).to_pydict()
    assert table["kind"].count("entity") == 14 and table["kind"].count("relation") == 55
    assert table["kind"].count("reciprocal_relation") == 55  # a 1-vs-all model: head queries use r^-1
    usa = table["name"].index("usa")
    assert len(table["mean"][usa]) == 16 and all(v > 0 for v in table["variance"][usa])
    inverse = table["kind"].index("reciprocal_relation") + 7  # reciprocal of relation 7
    assert table["id"][inverse] == 7 and table["name"][inverse] == table["name"][14 + 7]
    torch.testing.assert_close(
        torch.tensor(table["mean"][inverse], dtype=torch.float64), run.model.relations.full().mean[7 + 55].double()
    )
    # No bias for entities; none learnt by this model, so 0 for every relation and reciprocal.
    assert all((b is None) == (k == "entity") for k, b in zip(table["kind"], table["bias"], strict=True))
    assert {b for b in table["bias"] if b is not None} == {0.0}
    lines = export(run, tmp_path / "emb.tsv", "tsv").read_text().splitlines()
    assert lines[0] == "kind\tid\tname\tfrequency\tmean\tvariance\tbias" and len(lines) == 1 + 14 + 2 * 55
    assert lines[1].endswith("\t") and lines[-1].endswith("\t0")  # an entity's empty bias, a relation's 0


def test_exported_rows_with_their_relation_bias_reproduce_the_scores_predict_shows(tmp_path):
    out = tmp_path / "run"
    config = make_config("data.dataset=nations", "model.dim=8", "train.epochs=3", "train.batch_size=256",
                         "objective.likelihood=bernoulli", "objective.relation_bias=true")  # fmt: skip
    train(config, out)
    run = load_run(out)
    table = pq.read_table(export(run, tmp_path / "emb.parquet")).to_pydict()
    rows = {(k, n): (torch.tensor(m, dtype=torch.float64), b)
            for k, n, m, b in zip(table["kind"], table["name"], table["mean"], table["bias"], strict=True)}  # fmt: skip
    biases = [b for (kind, _), (_, b) in rows.items() if kind == "relation"]
    assert len(biases) == 55 and any(b != 0.0 for b in biases)  # learnt
    answers = predict(run, head="usa", relation="embassy", tail=None, top_k=5, samples=2)["predictions"]
    relation, bias = rows["relation", "embassy"]
    for answer in answers:
        score = run.model.scorer.score(rows["entity", "usa"][0], relation, rows["entity", answer["tail"]][0])
        assert torch.sigmoid(score + bias).item() == pytest.approx(answer["probability"], rel=1e-6)


def test_known_mask_is_exact_streamed_and_survives_hash_collisions(monkeypatch):
    g = torch.Generator().manual_seed(0)
    known = torch.randint(0, 6, (300, 3), generator=g)
    queries = torch.randint(0, 6, (200, 3), generator=g)
    known_set = {tuple(f) for f in known.tolist()}
    expected = [tuple(f) in known_set for f in queries.tolist()]
    assert uncertainty.known_mask(queries, known.split(7)).tolist() == expected
    # Every fact hashing alike: the row comparison alone decides.
    monkeypatch.setattr(uncertainty, "_fact_hash", lambda facts: np.zeros(len(facts), np.uint64))
    assert uncertainty.known_mask(queries, known.split(50)).tolist() == expected


def test_export_in_small_chunks_writes_the_same_files(nations_run, tmp_path):
    run = load_run(nations_run)
    for fmt in ("parquet", "tsv"):
        whole = export(run, tmp_path / f"whole.{fmt}", fmt)
        chunked = export(run, tmp_path / f"chunked.{fmt}", fmt, chunk_rows=4)  # 14 entities: a short last chunk
        if fmt == "tsv":
            assert chunked.read_text() == whole.read_text()
        else:
            assert pq.read_table(chunked).equals(pq.read_table(whole))
            assert pq.ParquetFile(chunked).metadata.num_row_groups > 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_variance_scatter_keeps_a_sample_of_a_large_table_and_the_full_correlation(nations_run):
    run = load_run(nations_run)
    full = variance_vs_frequency(run)["entities"]
    sampled = variance_vs_frequency(run, max_points=5)["entities"]
    assert len(full["log_frequency"]) == 14 and "points_of" not in full
    assert len(sampled["mean_variance"]) == 5 and sampled["points_of"] == 14
    assert sampled["correlation"] == full["correlation"]
    assert set(sampled["mean_variance"]) <= set(full["mean_variance"])


def test_no_entity_besides_the_fact_s_own_to_corrupt_it_with_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no entity to draw as the corrupted one: the graph's 2 entities .* \(0, 1\)"):
        _uniform_other(np.random.default_rng(0), 2, {0, 1})


def test_the_corrupted_entity_is_the_one_a_choice_from_the_list_of_others_gives():
    for seed in range(50):
        for num_entities, excluded in ((14, {3, 7}), (14, {5}), (3, {0, 2})):
            others = [e for e in range(num_entities) if e not in excluded]
            listed, counted = np.random.default_rng(seed), np.random.default_rng(seed)
            assert _uniform_other(counted, num_entities, excluded) == int(listed.choice(others))
            assert counted.random() == listed.random()  # the generator is left in the same state


def test_separate_roles_export_and_report(tmp_path):
    out = tmp_path / "run"
    config = make_config("data.dataset=nations", "model.dim=8", "train.epochs=2", "train.batch_size=256",
                         "model.separate_roles=true")  # fmt: skip
    train(config, out)
    run = load_run(out)
    table = pq.read_table(export(run, tmp_path / "emb.parquet")).to_pydict()
    assert table["kind"].count("entity_subject") == table["kind"].count("entity_object") == 14
    assert "entity" not in table["kind"] and all(len(m) == 8 for m in table["mean"])
    # The exported rows reproduce the model's score: subject row of s, relation r, object row of o.
    vec = {(k, i): torch.tensor(m) for k, i, m in zip(table["kind"], table["id"], table["mean"], strict=True)}
    ents, rels = run.model.entities.full().mean, run.model.relations.full().mean
    expected = run.model.scorer.score(ents[3], rels[5], ents[9])
    got = run.model.scorer.base.score(vec["entity_subject", 3], vec["relation", 5], vec["entity_object", 9])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    summary = write_report(run, tmp_path / "report", samples=5, seed=0)
    visual = {label.split()[0]: (label.split()[1], v["mean"]) for label, v in summary["fact_visualisation"].items()}
    assert set(visual) == {"subject", "relation", "object", "corrupted"}
    # Every role is a point of the projection; the subject is drawn with its subject row, the object with
    # its object row.
    centre, projection = uncertainty.pca_2d(torch.cat([ents[:, :8], ents[:, 8:], rels]).numpy())
    s, r, o = run.dataset.test[0].tolist()
    names = run.dataset.names("entities")["name"].to_pylist()
    for role, entity, half in (("subject", s, slice(0, 8)), ("object", o, slice(8, 16))):
        assert visual[role][0] == names[entity]
        expected = (ents[entity, half].numpy() - centre) @ projection
        np.testing.assert_allclose(visual[role][1], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(visual["relation"][1], (rels[r].numpy() - centre) @ projection, rtol=1e-5, atol=1e-6)
