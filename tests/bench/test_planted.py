"""The planted graph: its sampler follows the model, its ceiling equals a brute-force ranking, its files stream."""

from pathlib import Path

import numpy as np
import pytest

from bench.planted import PlantedModel, PlantedSpec, ceiling, known_answers, planted_ranks, write_planted
from storage.convert import ConvertOptions
from storage.dataset import open_dataset
from storage.layout import Manifest
from storage.reader import TripleStore

TINY = PlantedSpec(num_entities=300, num_triples=4000, num_relations=5, num_eval=60, num_clusters=8, rank=4)


def brute_force_ranks(model: PlantedModel, facts: np.ndarray, known: set[tuple[int, int, int]]) -> dict:
    """Every entity scored as cluster score + log pop, ranked as trainer/evaluate.py ranks."""
    ranks: dict[str, list[float]] = {"raw": [], "filtered": []}
    everyone = np.arange(model.spec.num_entities)
    for direction, true_col in (("tail", 2), ("head", 0)):
        cs_BC = model.cluster_scores(facts, direction)
        for i, (h, r, t) in enumerate(facts.tolist()):
            scores = cs_BC[i, model.cluster_E] + model.log_pop_E
            true = (h, r, t)[true_col]
            other = everyone != true
            candidates = [(h, r, e) if direction == "tail" else (e, r, t) for e in everyone.tolist()]
            unknown = np.array([fact not in known for fact in candidates])
            better, equal = scores > scores[true], scores == scores[true]
            ranks["raw"].append(1 + (better & other).sum() + (equal & other).sum() / 2)
            ranks["filtered"].append(1 + (better & other & unknown).sum() + (equal & other & unknown).sum() / 2)
    return {kind: np.array(values) for kind, values in ranks.items()}


OPTIONS = ConvertOptions(partition_rows=1500, row_group_rows=500)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("planted") / "graph"
    _, held_out = write_planted(out, TINY, chunk_rows=1000, options=OPTIONS)
    return out, held_out


@pytest.fixture(scope="module")
def tiny(written) -> Path:
    return written[0]


def test_fast_ceiling_equals_brute_force(tiny):
    model, store = PlantedModel(TINY), TripleStore(tiny)
    facts = store.read_split("test")
    known = {tuple(row) for split in ("train", "valid", "test") for row in store.read_split(split).tolist()}
    fast = planted_ranks(model, facts, known_answers(store, facts))
    slow = brute_force_ranks(model, facts, known)
    for kind in ("raw", "filtered"):
        np.testing.assert_array_equal(fast[kind], slow[kind])
    assert (fast["filtered"] < fast["raw"]).any()  # the filter did remove something
    metrics = ceiling(model, store)
    assert metrics["planted"]["filtered"]["mrr"] == pytest.approx(np.mean(1 / slow["filtered"]))
    assert metrics["planted"]["filtered"]["mrr"] > metrics["popularity"]["filtered"]["mrr"]


def test_all_alike_ranks_at_the_middle():
    """No popularity and no affinity: every candidate ties, so every rank is (N + 1) / 2."""
    spec = PlantedSpec(num_entities=40, num_triples=40, num_relations=3, num_clusters=4, beta=0, entity_exponent=0)
    model = PlantedModel(spec)
    ranks = planted_ranks(model, model.facts("test", 0, 10), None)["raw"]
    np.testing.assert_array_equal(ranks, np.full(20, 20.5))


def test_sampler_follows_the_model():
    spec = PlantedSpec(num_entities=400, num_triples=400, num_relations=2, num_clusters=4, rank=2, beta=3)
    model = PlantedModel(spec)
    facts = model.facts("valid", 0, 200_000)
    h_cluster, r, t_cluster = model.cluster_E[facts[:, 0]], facts[:, 1], model.cluster_E[facts[:, 2]]
    expected_r = np.diff(model.cum_relation, prepend=0.0)
    np.testing.assert_allclose(np.bincount(r) / len(r), expected_r, atol=0.005)
    pop_C = np.exp(model.log_pop_C - np.log(np.exp(model.log_pop_C).sum()))
    np.testing.assert_allclose(np.bincount(h_cluster, minlength=4) / len(r), pop_C, atol=0.005)
    for c, rel in ((0, 0), (3, 1)):
        rows = (h_cluster == c) & (r == rel)
        logits = model.affinity_CRC[c, rel] + model.log_pop_C
        np.testing.assert_allclose(
            np.bincount(t_cluster[rows], minlength=4) / rows.sum(), np.exp(logits) / np.exp(logits).sum(), atol=0.02
        )


def test_streamed_files_do_not_depend_on_the_chunk_size(tiny, tmp_path):
    write_planted(tmp_path / "g", TINY, chunk_rows=777, options=OPTIONS)
    assert Manifest.read(tmp_path / "g").files == Manifest.read(tiny).files


def test_dataset_has_the_requested_counts(written, tmp_path):
    tiny, held_out = written
    manifest = Manifest.read(tiny)
    assert manifest.source["planted"]["num_triples"] == TINY.num_triples
    dataset = open_dataset(tiny, cache_dir=tmp_path)
    assert (dataset.num_entities, dataset.num_relations) == (TINY.num_entities, TINY.num_relations)
    assert bool((dataset.entity_frequency > 0).all())  # every entity occurs in train (its covering fact)
    assert dataset.dropped == {"valid": 0, "test": 0}
    train = manifest.splits["train"]
    assert train.lines + held_out == TINY.num_triples and held_out > 0
    assert train.triples == train.lines - train.duplicates == len(dataset.train) > TINY.num_entities
    for split in ("valid", "test"):
        assert manifest.splits[split].lines == TINY.num_eval
    train_keys = {tuple(f) for f in dataset.train.tolist()}
    assert not any(tuple(f) in train_keys for f in dataset.test.tolist())  # held-out facts left out of train


def test_spec_is_checked():
    with pytest.raises(ValueError, match="num_entities <= num_triples"):
        PlantedModel(PlantedSpec(num_entities=100, num_triples=50, num_clusters=4))
