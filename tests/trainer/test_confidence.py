"""The confidence study: measures of a top-1 answer's certainty, their bootstrap comparison, and the
fact figure's contour levels."""

import math

import numpy as np
import pytest
import torch

from tests.trainer.conftest import make_config
from trainer import uncertainty
from trainer.evaluate import build_filters
from trainer.model import build_model


def _answers(mean_BN: torch.Tensor, draws_SBN: torch.Tensor, answer_B: torch.Tensor, softmax: bool):
    top = mean_BN.argmax(1)
    return uncertainty.TopAnswers(
        top.numpy(),
        (top == answer_B).numpy(),
        uncertainty.answer_logit(mean_BN, top, softmax).numpy(),
        torch.stack([uncertainty.answer_logit(d, top, softmax) for d in draws_SBN]).numpy(),
        torch.stack([uncertainty.answer_rank(d, top) for d in draws_SBN]).numpy(),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_an_answer_top_in_every_draw_has_stability_one_and_no_rank_variance():
    mean = torch.tensor([[3.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]])
    # Query 0's answer (entity 0) leads in all three draws; query 1's falls to rank 2, then rank 3.
    draws = torch.tensor(
        [
            [[5.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]],
            [[4.0, 3.0, 0.0, 0.0], [1.0, 1.5, 0.0, -1.0]],
            [[9.0, 8.0, 7.0, 0.0], [0.0, 1.0, 0.5, -1.0]],
        ]
    )
    answers = _answers(mean, draws, torch.tensor([0, 1]), softmax=True)
    assert answers.top.tolist() == [0, 0] and answers.correct.tolist() == [True, False]
    np.testing.assert_array_equal(answers.ranks, [[1, 1], [1, 2], [1, 3]])
    measures = uncertainty.link_confidences(answers)
    # Stability 1 against 1/3, rank variance 0 against 2/3 (ranks 1, 2, 3), mean reciprocal rank 1 against
    # 11/18: as ranking keys, query 0 first on each.
    for name in ("stability", "rank_variance", "mc_reciprocal_rank"):
        assert measures[name].tolist() == [2.0, 1.0], name
    # The probability measures are ranking keys: the logit of the mean, the odds of mean - std, the logit.
    softmax_0 = [math.exp(d[0][0]) / sum(math.exp(x) for x in d[0]) for d in draws.tolist()]
    assert _sigmoid(measures["mc_mean"][0]) == pytest.approx(np.mean(softmax_0))
    lower = np.mean(softmax_0) - np.std(softmax_0)
    assert measures["mc_lower_bound"][0] == pytest.approx(lower / (1 - lower))
    assert _sigmoid(measures["magnitude"][0]) == pytest.approx(math.exp(3) / (math.exp(3) + math.exp(1) + 2))


def test_answers_whose_probability_rounds_to_one_still_rank_by_their_logits():
    # Each top-1 answer leads by 20 to 40: its float32 softmax probability is exactly 1 with the means and
    # in every draw, so ranking by probability would make the four one tie.
    lead = torch.tensor([40.0, 20.0, 35.0, 25.0])
    mean = torch.stack([lead, torch.zeros(4), torch.zeros(4)], 1)
    draws = torch.stack([mean + 0.5, mean - 0.5])
    answers = _answers(mean, draws, torch.tensor([0, 1, 0, 1]), softmax=True)  # right: the leads 40 and 35
    assert (torch.softmax(mean, 1)[:, 0] == 1).all()
    for name, confidence in uncertainty.probability_confidences(answers.magnitude, answers.logits).items():
        assert np.argsort(-confidence).tolist() == [0, 2, 3, 1], name
    link = uncertainty.link_confidences(answers)
    for name in ("magnitude", "mc_mean", "mc_lower_bound"):
        precision = uncertainty.precision_at_coverage(link[name], answers.correct, num_points=4)
        np.testing.assert_allclose(precision, [1, 1, 2 / 3, 1 / 2], err_msg=name)


def test_answers_first_in_every_draw_rank_by_their_mean_probability_not_as_one_tie():
    # Queries 0-2 keep their answer first in both draws (stability 1, rank variance 0, reciprocal rank 1),
    # with mean probabilities high, low, middle; query 3 falls to rank 2 in one draw.
    mean = torch.tensor([[6.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    draws = torch.stack([mean, torch.tensor([[6.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 9.0, 0.0]])])
    answers = _answers(mean, draws, torch.tensor([0, 1, 0, 0]), softmax=True)  # query 1 is wrong
    measures = uncertainty.link_confidences(answers)
    for name in ("stability", "rank_variance", "mc_reciprocal_rank"):
        assert measures[name].tolist() == [4.0, 2.0, 3.0, 1.0], name
        # The wrong answer, least sure of the three tied ones, comes after both right ones.
        precision = uncertainty.precision_at_coverage(measures[name], answers.correct, num_points=4)
        np.testing.assert_allclose(precision, [1, 1, 2 / 3, 3 / 4], err_msg=name)


def test_the_lexicographic_key_orders_by_the_first_then_the_second_and_keeps_full_ties():
    primary = np.array([0.5, 1.0, 1.0, 0.5, 1.0, 0.5])
    secondary = np.array([3.0, 2.0, np.nan, 3.0, 7.0, -1.0])
    key = uncertainty.lexicographic_key(primary, secondary)
    assert key.tolist() == [2.0, 4.0, 3.0, 2.0, 5.0, 1.0]  # NaN lowest; equal in both share a key
    assert uncertainty.lexicographic_key(np.zeros(0), np.zeros(0)).tolist() == []
    assert uncertainty.lexicographic_key([np.nan, 0.0], [0.0, 0.0]).tolist() == [1.0, 2.0]  # NaN lowest


def test_queries_with_the_same_ranks_in_other_draws_tie_before_their_mean_probability():
    # Ranks 1, 3, 7 and 3, 7, 1: the same variance and mean reciprocal rank (summed in draw order, 1/1 + 1/3
    # + 1/7 and 1/3 + 1/7 + 1/1 differ in the last bit).
    ranks = np.array([[1.0, 3.0], [3.0, 7.0], [7.0, 1.0]])
    logits = np.array([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])  # query 0's mean probability is higher
    answers = uncertainty.TopAnswers(np.zeros(2, int), np.ones(2, bool), np.zeros(2), logits, ranks)
    measures = uncertainty.link_confidences(answers)
    for name in ("stability", "rank_variance", "mc_reciprocal_rank"):
        assert measures[name].tolist() == [2.0, 1.0], name


def test_answer_probability_and_rank_ignore_excluded_candidates_and_count_ties_by_halves():
    scores = torch.tensor([[2.0, -torch.inf, 2.0, 0.0]])
    answer = torch.tensor([0])
    assert uncertainty.answer_rank(scores, answer).item() == 1.5  # tied with one other: not top
    expected = math.exp(2) / (2 * math.exp(2) + 1)  # the excluded candidate takes no mass
    softmax_logit = uncertainty.answer_logit(scores, answer, softmax=True).item()
    assert _sigmoid(softmax_logit) == pytest.approx(expected)
    assert uncertainty.answer_logit(scores, answer, softmax=False).item() == 2.0  # sigmoid(score)'s logit
    lone = torch.tensor([[1.0, -torch.inf]])  # no other candidate: probability 1
    assert uncertainty.answer_logit(lone, answer, softmax=True).item() == math.inf


def test_a_point_model_has_only_magnitude():
    empty = np.zeros((0, 2))
    answers = uncertainty.TopAnswers(np.zeros(2, int), np.ones(2, bool), np.full(2, 0.5), empty, empty)
    assert set(uncertainty.link_confidences(answers)) == {"magnitude"}


def _brute_force(model, facts, known, num_samples, seed):
    """Per table (the means, then each draw): every query's candidate scores, computed one candidate at a
    time, with the query's other known answers at -inf; and the query's answer."""
    assert model.bias is None  # no relation bias to add
    ents, rels = model.entities.full(), model.relations.full()
    generator = torch.Generator().manual_seed(seed)
    tables = [(ents.mean, rels.mean)] + [(ents.sample(generator), rels.sample(generator)) for _ in range(num_samples)]
    known_set = {tuple(f) for f in known.tolist()}
    per_table = []
    for entity, relation in tables:
        rows = []
        for direction in ("tail", "head"):
            for s, r, o in facts.tolist():
                answer, scores = (o if direction == "tail" else s), []
                for c in range(len(entity)):
                    fact = (s, r, c) if direction == "tail" else (c, r, o)
                    if direction == "head" and model.reciprocal:  # scored as (o, r^-1, c)
                        score = model.scorer.score(entity[o], relation[r + model.num_relations], entity[c])
                    else:
                        score = model.scorer.score(entity[fact[0]], relation[r], entity[fact[2]])
                    scores.append(-math.inf if c != answer and fact in known_set else score.item())
                rows.append((scores, answer))
        per_table.append(rows)
    return per_table


@pytest.mark.parametrize("likelihood", ["softmax", "bernoulli"])
def test_top_answers_match_a_brute_force_and_do_not_depend_on_the_batch(tiny_dataset, likelihood):
    model = build_model(make_config(f"objective.likelihood={likelihood}"), tiny_dataset.num_entities,
                        tiny_dataset.num_relations)  # fmt: skip
    known = tiny_dataset.all_known()
    filters = build_filters(known, tiny_dataset.num_relations)
    facts = torch.cat([tiny_dataset.test, tiny_dataset.valid])
    got = uncertainty.top_answers(model, facts, filters, num_samples=4, seed=3)
    one_at_a_time = uncertainty.top_answers(model, facts, filters, num_samples=4, seed=3, cells=1)
    for field in ("top", "correct", "ranks"):
        np.testing.assert_array_equal(getattr(got, field), getattr(one_at_a_time, field))
    for field in ("magnitude", "logits"):  # float32 products of another shape: equal to rounding
        np.testing.assert_allclose(getattr(got, field), getattr(one_at_a_time, field), rtol=1e-6, atol=1e-6)
    tables = _brute_force(model, facts, known, 4, seed=3)
    softmax = likelihood == "softmax"
    for q, (scores, answer) in enumerate(tables[0]):
        top = int(np.argmax(scores))
        assert got.top[q] == top and got.correct[q] == (top == answer)
        for k, table in enumerate(tables):
            drawn = torch.tensor(table[q][0])
            p = (drawn.double().softmax(0)[top] if softmax else drawn[top].double().sigmoid()).item()
            assert _sigmoid(got.magnitude[q] if k == 0 else got.logits[k - 1, q]) == pytest.approx(p, rel=1e-5)
            if k:
                finite = drawn[drawn > -math.inf]
                rank = 1 + (finite > drawn[top]).sum().item() + ((finite == drawn[top]).sum().item() - 1) / 2
                assert got.ranks[k - 1, q] == rank
    assert got.logits.shape == got.ranks.shape == (4, 2 * len(facts))


def test_the_bootstrap_interval_is_above_zero_for_a_clearly_better_measure():
    rng = np.random.default_rng(0)
    correct = rng.random(400) < 0.5
    sharp = correct + rng.normal(0, 0.3, 400)  # ranks right answers first nearly always
    vague = correct + rng.normal(0, 3.0, 400)
    result = uncertainty.area_differences({"magnitude": vague, "sharp": sharp}, correct, resamples=300, seed=0)
    lo, hi = result["sharp"]["interval"]
    assert 0 < lo <= result["sharp"]["difference"] <= hi


def test_the_bootstrap_interval_contains_zero_for_equally_good_measures():
    rng = np.random.default_rng(1)
    correct = rng.random(400) < 0.5
    a, b = (correct + rng.normal(0, 1.0, 400) for _ in range(2))  # same quality, independent noise
    result = uncertainty.area_differences({"magnitude": a, "same": a.copy(), "other": b}, correct, resamples=300)
    assert result["same"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    lo, hi = result["other"]["interval"]
    assert lo < 0 < hi


def test_the_pooled_difference_is_the_mean_over_models_resampled_alike():
    rng = np.random.default_rng(2)
    correct = rng.random((3, 200)) < 0.5
    base, better = correct + rng.normal(0, 2.0, (3, 200)), correct + rng.normal(0, 0.5, (3, 200))
    pooled = uncertainty.area_differences({"magnitude": base, "better": better}, correct, resamples=50, seed=4)
    each = [uncertainty.area_differences({"magnitude": base[k], "better": better[k]}, correct[k], resamples=0)
            for k in range(3)]  # fmt: skip
    assert pooled["better"]["difference"] == pytest.approx(np.mean([e["better"]["difference"] for e in each]))
    again = uncertainty.area_differences({"magnitude": base, "better": better}, correct, resamples=50, seed=4)
    assert again == pooled  # seeded


def test_contour_levels_exclude_zero():
    points = np.random.default_rng(0).normal(size=(1000, 2))
    grid = np.linspace(-40, 40, 120)  # far tails underflow to exactly 0
    density = uncertainty.kde_2d(points, grid, grid)
    assert (density == 0).any()
    levels = uncertainty.contour_levels(density)
    assert len(levels) == 5 and (levels > 0).all() and (np.diff(levels) > 0).all()
    assert levels.max() < density.max()
    assert len(uncertainty.contour_levels(np.zeros((3, 3)))) == 0
