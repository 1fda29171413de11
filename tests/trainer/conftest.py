import numpy as np
import pytest
import torch

from sharding.gaussian import Gaussian
from storage.convert import write_id_dataset
from storage.dataset import KGDataset, open_dataset
from trainer.config import RunConfig, load_config

# 6 entities, 2 relations; entity 5 never occurs in train.
TINY_TRAIN = torch.tensor([[0, 0, 1], [1, 0, 2], [2, 1, 3], [3, 1, 4], [0, 1, 4], [4, 0, 0], [1, 1, 3]])


@pytest.fixture
def tiny_dataset(tmp_path_factory) -> KGDataset:
    """TINY_TRAIN, written and read back through the storage layer like any dataset."""
    root = tmp_path_factory.mktemp("tiny") / "tiny"
    write_id_dataset(
        root,
        entity_names=[f"e{i}" for i in range(6)],
        relation_names=["r0", "r1"],
        splits={
            "train": TINY_TRAIN.numpy(),
            "valid": np.array([[0, 0, 2], [2, 1, 4]]),
            "test": np.array([[1, 0, 3], [4, 1, 2]]),
        },
    )
    return open_dataset(root, cache_dir=root.parent)


def unit_kl(q: Gaussian) -> torch.Tensor:
    """Reference KL[N(mean, diag(var)) || N(0, I)] per row: 0.5 * sum(mean^2 + var - logvar - 1)."""
    assert q.logvar is not None
    return 0.5 * (q.mean.square() + q.logvar.exp() - q.logvar - 1.0).sum(-1)


def make_config(*overrides: str) -> RunConfig:
    base = ["model.dim=4", "train.progress=false", "train.eval_every=0", "train.batch_size=3"]
    return load_config(None, base + list(overrides))
