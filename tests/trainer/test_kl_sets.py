import pytest
import torch

from sharding import gaussian
from sharding.kernels import native
from sharding.rng import step_generator
from sharding.row_optim import RowAdagrad, RowAdam
from tests.trainer.conftest import TINY_TRAIN, make_config, unit_kl
from trainer.model import build_model
from trainer.objective import chunk_negatives, n3_penalty
from trainer.posterior import Gathered, LatentInformation
from trainer.step import Step

KEY = (0, 0, 0)  # (seed, epoch, step)


def _step(config, dataset):
    model = build_model(config, dataset.num_entities, dataset.num_relations, entity_frequency=dataset.entity_frequency)
    return model, Step(model, config.optim.grad_clip)


def test_lim_full_kl_covers_every_entity_and_relation(tiny_dataset):
    config = make_config("model.latent=lim", "objective.likelihood=bernoulli", "optim.lr=0.0")
    model, step = _step(config, tiny_dataset)
    entities, relations = model.entities.full(), model.relations.full()
    expected = 0.25 * (unit_kl(entities).sum() + unit_kl(relations).sum())  # includes unseen entity 5
    terms = step([(0, TINY_TRAIN[:2])], 0.25, 1.0, KEY)
    assert terms.kl == pytest.approx(expected.item(), rel=1e-6)


def test_lfm_kl_covers_only_the_batch_facts(tiny_dataset):
    config = make_config(
        "model.latent=lfm", "objective.likelihood=bernoulli", "objective.num_negatives=2", "optim.lr=0.0"
    )
    model, step = _step(config, tiny_dataset)
    entities, relations = model.entities.full(), model.relations.full()
    ent_kl, rel_kl = unit_kl(entities), unit_kl(relations)
    batch = TINY_TRAIN[:2]  # facts (0, r0, 1) and (1, r0, 2)
    negatives = chunk_negatives(2, config.objective.negative_chunk, 2, 6, step_generator(KEY, 0))
    expected = (
        ent_kl[[0, 1]].sum()
        + ent_kl[[1, 2]].sum()
        + 2 * rel_kl[0]  # each positive fact's s, r, o
        + ent_kl[torch.unique(negatives)].sum()  # distinct corrupted entities, once
    )
    terms = step([(0, batch)], 0.5, 1.0, KEY)  # the share does not apply: each fact is in one batch per epoch
    assert terms.kl == pytest.approx(expected.item(), rel=1e-6)


def _roles(q):
    """The subject and object embeddings of rows holding both side by side."""
    dim = q.mean.shape[1] // 2
    return [type(q)(q.mean[:, half], q.logvar[:, half]) for half in (slice(0, dim), slice(dim, None))]


def test_lfm_with_separate_roles_charges_the_roles_each_fact_scores_with(tiny_dataset):
    config = make_config(
        "model.latent=lfm", "objective.likelihood=bernoulli", "objective.num_negatives=2", "optim.lr=0.0",
        "model.separate_roles=true", "optim.optimizer=rowwise_adagrad",
    )  # fmt: skip
    model, step = _step(config, tiny_dataset)
    # Each role initialised as a table of its own would be: logvar log(1/dim), not log(1/(2 dim)).
    assert torch.equal(model.entities.weight[:, 8:], torch.full((6, 8), float(torch.tensor(0.25).log())))
    assert model.entities.optimizer.sum_sq.shape == (6, 4)  # mean and logvar of each role, apart
    subject, object_ = (unit_kl(q) for q in _roles(model.entities.full()))
    rel_kl = unit_kl(model.relations.full())
    batch = TINY_TRAIN[:2]  # facts (0, r0, 1) and (1, r0, 2)
    negatives = chunk_negatives(2, config.objective.negative_chunk, 2, 6, step_generator(KEY, 0))
    expected = (
        subject[[0, 1]].sum()
        + object_[[1, 2]].sum()
        + 2 * rel_kl[0]
        + subject[torch.unique(negatives[..., :1])].sum()  # a head corruption: a subject
        + object_[torch.unique(negatives[..., 1:])].sum()  # a tail corruption: an object
    )
    terms = step([(0, batch)], 0.5, 1.0, KEY)
    assert terms.kl == pytest.approx(expected.item(), rel=1e-6)


def test_reciprocal_lfm_with_separate_roles_charges_both_roles_of_each_fact_s_entities(tiny_dataset):
    config = make_config(
        "model.latent=lfm", "objective.likelihood=softmax", "optim.lr=0.0", "model.separate_roles=true"
    )
    model, step = _step(config, tiny_dataset)
    subject, object_ = (unit_kl(q) for q in _roles(model.entities.full()))
    rel_kl, num_relations = unit_kl(model.relations.full()), tiny_dataset.num_relations
    both = subject + object_  # (s, r, ?) and (o, r^-1, ?): each entity as subject and as answer
    expected = both[[0, 1]].sum() + both[[1, 2]].sum() + 2 * (rel_kl[0] + rel_kl[num_relations])
    terms = step([(0, TINY_TRAIN[:2])], 0.5, 1.0, KEY)
    assert terms.kl == pytest.approx(expected.item(), rel=1e-6)


def test_per_occurrence_kl_sums_to_the_full_kl_over_an_epoch(tiny_dataset):
    config = make_config(
        "model.latent=lim", "objective.likelihood=bernoulli", "objective.kl_estimator=per_occurrence", "optim.lr=0.0"
    )
    model, step = _step(config, tiny_dataset)
    entities, relations = model.entities.full(), model.relations.full()
    seen = torch.tensor([0, 1, 2, 3, 4])  # entity 5 is not in train
    expected = unit_kl(entities)[seen].sum() + unit_kl(relations).sum()
    batches = torch.randperm(len(TINY_TRAIN), generator=torch.Generator().manual_seed(0)).split(3)
    total = sum(step([(0, TINY_TRAIN[b])], 1 / len(batches), 1.0, (0, 0, i)).kl for i, b in enumerate(batches))
    assert total == pytest.approx(expected.item(), rel=1e-5)


def test_the_compiled_occurrence_weights_are_torch_s_bit_for_bit(monkeypatch):
    """c / f of each distinct entity from the kernel (rows.c) and from bincount, gather and division alike,
    frequencies past float32's exact integers included; an id or a position outside its range is an error."""
    assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    g = torch.Generator().manual_seed(0)
    frequency = torch.randint(0, 50, (1000,), generator=g)
    frequency[::7] = torch.randint(2**24, 2**40, (len(frequency[::7]),), generator=g)
    positives = torch.randint(0, 1000, (300, 3), generator=g)
    rows = Gathered.of(positives, torch.randint(0, 1000, (10, 32), generator=g))
    posterior = LatentInformation("per_occurrence", frequency)
    compiled = posterior.fact_kl_weights(rows, torch.float32)
    monkeypatch.setattr(native, "occurrence_weights", lambda *args: None)
    assert torch.equal(compiled, posterior.fact_kl_weights(rows, torch.float32))
    occurrences = torch.bincount(rows.flat[:600], minlength=len(rows.ids))
    assert torch.equal(compiled, occurrences.float() / frequency.clamp_min(1)[rows.ids].float())
    monkeypatch.undo()
    with pytest.raises(IndexError, match="outside its range"):
        native.occurrence_weights(rows.flat, 600, rows.ids, posterior.divisor[:10])
    with pytest.raises(ValueError, match="counted positions"):
        native.occurrence_weights(rows.flat, len(rows.flat) + 1, rows.ids, posterior.divisor)


def test_point_model_has_no_kl_and_no_variances(tiny_dataset):
    config = make_config("model.latent=point")
    model, step = _step(config, tiny_dataset)
    assert model.entities.full().logvar is None
    assert step([(0, TINY_TRAIN)], 1.0, 1.0, KEY).kl == 0.0


@pytest.mark.parametrize("latent", ["lim", "point"])
def test_n3_penalises_the_means_the_owners_send(tiny_dataset, latent):
    """The owner sends the sample and KL of variational rows, and their means only when N3 needs them."""
    config = make_config(
        f"model.latent={latent}", "objective.likelihood=bernoulli", "objective.reg=n3", "objective.reg_weight=0.5",
        "optim.lr=0.0",
    )  # fmt: skip
    model, step = _step(config, tiny_dataset)
    entities, relations = model.entities.full().mean, model.relations.full().mean
    batch = TINY_TRAIN[:3]
    expected = 0.5 * n3_penalty(
        entities[batch[:, 0]], relations[batch[:, 1]], entities[batch[:, 2]], complex_valued=True
    )
    terms = step([(0, batch)], 0.25, 1.0, KEY)
    assert terms.loss - terms.nll - terms.kl == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("reg", ["none", "n3"])
def test_a_step_is_the_same_with_the_fused_sample_kernel_and_without(tiny_dataset, monkeypatch, reg):
    """The owner's encoder takes the compiled sample + KL where it can; drawing the same stream's noise
    first and sampling with torch ops gives the same step."""
    config = make_config(
        "model.latent=lim", "objective.likelihood=bernoulli", "objective.kl_estimator=per_occurrence",
        f"objective.reg={reg}", "objective.reg_weight=0.1",
    )  # fmt: skip
    results, taken = [], []
    kernel = gaussian.stream_sample_and_kl

    def counted(*args, **kwargs):
        found = kernel(*args, **kwargs)
        taken.append(found is not None)
        return found

    for fused in (True, False):
        monkeypatch.setattr("sharding.gaussian.stream_sample_and_kl", counted if fused else lambda *a, **k: None)
        model, step = _step(config, tiny_dataset)
        terms = step([(0, TINY_TRAIN[:4]), (1, TINY_TRAIN[4:])], 0.5, 1.0, KEY)
        results.append((terms, model.entities.weight.clone()))
    (fused_terms, fused_weight), (torch_terms, torch_weight) = results
    assert taken and all(taken)  # the first step ran the kernel (gathering the rows itself)
    for key in ("nll", "kl", "loss"):
        assert getattr(fused_terms, key) == pytest.approx(getattr(torch_terms, key), rel=1e-5)
    torch.testing.assert_close(fused_weight, torch_weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", [RowAdagrad, RowAdam])
@pytest.mark.parametrize("reg", ["none", "n3"])
def test_the_update_forms_the_sample_gradient_as_it_goes_where_the_kernel_drew_it(
    tiny_dataset, monkeypatch, reg, optimizer
):
    """Where the sample kernel's output is sent as it is, the row update (row-wise Adagrad, lazy Adam) forms
    the rows' gradient as it goes, with one request (data stream) or several merged; the step equals the
    formed one. With the means sent beside the sample (N3) the gradient is formed first, as before."""
    config = make_config(
        "model.latent=lim", "objective.likelihood=bernoulli", "objective.kl_estimator=per_occurrence",
        f"optim.optimizer={'rowwise_adagrad' if optimizer is RowAdagrad else 'adam'}", f"objective.reg={reg}",
        "objective.reg_weight=0.1",
    )  # fmt: skip
    fused_calls = []
    step_sampled = optimizer.step_sampled

    def counted(self, *args):
        updated = step_sampled(self, *args)
        fused_calls.append(updated is not None)
        return updated

    for batches in ([(0, TINY_TRAIN)], [(0, TINY_TRAIN[:4]), (1, TINY_TRAIN[4:])]):
        results = []
        for fused in (True, False):
            fused_calls.clear()
            monkeypatch.setattr(optimizer, "step_sampled", counted if fused else lambda *args: None)
            model, step = _step(config, tiny_dataset)
            terms = [step(batches, 0.5, 1.0, (0, 0, i)) for i in range(3)]
            state = [v.clone() for v in model.entities.optimizer.state_dict().values() if torch.is_tensor(v)]
            results.append((terms, model.entities.weight.clone(), state))
            if fused:
                assert fused_calls == ([True] * 3 if reg == "none" else []), (len(batches), reg)
        (fused_terms, fused_weight, fused_sq), (formed_terms, formed_weight, formed_sq) = results
        for a, b in zip(fused_terms, formed_terms, strict=True):
            assert a.loss == pytest.approx(b.loss, rel=1e-5)
        torch.testing.assert_close(fused_weight, formed_weight, rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(fused_sq, formed_sq, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
