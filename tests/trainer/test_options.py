import json

import pytest
import torch

from sharding.exchange import LocalExchange
from sharding.table import ShardedTable
from tests.trainer.conftest import make_config
from trainer.loop import train
from trainer.model import build_model
from trainer.objective import n3_penalty
from trainer.step import clip_global_norm


def test_grad_clip_scales_the_global_norm():
    a, b = torch.full((2, 2), 3.0), torch.full((1, 2), 4.0)  # global norm sqrt(4*9 + 2*16) = sqrt(68)
    clip_global_norm(a, b, 1.0, LocalExchange())
    total = torch.sqrt(a.square().sum() + b.square().sum())
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    assert (a / b[0, 0]).flatten().tolist() == pytest.approx([0.75] * 4)  # direction kept


def test_kl_warmup_switches_the_kl_off_for_the_first_epochs(tmp_path, tiny_dataset):
    train(make_config("train.epochs=10", "objective.kl_warmup=0.3", "objective.kl_weight=0.5"), tmp_path, tiny_dataset)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["kl_multiplier"] for r in records] == [0.0] * 3 + [0.5] * 7
    assert all(r["kl"] > 0 for r in records)  # reported KL is the ELBO's, whatever the multiplier


def test_n3_penalty_hand_values():
    x = torch.tensor([[3.0, 4.0]])  # one complex number 3 + 4i: |z|^3 = 125
    assert n3_penalty(x, complex_valued=True).item() == pytest.approx(125.0)
    assert n3_penalty(x, complex_valued=False).item() == pytest.approx(27.0 + 64.0)


def test_init_std_and_init_logvar_are_applied(tiny_dataset):
    config = make_config("model.init_std=0.0", "model.init_logvar=-3.0")
    model = build_model(config, tiny_dataset.num_entities, tiny_dataset.num_relations)
    entities = model.entities.full()
    assert entities.mean.abs().max() == 0
    assert torch.all(entities.logvar == -3.0)


class _RankOf2:
    """Enough of an exchange to build rank 1's shard of a 2-worker table (no collective is called)."""

    rank, world_size = 1, 2


def test_local_negatives_come_from_the_workers_own_shard():
    config = make_config("objective.likelihood=bernoulli", "sharding.negatives=local", "sharding.block_rows=8")
    model = build_model(config, 40, 2, _RankOf2())
    lo, hi = model.entities.lo, model.entities.hi
    assert (lo, hi) == (16, 40)
    negatives = model.likelihood.negatives(500, (0, 0, 0), stream=0)
    assert negatives.min() >= lo and negatives.max() < hi and len(negatives.unique()) > 15


def test_clip_sigma_norm_scales_only_the_rows_above_the_bound():
    table = ShardedTable(
        3, 2, LocalExchange(), variational=True, optimizer="adam", lr=0.1, seed=0, block_rows=4, init_logvar=0.0
    )  # sigma = (1, 1): norm sqrt(2)
    table.weight[1, 2:] = torch.tensor([-4.0, -5.0])  # norm well below 1
    before = table.weight.clone()
    table.clip_sigma_norm(torch.tensor([0, 1]), 1.0)
    norms = torch.exp(0.5 * table.weight[:, 2:]).norm(dim=1)
    assert norms[0].item() == pytest.approx(1.0)
    assert torch.equal(table.weight[1], before[1]) and torch.equal(table.weight[2], before[2])  # in bound; not asked
    assert torch.equal(table.weight[:, :2], before[:, :2])  # means untouched
    table.clip_sigma_norm(None, 0.5)
    assert torch.exp(0.5 * table.weight[:, 2:]).norm(dim=1).max().item() == pytest.approx(0.5)


def test_clip_sigma_norm_bounds_each_role_of_a_row_apart():
    table = ShardedTable(
        2, 4, LocalExchange(), variational=True, optimizer="adam", lr=0.1, seed=0, block_rows=4, init_logvar=0.0,
        roles=2,
    )  # fmt: skip
    # subject sigma (1, 1), object sigma (1, 1)
    table.weight[0, 6:] = torch.tensor([-6.0, -6.0])  # the object role's sigma is already small
    before = table.weight.clone()
    table.clip_sigma_norm(None, 1.0)
    subject, object_ = torch.exp(0.5 * table.weight[:, 4:]).unflatten(1, (2, 2)).norm(dim=2).unbind(1)
    assert subject.tolist() == pytest.approx([1.0, 1.0]) and object_[1].item() == pytest.approx(1.0)
    assert torch.equal(table.weight[0, 6:], before[0, 6:])  # in bound on its own: untouched


def test_table_health_in_chunks_equals_the_whole_shard_at_once_and_the_variance_samples_rows():
    table = ShardedTable(10, 3, LocalExchange(), variational=True, optimizer="adam", lr=0.1, seed=0, block_rows=4)
    table.weight[:, 3:] = torch.linspace(-12.0, 2.0, 30).view(10, 3)
    logvar = table.weight[:, 3:]
    finite, collapsed = table.health(-5.0, chunk_rows=3)
    assert finite and collapsed == int((logvar.mean(1) < -5.0).sum()) > 0
    assert table.mean_variance() == pytest.approx(float(logvar.exp().mean()), rel=1e-6)
    # Past max_rows: the evenly spaced rows 0, 3, 6, 9.
    assert table.mean_variance(max_rows=4) == pytest.approx(float(logvar[::3].exp().mean()), rel=1e-6)
    for row, column, value in ((9, 0, float("nan")), (4, 5, float("inf")), (0, 1, -float("inf"))):
        broken = table.weight.clone()
        table.weight[row, column] = value  # a mean in the last chunk, log-variances in others
        assert not table.health(-5.0, chunk_rows=3)[0]
        table.weight.copy_(broken)
    point = ShardedTable(10, 3, LocalExchange(), variational=False, optimizer="adam", lr=0.1, seed=0, block_rows=4)
    assert point.health(-5.0, chunk_rows=3) == (True, 0) and point.mean_variance() == 0.0
    point.weight[7, 2] = float("nan")
    assert not point.health(-5.0, chunk_rows=3)[0]
