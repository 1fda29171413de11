"""Every tensor of training and evaluation is made on the model's device: with the default device set to
``meta``, a tensor created without one lands there and the first op that mixes it with a CPU tensor
fails. Run with the compiled kernels off, i.e. the torch ops a CUDA run takes."""

from pathlib import Path

import pytest
import torch

from storage.dataset import load_data
from trainer.config import load_config
from trainer.loop import train

CASES = {
    "bernoulli": ["objective.likelihood=bernoulli", "eval.num_samples=2"],
    "softmax": ["objective.likelihood=softmax"],
    "sampled_softmax": [
        "objective.likelihood=sampled_softmax",
        "objective.kl_estimator=per_occurrence",
        "eval.protocol=sampled",
        "eval.final_protocol=sampled",
        "eval.uniform_candidates=20",
    ],
}


def train_with_meta_default(settings: list[str], out: Path) -> dict:
    """A short kinships run with ``settings`` and the default device set to ``meta``; its metrics."""
    base = ["data.dataset=kinships", "model.dim=8", "train.epochs=1", "train.eval_every=1", "train.progress=false"]
    config = load_config(None, base + settings)
    data = load_data(config.data)
    torch.set_default_device("meta")
    try:
        return train(config, out, data)
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("kernels", ["off"], indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_and_evaluation_make_no_tensor_on_the_default_device(tmp_path, case, kernels):
    metrics = train_with_meta_default(CASES[case], tmp_path)
    assert 0.0 < metrics["test"]["filtered"]["mrr"] <= 1.0
