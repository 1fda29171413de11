"""A trained run directory: its config, its dataset and its model, on any number of ranks and any device.
``evaluate``, ``predict``, ``report`` and ``export`` all start here."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sharding.exchange import Exchange, LocalExchange
from storage.dataset import KGDataset, load_data
from trainer import checkpoint
from trainer.config import RunConfig, load_config
from trainer.model import KGModel, build_model


@dataclass
class Run:
    config: RunConfig
    dataset: KGDataset
    model: KGModel
    directory: Path | None = None
    """The run directory (None: a run built in memory), where ``calibration.json`` is kept."""
    checkpoint: Path | None = None
    """The checkpoint directory the model was loaded from."""


def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The resolved config a run saved (``config file not found: ...`` when ``run_dir`` is not a run)."""
    return load_config(Path(run_dir) / "config.yaml", overrides)


def load_run(
    run_dir: Path,
    *,
    config: RunConfig | None = None,
    exchange: Exchange | None = None,
    device: torch.device | None = None,
) -> Run:
    """A run directory's config, dataset and best (else latest) checkpoint, on this rank of ``exchange``
    (this process alone by default) and ``device`` (the CPU by default)."""
    run_dir = Path(run_dir)
    config = config or load_run_config(run_dir)
    exchange = exchange or LocalExchange()
    reporter = checkpoint.Reporter(run_dir, exchange)
    name = checkpoint.BEST if reporter.has(checkpoint.BEST) else checkpoint.LATEST
    if not reporter.has(name):
        raise ValueError(f"{run_dir}: no checkpoint ({checkpoint.BEST}/ or {checkpoint.LATEST}/)")
    if name == checkpoint.LATEST:
        state = checkpoint.read_index(reporter.path(name))["state"]
        if state.get("best_epoch"):  # the run chose a best checkpoint, which is gone
            warnings.warn(
                f"{run_dir}: {checkpoint.BEST}/ (epoch {state['best_epoch']}) is missing; using {checkpoint.LATEST}/ "
                f"(epoch {state.get('epoch')}) instead",
                stacklevel=2,
            )
    dataset = load_data(config.data, lead=exchange.rank == 0, barrier=exchange.barrier)
    model = build_model(config, dataset.num_entities, dataset.num_relations, exchange, device, dataset.entity_frequency)
    checkpoint.load_into(reporter.path(name), model)
    return Run(config, dataset, model, run_dir, reporter.path(name))
