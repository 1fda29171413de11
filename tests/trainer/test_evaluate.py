import json

import pytest
import torch

from storage.dataset import open_dataset
from tests.trainer.conftest import make_config
from trainer.config import EvalConfig
from trainer.evaluate import (
    BYTES_PER_PAIR,
    CandidateSampler,
    FilterIndex,
    build_filters,
    evaluate,
    evaluate_split,
    evaluation_cost,
    exact_batch_size,
    predictive_scores,
    rank_filters,
    sample_facts,
    summarise,
)
from trainer.loop import train
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


def _tied_model(dataset, scorer):
    """A model whose small integer embeddings make many candidates tie exactly."""
    config = make_config(f"model.scorer={scorer}", "objective.likelihood=bernoulli")
    model = build_model(config, dataset.num_entities, dataset.num_relations)
    g = torch.Generator().manual_seed(0)
    for table in (model.entities.full(), model.relations.full()):
        table.mean.copy_(torch.randint(-1, 2, table.mean.shape, generator=g).float())
    return model


@pytest.mark.parametrize("scorer", ["distmult", "complex"])
def test_filtered_and_raw_ranks_match_brute_force_with_ties(tiny_dataset, scorer):
    model = _tied_model(tiny_dataset, scorer)
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


@pytest.fixture(scope="module")
def nations(tmp_path_factory):
    return open_dataset("nations", cache_dir=tmp_path_factory.mktemp("cache"))


def _sampled(uniform: int, degree: int = 0, **extra) -> EvalConfig:
    return EvalConfig(protocol="sampled", uniform_candidates=uniform, degree_candidates=degree, **extra)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.scorer=distmult", "objective.likelihood=bernoulli"),
        ("model.scorer=complex", "objective.likelihood=softmax"),
    ],
)
def test_sampled_evaluation_with_every_entity_is_the_exact_one(nations, overrides):
    config = make_config("model.dim=8", *overrides)
    model = build_model(config, nations.num_entities, nations.num_relations)
    filters = rank_filters(nations, (0, nations.num_entities))
    exact = evaluate_split(EvalConfig(batch_size=64), 0, model, nations, nations.valid, filters, final=False)
    for uniform, degree in ((nations.num_entities, 0), (3, nations.num_entities), (10**6, 0)):
        cfg = _sampled(uniform, degree, batch_size=64)
        assert evaluate_split(cfg, 0, model, nations, nations.valid, filters, final=False) == exact
    # Not only the shortcut: every entity drawn once, through the sampled path's columns and weights.
    every = _EveryEntityDrawn(nations.num_entities, (0, nations.num_entities), num_uniform=1, num_degree=0,
                              frequency=None, seed=0)  # fmt: skip
    assert evaluate(model, nations.valid, filters, batch_size=64, candidates=every) == exact


class _EveryEntityDrawn(CandidateSampler):
    every_entity = False

    def local(self, batch: int, side: int) -> torch.Tensor:
        return torch.arange(self.num_entities)


def _brute_force_sampled(model, facts, known, sampler, batch_size):
    """Rank each answer against its batch's drawn candidates one score at a time."""
    ent, rel = model.entities.full().mean, model.relations.full().mean
    known_set = {tuple(f) for f in known.tolist()}
    ranks = {"raw": [], "filtered": []}
    for index, batch in enumerate(facts.split(batch_size)):
        drawn = {side: sampler.local(index, side).tolist() for side in (0, 1)}
        for side, direction in ((0, "tail"), (1, "head")):  # evaluate's order: every tail, then every head
            for s, r, o in batch.tolist():
                true = o if direction == "tail" else s
                score = {}
                for c in (*drawn[side], true):
                    h, _, t = _fact(s, r, o, direction, c)
                    score[c] = model.scorer.score(ent[h], rel[r], ent[t]).item()
                for kind in ranks:
                    keep = [
                        c for c in drawn[side]
                        if c != true and not (kind == "filtered" and _fact(s, r, o, direction, c) in known_set)
                    ]  # fmt: skip
                    better = sum(score[c] > score[true] for c in keep)
                    equal = sum(score[c] == score[true] for c in keep)
                    ranks[kind].append(1 + better + equal / 2)
    return {kind: torch.tensor(values, dtype=torch.float64) for kind, values in ranks.items()}


@pytest.mark.parametrize(("uniform", "degree"), [(4, 0), (0, 5), (2, 3)])
def test_sampled_ranks_match_brute_force_with_ties(tiny_dataset, uniform, degree):
    model = _tied_model(tiny_dataset, "distmult")
    known = tiny_dataset.all_known()
    facts = torch.cat([tiny_dataset.test, tiny_dataset.valid])
    sampler = CandidateSampler(
        tiny_dataset.num_entities, (0, tiny_dataset.num_entities), num_uniform=uniform, num_degree=degree,
        frequency=tiny_dataset.entity_frequency, seed=3,
    )  # fmt: skip
    got = evaluate(model, facts, build_filters(known, tiny_dataset.num_relations), batch_size=3, candidates=sampler)
    expected = _brute_force_sampled(model, facts, known, sampler, batch_size=3)
    for kind, ranks in expected.items():
        assert got[kind] == pytest.approx(summarise(ranks))


def test_degree_candidates_follow_training_frequency_and_not_the_sharding():
    frequency = torch.tensor([5, 0, 1, 0, 30, 2, 2, 0, 60])
    whole = CandidateSampler(9, (0, 9), num_uniform=7, num_degree=4000, frequency=frequency, seed=1)
    drawn = whole.local(2, 1)
    counts = torch.bincount(drawn[7:], minlength=9).double()
    assert counts[frequency == 0].sum() == 0
    torch.testing.assert_close(counts / counts.sum(), frequency.double() / frequency.sum(), atol=0.03, rtol=0)
    # Two shards keep between them exactly the candidates one process draws.
    parts = [
        CandidateSampler(9, (lo, hi), num_uniform=7, num_degree=4000, frequency=frequency, seed=1).local(2, 1) + lo
        for lo, hi in ((0, 4), (4, 9))
    ]
    assert torch.equal(torch.cat(parts).sort().values, drawn.sort().values)


def test_filter_contains_matches_a_set_and_a_sharded_filter_keeps_its_answers():
    g = torch.Generator().manual_seed(2)
    facts = torch.stack([torch.randint(0, 5, (300,), generator=g), torch.randint(0, 3, (300,), generator=g),
                         torch.randint(0, 40, (300,), generator=g)], dim=1)  # fmt: skip
    known = {tuple(f) for f in facts.tolist()}
    index = build_filters(facts, 3)["tail"]
    queries_B = torch.tensor([[0, 1], [4, 2], [3, 0], [9, 9]])
    answers_BC = torch.randint(0, 40, (4, 25), generator=g)
    got = index.contains(queries_B[:, 0] * 3 + queries_B[:, 1], answers_BC)
    expected = [
        [(s, r, int(a)) in known for a in row] for (s, r), row in zip(queries_B.tolist(), answers_BC, strict=True)
    ]
    assert got.tolist() == expected
    shard = build_filters(facts, 3, answer_range=(10, 20))
    assert ((shard["tail"].answers >= 10) & (shard["tail"].answers < 20)).all()
    assert ((shard["head"].answers >= 10) & (shard["head"].answers < 20)).all()
    assert len(shard["tail"].keys) == int(((facts[:, 2] >= 10) & (facts[:, 2] < 20)).sum())


def test_fact_sample_is_seeded_and_in_stored_order(nations):
    a, b = sample_facts(nations.valid, 50, seed=4), sample_facts(nations.valid, 50, seed=4)
    assert torch.equal(a, b) and len(a) == 50
    assert not torch.equal(a, sample_facts(nations.valid, 50, seed=5))
    assert sample_facts(nations.valid, None, seed=4) is nations.valid


def test_block_noise_is_the_dense_noise_of_those_rows():
    config = make_config("sharding.block_rows=4")
    model = build_model(config, 14, 2)
    rows = torch.tensor([13, 0, 5, 5, 9])
    dense = model.entities.dense_noise((1, 2))
    torch.testing.assert_close(model.entities.block_noise(rows, (1, 2)), dense[rows], rtol=0, atol=0)


def test_evaluation_cost_by_hand():
    exact = evaluation_cost(num_entities=1000, dim=10, workers=4, facts=20, candidates=None, batch=8, known_facts=400)
    assert exact.pairs == 2 * 20 * 250 and exact.flops == 2 * 10 * exact.pairs
    assert exact.batch_bytes == BYTES_PER_PAIR["exact"] * 8 * 250
    assert exact.filter_bytes == 2 * 16 * 100
    sampled = evaluation_cost(num_entities=1000, dim=10, workers=4, facts=20, candidates=92, batch=8, known_facts=400)
    assert sampled.pairs == 2 * 20 * 25 and sampled.batch_bytes == BYTES_PER_PAIR["sampled"] * 8 * 25
    assert sampled.seconds(pairs_per_second=100.0) == 10.0
    assert evaluation_cost(num_entities=1000, dim=10, workers=4, facts=20, candidates=1000, batch=8,
                           known_facts=400) == exact  # fmt: skip


@pytest.mark.parametrize("likelihood", ["bernoulli", "softmax"])
def test_sampled_candidates_with_vanishing_variance_rank_as_the_means(nations, likelihood):
    config = make_config(f"objective.likelihood={likelihood}", "model.dim=8")
    model = build_model(config, nations.num_entities, nations.num_relations)
    model.entities.full().logvar.fill_(-30.0)
    model.relations.full().logvar.fill_(-30.0)
    filters = rank_filters(nations, (0, nations.num_entities))
    means = evaluate_split(_sampled(4, 3, batch_size=32), 0, model, nations, nations.test, filters, final=False)
    sampled = _sampled(4, 3, batch_size=32, num_samples=2, final_protocol="sampled")
    probabilities = evaluate_split(sampled, 0, model, nations, nations.test, filters, final=True)
    for kind in ("raw", "filtered"):
        assert probabilities[kind] == pytest.approx(means[kind])


def test_a_run_records_which_protocol_its_numbers_come_from(tmp_path, tiny_dataset):
    config = make_config(
        "train.epochs=2", "train.eval_every=1", "eval.protocol=sampled", "eval.uniform_candidates=3",
        "eval.final_max_facts=1",
    )  # fmt: skip
    metrics = train(config, tmp_path, tiny_dataset)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["valid_protocol"] for r in records] == ["sampled", "sampled"]
    assert metrics["protocol"]["max_facts"] == 1
    assert metrics["protocol"]["facts"] == {"valid": 1, "test": 1}


def test_a_score_budget_shrinks_exact_batches_without_changing_a_rank(nations):
    config = make_config("model.dim=8", "objective.likelihood=softmax")
    model = build_model(config, nations.num_entities, nations.num_relations)
    filters = rank_filters(nations, (0, nations.num_entities))
    wide = evaluate_split(EvalConfig(batch_size=512), 0, model, nations, nations.valid, filters, final=False)
    # 14 entities' worth of cells: 1 query per step.
    assert exact_batch_size(512, nations.num_entities, 14 * BYTES_PER_PAIR["exact"] * nations.num_entities // 14) == 1
    narrow = evaluate(model, nations.valid, filters, batch_size=512, max_score_bytes=3 * BYTES_PER_PAIR["exact"] * 14)
    for kind in ("raw", "filtered"):
        for key, value in wide[kind].items():
            assert narrow[kind][key] == pytest.approx(value, rel=1e-6), (kind, key)
    assert exact_batch_size(512, 10_800_000, 2048 << 20) == 12  # a Freebase shard under the default budget
