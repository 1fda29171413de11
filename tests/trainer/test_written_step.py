"""The written training step (``KGModel.forward_backward`` without tracing) against the traced one."""

import pytest
import torch

from sharding.exchange import LocalExchange
from sharding.kernels import native
from storage.dataset import load_data
from trainer.config import load_config
from trainer.loop import Training
from trainer.model import KGModel, build_model
from trainer.objective import kl_share

BASE = [
    "data.dataset=kinships", "model.dim=16", "objective.likelihood=bernoulli", "objective.kl_estimator=per_occurrence",
    "objective.num_negatives=10", "objective.negative_chunk=16", "train.batch_size=512", "train.eval_every=0",
    "train.progress=false", "train.num_threads=1",
]  # fmt: skip


def _config(*overrides: str):
    return load_config(None, [*BASE, *overrides])


def _trained(config, tmp_path, written: bool, steps: int = 12, kl_multiplier: float = 0.7):
    """(each step's terms, the model) after ``steps`` steps, with the gradients written out or traced."""
    config.train.written_gradients = written
    out = tmp_path / ("written" if written else "traced")
    run = Training.set_up(config, out, load_data(config.data), LocalExchange(), None)
    assert run.model.writes_gradients == written
    terms, total = [], run.schedule.num_steps
    for i, batches in enumerate(run.schedule.epoch(0)):
        if i == steps:
            break
        terms.append(run.step(batches, kl_share(i, total, "uniform"), kl_multiplier, (0, 0, i)))
    return terms, run.model


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.scorer=distmult", "optim.optimizer=adam", "objective.relation_bias=true"],
        ["model.latent=point", "objective.relation_bias=true"],
        ["model.prior=1/dim"],  # the owners sample with torch ops (the kernel's KL is to N(0, I))
        ["sharding.streams=2"],  # two batches a step share the relations' sample
        # Their gradients added in the order the engine adds them.
        ["sharding.streams=3", "train.batch_size=510", "objective.relation_bias=true"],
        ["model.latent=point", "sharding.streams=2", "objective.relation_bias=true"],
    ],
    ids=[
        "lim-complex",
        "lim-distmult-adam-bias",
        "point-bias",
        "prior",
        "two-streams",
        "three-streams-bias",
        "point-two-streams-bias",
    ],
)
def test_the_written_step_is_the_traced_step_bit_for_bit(tmp_path, overrides):
    assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    config = _config(*overrides)
    written_terms, written = _trained(config, tmp_path, True)
    traced_terms, traced = _trained(config, tmp_path, False)
    assert written_terms == traced_terms
    tables = [
        (written.entities.weight, traced.entities.weight),
        (written.relations.table.weight, traced.relations.table.weight),
    ]
    if written.bias is not None and traced.bias is not None:
        tables.append((written.bias.table.weight, traced.bias.table.weight))
    for a, b in tables:
        assert torch.equal(a, b)
    assert not torch.equal(written.entities.weight, _trained(config, tmp_path / "x", True, steps=0)[1].entities.weight)


def test_a_stream_that_ran_out_is_an_empty_batch_both_ways(tmp_path):
    """The schedule gives a stream that ran out an empty batch; its owners still serve it (no rows), its NLL and
    KL are 0, and the written step takes it as the traced one does."""
    config = _config("sharding.streams=2", "objective.relation_bias=true")
    results = []
    for written in (True, False):
        config.train.written_gradients = written
        run = Training.set_up(config, tmp_path / str(written), load_data(config.data), LocalExchange(), None)
        assert run.model.writes_gradients == written
        (stream, positives), (other, _) = next(iter(run.schedule.epoch(0)))
        batches = [(stream, positives), (other, torch.empty(0, 3, dtype=torch.int64))]
        results.append((run.step(batches, 0.1, 0.7, (0, 0, 0)), run.model))
    (written_terms, written), (traced_terms, traced) = results
    assert written_terms == traced_terms and written_terms.nll > 0
    assert torch.equal(written.entities.weight, traced.entities.weight)
    assert torch.equal(written.relations.table.weight, traced.relations.table.weight)


def test_the_step_is_written_only_where_it_computes_the_same(monkeypatch):
    def writes(*overrides: str) -> bool:
        config = _config(*overrides)
        data = load_data(config.data)
        model = build_model(config, data.num_entities, data.num_relations, entity_frequency=data.entity_frequency)
        assert isinstance(model, KGModel)
        return model.writes_gradients

    assert writes() and writes("model.latent=point") and writes("objective.relation_bias=true")
    for traced in (
        ["train.written_gradients=false"],
        ["objective.likelihood=softmax"],
        ["objective.likelihood=sampled_softmax"],
        ["model.latent=lfm"],
        ["objective.kl_estimator=full"],
        ["objective.reg=n3", "objective.reg_weight=0.01"],
        ["objective.adversarial_temperature=1"],
        ["objective.exclude_positives=true"],
    ):
        assert not writes(*traced), traced
    monkeypatch.setenv("NVKG_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert not writes()  # no kernels: the torch ops trace it
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
