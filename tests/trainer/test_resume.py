import json

import pytest
import torch

from tests.trainer.conftest import make_config
from trainer import checkpoint
from trainer.loop import train
from trainer.model import build_model


def _log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def _final_tables(out_dir, config, dataset):
    model = build_model(config, dataset.num_entities, dataset.num_relations)
    checkpoint.load_into(out_dir / checkpoint.LATEST, model)
    return model.entities.state_dict(), model.relations.state_dict()


AUTHORS_SETUP = [  # the quirks of the authors' published runs, with a relation bias
    "objective.likelihood=bernoulli", "objective.num_negatives=1", "objective.negative_chunk=1",
    "objective.split_by_position=true", "objective.relation_bias=true", "model.prior=1/dim",
    "optim.clip_sigma_norm=1.0", "optim.optimizer=adam",
]  # fmt: skip
SETUPS = {
    "bernoulli": ["objective.likelihood=bernoulli"],
    "softmax": ["objective.likelihood=softmax"],
    "authors": AUTHORS_SETUP,
    # Their published model: separate subject and object embeddings, here with the LFM's per-role KL.
    "authors_roles": [*AUTHORS_SETUP, "model.separate_roles=true", "model.latent=lfm"],
}


@pytest.mark.parametrize(
    ("likelihood", "kernels"),
    [(name, "on") for name in sorted(SETUPS)] + [("bernoulli", "off"), ("softmax", "off")],
    indirect=["kernels"],
)
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, tiny_dataset, likelihood, kernels):
    settings = SETUPS[likelihood]
    settings = [*settings, "train.eval_every=2", "train.checkpoint_every=1"]
    full = make_config("train.epochs=6", *settings)
    train(full, tmp_path / "full", tiny_dataset)

    # Stop after 3 epochs, then start again in the same directory with the full budget.
    train(make_config("train.epochs=3", *settings), tmp_path / "resumed", tiny_dataset)
    train(full, tmp_path / "resumed", tiny_dataset)

    uninterrupted, resumed = _log(tmp_path / "full"), _log(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert (a["elbo"], a["kl"], a["nll"]) == (b["elbo"], b["kl"], b["nll"])
    a_ent, a_rel = _final_tables(tmp_path / "full", full, tiny_dataset)
    b_ent, b_rel = _final_tables(tmp_path / "resumed", full, tiny_dataset)
    assert torch.equal(a_ent["weight"], b_ent["weight"]) and torch.equal(a_rel["weight"], b_rel["weight"])
    assert a_ent["optim"]["num_steps"] == b_ent["optim"]["num_steps"] > 0
    assert torch.equal(a_ent["optim"]["exp_avg_sq"], b_ent["optim"]["exp_avg_sq"])
    if likelihood.startswith("authors"):
        a_bias, b_bias = (
            torch.load(out / checkpoint.LATEST / checkpoint.RELATION_BIAS)["weight"]
            for out in (tmp_path / "full", tmp_path / "resumed")
        )
        assert torch.equal(a_bias, b_bias) and a_bias.abs().sum() > 0  # the bias learned, and resumed exactly
        roles = 2 if full.model.separate_roles else 1
        assert a_ent["weight"].shape[1] == 2 * roles * full.model.dim  # means (of each role), then logvars
        sigma = torch.exp(0.5 * a_ent["weight"][:, roles * full.model.dim :]).unflatten(1, (roles, -1))
        sigma_norm = sigma.norm(dim=2)  # each role's, as each of the authors' tables
        assert float(sigma_norm.max()) <= 1.0 + 1e-5


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, tiny_dataset):
    train(make_config("train.epochs=1"), tmp_path, tiny_dataset)
    with pytest.raises(ValueError, match=r"which a run cannot change: model\.dim: 4 -> 6;"):
        train(make_config("train.epochs=2", "model.dim=6"), tmp_path, tiny_dataset)


def test_a_checkpoint_written_before_a_setting_existed_resumes_with_its_default(tmp_path, tiny_dataset):
    train(make_config("train.epochs=1"), tmp_path, tiny_dataset)
    index = tmp_path / checkpoint.LATEST / checkpoint.INDEX
    written = json.loads(index.read_text())
    del written["config"]["model"]["separate_roles"]  # as a checkpoint of an earlier nvkg has it
    index.write_text(json.dumps(written))
    train(make_config("train.epochs=2"), tmp_path, tiny_dataset)
    assert [r["epoch"] for r in _log(tmp_path)] == [1, 2]
    # The setting itself is still checked.
    with pytest.raises(ValueError, match=r"which a run cannot change: model\.separate_roles: False -> True;"):
        train(make_config("train.epochs=3", "model.separate_roles=true"), tmp_path, tiny_dataset)


def test_truncated_checkpoint_fails_with_its_name(tmp_path, tiny_dataset):
    config = make_config("train.epochs=1")
    train(config, tmp_path, tiny_dataset)
    (path,) = (tmp_path / checkpoint.LATEST).glob("entities-*.pt")
    path.write_bytes(path.read_bytes()[:100])
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations)
    with pytest.raises(ValueError, match=r"entities-0000000000-0000000006\.pt: not a readable"):
        checkpoint.load_into(tmp_path / checkpoint.LATEST, model)


def test_checkpoint_of_an_older_row_format_is_refused(tmp_path, tiny_dataset):
    config = make_config("train.epochs=1")
    train(config, tmp_path, tiny_dataset)
    index_path = tmp_path / checkpoint.LATEST / checkpoint.INDEX
    index = json.loads(index_path.read_text())
    del index["format"]  # as written before ComplEx rows became (real, imaginary) pairs
    index_path.write_text(json.dumps(index))
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations)
    with pytest.raises(ValueError, match="checkpoint format 1, this nvkg reads format 2"):
        checkpoint.load_into(tmp_path / checkpoint.LATEST, model)


def test_time_budget_stops_after_the_epoch_that_exhausts_it(tmp_path, tiny_dataset):
    config = make_config("train.epochs=50", "train.time_budget_s=0.0", "train.eval_every=10")
    metrics = train(config, tmp_path, tiny_dataset)
    assert [r["epoch"] for r in _log(tmp_path)] == [1]
    assert (tmp_path / checkpoint.LATEST).exists() and (tmp_path / checkpoint.BEST).exists()
    assert metrics["best_epoch"] == 1 and "filtered" in metrics["test"]


def test_reduce_on_plateau_follows_validation_and_survives_a_resume(tmp_path, tiny_dataset):
    settings = ["train.eval_every=1", "train.checkpoint_every=1", "optim.lr=0.3", "optim.lr_decay=0.5"]
    full = make_config("train.epochs=6", *settings)
    train(full, tmp_path / "full", tiny_dataset)
    records = _log(tmp_path / "full")
    best, lr = -1.0, 0.3
    for record in records:  # the lr in use for an epoch, halved after each evaluation that is no better
        assert record["lr"] == pytest.approx(lr)
        lr = lr if record["valid_mrr"] > best else lr * 0.5
        best = max(best, record["valid_mrr"])
    assert records[4]["lr"] < 0.3, "no plateau in the first 4 epochs: the resume below would not test the lr"

    train(make_config("train.epochs=4", *settings), tmp_path / "resumed", tiny_dataset)
    train(full, tmp_path / "resumed", tiny_dataset)
    assert [(r["nll"], r["lr"]) for r in _log(tmp_path / "resumed")] == [(r["nll"], r["lr"]) for r in records]
    a_ent, _ = _final_tables(tmp_path / "full", full, tiny_dataset)
    b_ent, _ = _final_tables(tmp_path / "resumed", full, tiny_dataset)
    assert torch.equal(a_ent["weight"], b_ent["weight"])
