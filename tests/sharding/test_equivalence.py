"""A 2-worker sharded run (torchrun, gloo) against a 1-worker run reading the same data streams."""

import json

import pytest
import torch

from tests.sharding.conftest import read_jsonl, run_trainer

SETTINGS = [
    "model.dim=16",
    "train.batch_size=512",
    "train.progress=false",
    "train.log_steps=true",
    "train.num_threads=1",
    "train.checkpoint_every=1",
    "sharding.streams=2",
    "sharding.block_rows=32",  # kinships' 104 entities: ranks own rows [0, 64) and [64, 104)
]
CASES = {
    "softmax": ["objective.likelihood=softmax"],
    "bernoulli": ["objective.likelihood=bernoulli", "objective.kl_estimator=per_occurrence"],
    "bernoulli_weighted": [
        "objective.likelihood=bernoulli",
        "objective.kl_estimator=per_occurrence",
        "objective.exclude_positives=true",
        "objective.adversarial_temperature=1",
        "objective.relation_bias=true",
        "model.separate_roles=true",
    ],
    "sampled_softmax": ["objective.likelihood=sampled_softmax", "objective.kl_estimator=per_occurrence"],
    # Three streams a worker: three gradient all-to-alls a step before the owner's update reads them.
    "bernoulli_three_streams": [
        "objective.likelihood=bernoulli",
        "objective.kl_estimator=per_occurrence",
        "sharding.streams=6",
        "train.batch_size=510",
    ],
    # The compiled kernels off: the torch ops CUDA runs (counter noise, sample and KL, row updates).
    "sampled_softmax_torch_ops": ["objective.likelihood=sampled_softmax", "objective.kl_estimator=per_occurrence"],
}
TORCH_OPS = {"NVKG_NATIVE": "0"}


def _train(out, workers, likelihood, epochs=3, extra=()):
    args = ["train", "--dataset", "kinships", "--out", str(out)]
    for item in [*SETTINGS, *CASES[likelihood], f"train.epochs={epochs}", "train.eval_every=3", *extra]:
        args += ["--set", item]
    return run_trainer(*args, workers=workers, env=TORCH_OPS if likelihood.endswith("_torch_ops") else None)


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def _assert_same_steps(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert (x["epoch"], x["step"]) == (y["epoch"], y["step"])
        for key in ("nll", "kl", "loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-4), (x, y)


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    _train(root / "one", 1, request.param)
    _train(root / "two", 2, request.param)
    return request.param, root


def test_two_workers_match_one_step_by_step(runs):
    _, root = runs
    _assert_same_steps(read_jsonl(root / "one" / "steps.jsonl"), read_jsonl(root / "two" / "steps.jsonl"))
    one, two = _metrics(root / "one"), _metrics(root / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for split in ("valid", "test"):
        for key, value in one[split]["filtered"].items():
            assert two[split]["filtered"][key] == pytest.approx(value, rel=1e-4)
    assert len(list((root / "two" / "checkpoint").glob("entities-*.pt"))) == 2


def test_checkpoints_reshard_between_world_sizes(runs):
    _, root = runs
    for run, workers in (("two", 1), ("one", 2)):  # 2 -> 1 and 1 -> 2
        result = run_trainer("evaluate", str(root / run), workers=workers)
        evaluated = json.loads(result.stdout[result.stdout.index("{") :])
        for split in ("valid", "test"):
            for key, value in _metrics(root / run)[split]["filtered"].items():
                assert evaluated[split]["filtered"][key] == pytest.approx(value, rel=1e-6), (run, workers)


def test_resumed_two_worker_run_continues_exactly(runs, tmp_path):
    likelihood, root = runs
    _train(tmp_path / "resumed", 2, likelihood, epochs=2)
    _train(tmp_path / "resumed", 2, likelihood, epochs=3)
    _assert_same_steps(read_jsonl(root / "two" / "steps.jsonl"), read_jsonl(tmp_path / "resumed" / "steps.jsonl"))


def test_two_workers_write_the_gradients_they_would_trace(tmp_path):
    """At world size 2 (rank 1 charges no relation KL; each rank's gradients go to the rows' owners and the
    relations' are all-reduced) the written step gives the traced step's numbers bit for bit: every step's
    terms and the tables at the end."""
    extra = ["objective.relation_bias=true", "train.eval_every=0"]
    for written in ("true", "false"):
        _train(tmp_path / written, 2, "bernoulli", epochs=2, extra=[*extra, f"train.written_gradients={written}"])
    written, traced = (read_jsonl(tmp_path / name / "steps.jsonl") for name in ("true", "false"))
    assert len(written) == len(traced) > 0 and written == traced
    shards = sorted(p.name for p in (tmp_path / "true" / "checkpoint").glob("*.pt"))
    assert sum(name.startswith("entities-") for name in shards) == 2 and "relations.pt" in shards
    for name in shards:  # each rank's entity rows, the relations, the biases: rows and optimiser state
        a, b = (torch.load(tmp_path / run / "checkpoint" / name, weights_only=False) for run in ("true", "false"))
        assert torch.equal(a["weight"], b["weight"]), name
        for key, value in a["optim"].items():
            assert torch.equal(value, b["optim"][key]) if torch.is_tensor(value) else value == b["optim"][key], name
