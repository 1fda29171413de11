"""The step's check of its loss and gradients, on the written path (the compiled Bernoulli kernel) and the
traced one, and how an epoch's steps meet the garbage collector."""

import gc
import weakref

import pytest
import torch

from tests.trainer.conftest import TINY_TRAIN, make_config
from trainer.loop import young_objects_collected
from trainer.model import build_model
from trainer.step import Divergence, Step


@pytest.mark.parametrize("written", [True, False])
def test_a_gradient_that_overflows_under_a_finite_loss_stops_the_step_before_any_update(tiny_dataset, written):
    """Relations zero in their first complex number and entities 3e38 there: every score adds 0 * 3e38, so
    the loss is finite, while the queries' gradients sum 3e38 over the negatives past the float range. The
    step says "gradient" and leaves the tables as they were."""
    config = make_config(
        "model.latent=point", "objective.likelihood=bernoulli", "objective.num_negatives=4",
        f"train.written_gradients={str(written).lower()}", "optim.lr=0.1",
    )  # fmt: skip
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations)
    assert model.writes_gradients == written
    with torch.no_grad():
        model.entities.weight[:, 0] = 3e38
        model.relations.table.weight[:, :2] = 0.0
    before = model.entities.weight.clone(), model.relations.table.weight.clone()
    with pytest.raises(Divergence, match="non-finite gradient"):
        Step(model)([(0, TINY_TRAIN)], 1.0, 1.0, (0, 0, 0))
    assert torch.equal(model.entities.weight, before[0]) and torch.equal(model.relations.table.weight, before[1])


def test_a_finite_step_reports_its_terms_and_a_non_finite_loss_says_so(tiny_dataset):
    config = make_config("model.latent=lim", "objective.likelihood=bernoulli", "objective.kl_estimator=per_occurrence")
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations,
                        entity_frequency=tiny_dataset.entity_frequency)  # fmt: skip
    assert model.writes_gradients
    terms = Step(model)([(0, TINY_TRAIN)], 1.0, 0.5, (0, 0, 0))
    assert terms.loss == pytest.approx(terms.nll + 0.5 * terms.kl, rel=1e-6) and terms.kl > 0
    with torch.no_grad():
        model.relations.table.weight[0, 0] = float("inf")
    with pytest.raises(Divergence, match="non-finite loss"):
        Step(model)([(0, TINY_TRAIN)], 1.0, 0.5, (0, 0, 1))


def test_the_written_step_s_check_stands_in_for_the_rows_it_wrote(tiny_dataset):
    """Where the kernel wrote the encoded rows' gradients, the gradient sum reads its check (0 or NaN) in
    place of the rows; the relations' gradient is still summed."""
    config = make_config("model.latent=lim", "objective.likelihood=bernoulli", "objective.kl_estimator=per_occurrence")
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations,
                        entity_frequency=tiny_dataset.entity_frequency)  # fmt: skip
    forward, _ = model.forward_backward([(0, TINY_TRAIN[:4]), (1, TINY_TRAIN[4:])], 1.0, (0, 0, 0), 1.0)
    # Two batches' kernel checks, then the KL column's multiplier.
    assert forward.encoded_check is not None and torch.equal(forward.encoded_check, torch.tensor([0.0, 0.0, 1.0]))
    summed = forward.relation_leaf.grad.sum() + sum(item.values.grad.sum() for item in forward.encoded)
    assert torch.isfinite(model.gradient_sum(forward)) and torch.isfinite(summed)
    forward.encoded[0].values.grad[0, 0] = float("nan")  # not read: the check stands in for it
    assert torch.isfinite(model.gradient_sum(forward))
    forward.encoded_check[1] = float("nan")
    assert torch.isnan(model.gradient_sum(forward))
    forward.encoded_check[1] = 0.0
    forward.relation_leaf.grad[0, 0] = float("inf")
    assert not torch.isfinite(model.gradient_sum(forward))


def test_an_epoch_collects_only_its_own_objects_and_unfreezes_the_rest_even_when_it_raises():
    class Node:
        pass

    assert gc.get_freeze_count() == 0
    gc.disable()  # only the explicit collections below run
    try:
        old = Node()
        old.self = old
        old_ref = weakref.ref(old)
        gc.collect()  # survives into the oldest generation, then becomes garbage there
        del old
        recent = Node()
        recent.self = recent
        recent_ref = weakref.ref(recent)
        del recent
        with pytest.raises(RuntimeError), young_objects_collected():
            assert recent_ref() is None  # young garbage from before is collected on the way in
            assert gc.get_freeze_count() > 0
            young = Node()
            young.self = young
            young_ref = weakref.ref(young)
            del young
            gc.collect()
            assert young_ref() is None  # a cycle made inside is collected inside
            assert old_ref() is not None  # an old one is frozen, not walked
            raise RuntimeError("a step failed")
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert old_ref() is None
    finally:
        gc.enable()
