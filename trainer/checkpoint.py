"""Checkpoints: table rows and their optimiser state, plus where the run stands.

``checkpoint.pt`` is the latest resumable state; ``best.pt`` the state with the best validation MRR.
Both are written atomically. Shuffling, negatives and noise are derived from (seed, epoch), so a run
resumed at an epoch boundary continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import RunConfig, to_dict
from trainer.io import atomic_torch_save
from trainer.model import KGModel

LATEST = "checkpoint.pt"
BEST = "best.pt"
# Settings that must match for a checkpoint to be continued; train.epochs, data.prefetch etc. may change.
FROZEN_KEYS = ("data.dataset", "model", "objective")


@dataclass
class RunState:
    epoch: int = 0
    best_mrr: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0


def save(path: Path, model: KGModel, state: RunState, config: RunConfig) -> None:
    atomic_torch_save(
        path,
        {
            "entities": model.entities.state_dict(),
            "relations": model.relations.state_dict(),
            "state": dataclasses.asdict(state),
            "config": to_dict(config),
        },
    )


def _read(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable nvkg checkpoint ({err})") from None


def load_into(path: Path, model: KGModel) -> RunState:
    payload = _read(path)
    model.entities.load_state_dict(payload["entities"])
    model.relations.load_state_dict(payload["relations"])
    return RunState(**payload["state"])


def resume(out_dir: Path, config: RunConfig, model: KGModel) -> RunState:
    """Load ``out_dir``'s latest checkpoint if there is one, after checking it belongs to this config."""
    path = Path(out_dir) / LATEST
    if not path.exists():
        return RunState()
    saved, current = _read(path)["config"], to_dict(config)
    for key in FROZEN_KEYS:
        if _lookup(saved, key) != _lookup(current, key):
            raise ValueError(
                f"{path}: checkpoint was trained with a different '{key}' "
                f"({_lookup(saved, key)} vs {_lookup(current, key)}); use another --out directory"
            )
    return load_into(path, model)


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree
