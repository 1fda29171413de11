"""Checkpoints: one file per entity shard, named by its row range, plus relations and a small index.

    RUN_DIR/checkpoint/index.json                     epoch, best MRR, config, world size
    RUN_DIR/checkpoint/entities-0000000000-0000020480.pt  rows [lo, hi) and their optimiser state
    RUN_DIR/checkpoint/relations.pt
    RUN_DIR/best/...                                  the same, for the best validation MRR

Every rank writes its own shard into a staging directory; rank 0 adds the index and renames the
staging directory into place, so a reader sees a whole checkpoint or the previous one. Shards are
stored by row range, not by rank, so a checkpoint written by N workers loads onto M. Shuffling,
negatives and noise are derived from (seed, epoch, step), so a run resumed at an epoch boundary
continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sharding.exchange import Exchange
from storage.atomic import atomic_torch_save, atomic_write_text, recover_swap, swap_dir
from storage.faults import fault_point
from trainer.config import RunConfig, to_dict
from trainer.model import KGModel

LATEST = "checkpoint"
BEST = "best"
INDEX = "index.json"
RELATIONS = "relations.pt"
RELATION_BIAS = "relation_bias.pt"
_SHARD = re.compile(r"entities-(\d+)-(\d+)\.pt")
# Settings that must match for a checkpoint to be continued; train.epochs, data.prefetch etc. may change.
FROZEN_KEYS = ("data.dataset", "model", "objective", "optim.optimizer")
FORMAT = 2
"""Version of what the rows mean; 2: ComplEx vectors hold (real, imaginary) pairs (1: two halves)."""


@dataclass
class RunState:
    epoch: int = 0
    best_mrr: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    lr: float | None = None
    """The learning rate in use (None: optim.lr); reduce-on-plateau lowers it."""
    stale_evals: int = 0
    """Evaluations in a row without a better validation MRR (reduce-on-plateau; 0 again after a decay)."""
    evals_since_best: int = 0
    """Evaluations since the last better validation MRR (early stopping)."""
    restarts: int = 0
    """Times this run was resumed from a checkpoint (nvkg_restarts_total)."""
    warmup_epochs: int | None = None
    """Epochs of KL warm-up, fixed when the run starts (``objective.kl_warmup`` of its ``train.epochs``): a
    resume that raises ``train.epochs`` does not start the warm-up again (None: a checkpoint from before)."""
    code: dict | None = None
    """What trained the run (trainer/provenance.py): one record, or ``{"mixed": [...]}`` where processes with
    different code trained it (None: a checkpoint written before this was kept)."""


RESTARTS = "restarts.json"


def read_restarts(run_dir: Path) -> int:
    """Resumes counted in ``run_dir``'s restarts file (0 without one)."""
    try:
        return int(json.loads((run_dir / RESTARTS).read_text())["restarts"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{run_dir / RESTARTS}: not a restarts count ({err!r})") from None


def write_restarts(run_dir: Path, restarts: int) -> None:
    atomic_write_text(run_dir / RESTARTS, json.dumps({"restarts": restarts}) + "\n")


def shard_name(lo: int, hi: int) -> str:
    return f"entities-{lo:010d}-{hi:010d}.pt"


def write_files(directory: Path, model: KGModel, state: RunState, config: RunConfig, lead: bool) -> None:
    """This rank's shard; with ``lead``, the relations and the index too."""
    ents = model.entities
    atomic_torch_save(directory / shard_name(ents.lo, ents.hi), ents.state_dict())
    fault_point("checkpoint.shard_written")
    if lead:
        atomic_torch_save(directory / RELATIONS, model.relations.state_dict())
        if model.bias is not None:
            atomic_torch_save(directory / RELATION_BIAS, model.bias.state_dict())
        index = {
            "format": FORMAT,
            "state": dataclasses.asdict(state),
            "config": to_dict(config),
            "entity_rows": ents.num_rows,
            "world_size": model.exchange.world_size,
        }
        atomic_write_text(directory / INDEX, json.dumps(index, indent=2) + "\n")


class Reporter:
    """Checkpoints as directories under the run directory (one filesystem shared by the ranks)."""

    def __init__(self, out_dir: Path, exchange: Exchange):
        self.out_dir, self.exchange = Path(out_dir), exchange
        # A writer killed in the middle of a swap leaves the newest complete checkpoint under another name.
        if exchange.rank == 0:
            for name in (LATEST, BEST):
                recover_swap(self.path(name))
        exchange.barrier()

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def has(self, name: str) -> bool:
        return (self.path(name) / INDEX).is_file()

    def latest(self) -> Path | None:
        """The latest checkpoint, None when there is none; one without its index (a checkpoint is swapped in
        whole, so that is damage, not an interrupted write) is refused rather than trained over."""
        if not self.has(LATEST) and self.path(LATEST).is_dir() and any(self.path(LATEST).iterdir()):
            raise ValueError(
                f"{self.path(LATEST)}: a checkpoint without its {INDEX} (damaged?); restore it, or remove the "
                "directory to train from the start"
            )
        return self.path(LATEST) if self.has(LATEST) else None

    def evaluated(self, record: dict) -> None:
        """Called on every rank after each periodic validation, with the epoch's log record (``valid_mrr``),
        once the checkpoints of that epoch are written; a launcher reports it (Ray Tune: trainer/tune.py)."""

    def save(self, name: str, model: KGModel, state: RunState, config: RunConfig, metrics: dict | None = None) -> None:
        lead = self.exchange.rank == 0
        staging = self.out_dir / f".{name}.staging"
        self.exchange.barrier()
        if lead:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.exchange.barrier()
        write_files(staging, model, state, config, lead)
        self.exchange.barrier()
        if lead:
            swap_dir(staging, self.path(name))
        self.exchange.barrier()


def _load(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable nvkg checkpoint ({err})") from None


INDEX_KEYS = {"format", "state", "config", "entity_rows", "world_size"}
STATE_REQUIRED = ("epoch", "best_mrr", "best_epoch", "train_seconds")
"""What every checkpoint's state has held (later fields have defaults for the checkpoints before them)."""


def _state_problem(key: str, value: object) -> str | None:
    """Why ``value`` cannot be the run state's ``key`` (a hand-edited or damaged index), or None."""
    if value is None and key in ("lr", "warmup_epochs", "code"):
        return None
    if key in ("epoch", "best_epoch", "stale_evals", "evals_since_best", "restarts", "warmup_epochs"):
        valid = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if valid else "expected an integer >= 0"
    if key in ("best_mrr", "train_seconds", "lr"):
        finite = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not finite:
            return "expected a finite number"
        return "expected a positive number" if key == "lr" and isinstance(value, int | float) and value <= 0 else None
    if key == "code":
        return None if isinstance(value, dict) else "expected an object"
    return None


def read_index(directory: Path) -> dict:
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable checkpoint index ({err})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path}: not a checkpoint index (expected a JSON object)")
    state_keys = {f.name for f in dataclasses.fields(RunState)}
    problems = [f"unexpected key {k!r}" for k in sorted(set(index) - INDEX_KEYS)]
    problems += [f"missing key {k!r}" for k in sorted(INDEX_KEYS - set(index) - {"format"})]
    state = index.get("state")
    if not isinstance(state, dict):
        problems.append("'state' is not an object")
    else:
        problems += [f"unexpected key 'state.{k}'" for k in sorted(set(state) - state_keys)]
        problems += [f"missing key 'state.{k}'" for k in STATE_REQUIRED if k not in state]
        problems += [f"state.{k}={v!r}: {why}" for k, v in state.items() if (why := _state_problem(k, v))]
    for key in ("format", "entity_rows", "world_size"):
        value = index.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key}={value!r}: expected a positive integer")
    if not isinstance(index.get("config", {}), dict):
        problems.append("'config' is not an object")
    if problems:
        raise ValueError(f"{path}: not an nvkg checkpoint index ({'; '.join(problems)})")
    return index


def load_into(directory: Path, model: KGModel) -> RunState:
    """Fill ``model`` (any sharding) from a checkpoint directory (any sharding)."""
    directory = Path(directory)
    index = read_index(directory)
    if index.get("format", 1) != FORMAT:
        raise ValueError(
            f"{directory}: checkpoint format {index.get('format', 1)}, this nvkg reads format {FORMAT} "
            "(ComplEx rows are (real, imaginary) pairs since format 2); train it again"
        )
    if index["entity_rows"] != model.entities.num_rows:
        raise ValueError(f"{directory}: {index['entity_rows']} entity rows, the dataset has {model.entities.num_rows}")
    ents = model.entities
    parts = []
    for path in sorted(directory.glob("entities-*.pt")):
        match = _SHARD.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path}: not an entity shard name (entities-LO-HI.pt)")
        lo, hi = (int(v) for v in match.groups())
        if hi > index["entity_rows"]:
            raise ValueError(f"{path}: rows [{lo}, {hi}) past the checkpoint's {index['entity_rows']} (another run's?)")
        if lo < ents.hi and hi > ents.lo:
            part = _load(path)
            if list(part.get("rows", ())) != [lo, hi] or len(part["weight"]) != hi - lo:
                raise ValueError(
                    f"{path}: holds rows {part.get('rows')}, not the [{lo}, {hi}) of its name (another run's?)"
                )
            parts.append(part)
    try:
        ents.load_ranges(parts)
    except ValueError as err:
        raise ValueError(f"{directory} (entity shards): {err}") from None
    try:
        model.relations.load_ranges([_load(directory / RELATIONS)])
        if model.bias is not None:
            model.bias.load_ranges([_load(directory / RELATION_BIAS)])
    except ValueError as err:
        raise ValueError(f"{directory} ({RELATIONS}): {err}") from None
    return RunState(**index["state"])


def resume(directory: Path | None, config: RunConfig, model: KGModel) -> RunState:
    """Load the latest checkpoint if there is one, after checking it belongs to this config."""
    if directory is None:
        return RunState()
    saved, current, defaults = read_index(directory)["config"], to_dict(config), to_dict(RunConfig())
    for key in FROZEN_KEYS:
        was = _lookup(saved, key)
        if isinstance(was, dict):  # a setting added since the checkpoint was written had its default then
            was = {**_lookup(defaults, key), **was}
        now = _lookup(current, key)
        if was != now:
            changed = _differences(was, now, key)
            raise ValueError(
                f"{directory}: checkpoint was trained with other settings, which a run cannot change: "
                f"{'; '.join(changed)}; use another --out directory"
            )
    return load_into(directory, model)


def _differences(was: object, now: object, key: str) -> list[str]:
    """Each dotted field under ``key`` whose value differs, as ``key: was -> now``."""
    if isinstance(was, dict) and isinstance(now, dict):
        return [
            d
            for name in sorted(set(was) | set(now))
            for d in _differences(was.get(name), now.get(name), f"{key}.{name}")
        ]
    return [] if was == now else [f"{key}: {was!r} -> {now!r}"]


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree
