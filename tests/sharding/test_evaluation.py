"""Sampled evaluation on 2 gloo ranks against 1 process: the same candidates, facts and metrics."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharding.exchange import GroupExchange, LocalExchange
from storage.dataset import open_dataset
from trainer.config import load_config
from trainer.evaluate import evaluate_split, rank_filters
from trainer.model import build_model

EVAL = ["eval.protocol=sampled", "eval.uniform_candidates=5", "eval.degree_candidates=4", "eval.batch_size=16"]
SAMPLES = ["eval.final_protocol=sampled", "eval.final_max_facts=60", "eval.num_samples=2"]
CASES = {  # the periodic evaluation with the means; the final one averaging two samples of the softmax
    "means": ["objective.likelihood=bernoulli", "eval.max_facts=60"],
    "samples": ["objective.likelihood=softmax", *SAMPLES],
}


def _evaluate(root: Path, case: str, exchange) -> dict:
    # nations' 14 entities in blocks of 4: the ranks own rows [0, 8) and [8, 14).
    config = load_config(None, ["model.dim=8", "sharding.block_rows=4", *EVAL, *CASES[case]])
    dataset = open_dataset("nations", cache_dir=root)
    model = build_model(config, dataset.num_entities, dataset.num_relations, exchange, None, dataset.entity_frequency)
    shard = (model.entities.lo, model.entities.hi)
    filters = rank_filters(dataset, shard)
    return evaluate_split(config.eval, 7, model, dataset, dataset.valid, filters, final=case == "samples")


def _rank(rank: int, root: Path, case: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=2)
    try:
        metrics = _evaluate(root, case, GroupExchange())
        (root / f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_workers_evaluate_as_one(tmp_path, case):
    one = _evaluate(tmp_path, case, LocalExchange())  # also converts nations before the ranks open it
    mp.spawn(_rank, args=(tmp_path, case), nprocs=2, join=True)
    for rank in (0, 1):
        two = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for kind in ("raw", "filtered"):
            assert two[kind] == pytest.approx(one[kind], rel=1e-9)
