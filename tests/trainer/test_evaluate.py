import pytest
import torch

from tests.trainer.conftest import make_config
from trainer.evaluate import FilterIndex, build_filters, evaluate, predictive_scores
from trainer.model import build_model


def _fact(s, r, o, direction, candidate):
    return (s, r, candidate) if direction == "tail" else (candidate, r, o)


def brute_force_ranks(model, facts, known, filtered):
    """Rank every fact's tail and head by scoring each candidate on its own, with Python loops."""
    ent, rel = model.entities.full().mean, model.relations.full().mean
    known_set = {tuple(f) for f in known.tolist()}
    ranks = []
    for s, r, o in facts.tolist():
        for direction in ("tail", "head"):
            candidates = [_fact(s, r, o, direction, c) for c in range(len(ent))]
            scores = [model.scorer.score(ent[h], rel[rr], ent[t]).item() for h, rr, t in candidates]
            true = o if direction == "tail" else s
            better = equal = 0
            for c, score in enumerate(scores):
                if filtered and c != true and candidates[c] in known_set:
                    continue
                better += score > scores[true]
                equal += score == scores[true]
            ranks.append((1 + better + better + equal) / 2)  # mean of optimistic and pessimistic
    return torch.tensor(ranks, dtype=torch.float64)


@pytest.mark.parametrize("scorer", ["distmult", "complex"])
def test_filtered_and_raw_ranks_match_brute_force_with_ties(tiny_dataset, scorer):
    config = make_config(f"model.scorer={scorer}", "objective.likelihood=bernoulli")
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations)
    # Small integer embeddings make many candidates tie exactly.
    g = torch.Generator().manual_seed(0)
    model.entities.full().mean.copy_(torch.randint(-1, 2, model.entities.full().mean.shape, generator=g).float())
    model.relations.full().mean.copy_(torch.randint(-1, 2, model.relations.full().mean.shape, generator=g).float())
    known = tiny_dataset.all_known()
    facts = torch.cat([tiny_dataset.test, tiny_dataset.valid])
    got = evaluate(model, facts, build_filters(known, tiny_dataset.num_relations), batch_size=3)
    for kind, filtered in (("raw", False), ("filtered", True)):
        ranks = brute_force_ranks(model, facts, known, filtered)
        assert got[kind]["mr"] == pytest.approx(ranks.mean().item())
        assert got[kind]["mrr"] == pytest.approx(ranks.reciprocal().mean().item())
        assert got[kind]["hits@1"] == pytest.approx((ranks <= 1).double().mean().item())
        assert got[kind]["hits@3"] == pytest.approx((ranks <= 3).double().mean().item())


def test_constant_scores_get_the_middle_rank_not_rank_one(tiny_dataset):
    config = make_config("model.scorer=distmult", "objective.likelihood=bernoulli")
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations)
    model.entities.full().mean.zero_()  # every score is 0
    facts = tiny_dataset.test
    got = evaluate(model, facts, build_filters(facts, tiny_dataset.num_relations))
    num_entities = tiny_dataset.num_entities
    assert got["raw"]["mr"] == pytest.approx((num_entities + 1) / 2)
    assert got["raw"]["hits@1"] == 0.0


def test_filter_index_finds_every_known_answer():
    g = torch.Generator().manual_seed(1)
    keys = torch.randint(0, 7, (50,), generator=g)
    answers = torch.randint(0, 20, (50,), generator=g)
    index = FilterIndex(keys, answers)
    queries = torch.tensor([3, 0, 6, 3, 9])
    rows, found = index.known(queries)
    got = {(int(r), int(a)) for r, a in zip(rows, found, strict=True)}
    expected = {(i, int(a)) for i, q in enumerate(queries) for k, a in zip(keys, answers, strict=True) if k == q}
    assert got == expected


def test_sampled_evaluation_averages_probabilities(tiny_dataset):
    config = make_config("objective.likelihood=softmax")
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations)
    filters = build_filters(tiny_dataset.all_known(), tiny_dataset.num_relations)
    a = evaluate(model, tiny_dataset.test, filters, num_samples=4, seed=1)
    b = evaluate(model, tiny_dataset.test, filters, num_samples=4, seed=1)
    assert a == b  # seeded
    model.entities.full().logvar.fill_(-30.0)  # vanishing variance: samples collapse onto the means
    model.relations.full().logvar.fill_(-30.0)
    sampled = evaluate(model, tiny_dataset.test, filters, num_samples=2)
    means = evaluate(model, tiny_dataset.test, filters, num_samples=0)
    assert sampled["filtered"]["mr"] == pytest.approx(means["filtered"]["mr"])


def test_reciprocal_head_queries_use_the_inverse_relation(tiny_dataset):
    config = make_config("objective.likelihood=softmax", "model.scorer=distmult")
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations)
    assert model.relations.num_rows == 2 * tiny_dataset.num_relations
    ent, rel = model.entities.full().mean, model.relations.full().mean
    scores = predictive_scores(model, torch.tensor([3]), torch.tensor([0]), "head", num_samples=0, seed=0)
    expected = torch.stack([model.scorer.score(ent[3], rel[0 + 2], ent[c]) for c in range(6)])
    torch.testing.assert_close(scores[0], expected)
    assert scores.shape == (1, 6)
