"""What trained a run, recorded in metrics.json (``code``) and in every checkpoint: so a user can tell which
code made a result, and a run judged again later (``bench.uncertainty --rejudge``) is known to be the run
today's code would train.

Training is deterministic given its config and what ``training_record`` holds: the training code (the
SHA-256 of every source file of the packages training runs, the kernels' C sources included, except the
modules that only judge a trained run), torch and numpy, the compiled kernels' library (built for this CPU
by this compiler; None where torch ops stand in), the device, the data (its manifest's checksums) and the
number of data streams. A run resumed by other code than started it records each (``mixed``), and is the
same training as none. tests/trainer/test_provenance.py checks that training calls none of the modules
left out.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharding.kernels import native
from storage.dataset import KGDataset
from storage.layout import update_framed
from trainer.config import RunConfig, to_dict

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "sharding", "storage")
SOURCES = ("*.py", "*.c", "*.h")
JUDGING = frozenset(
    {"trainer/calibration.py", "trainer/classify.py", "trainer/report.py", "trainer/runs.py", "trainer/uncertainty.py"}
)
"""Modules that only judge or serve a trained run: calibration, classification, reports, loading a run."""
WHERE_FROM = ("commit",)
"""Keys that say where a run came from and not what decides its numbers."""
UNKNOWN_AS_NONE = ("training_code", "data")
"""Keys whose None means "could not be told" (``kernels`` None means torch ops stood in for them)."""


def training_sources(root: Path = ROOT) -> list[Path]:
    """The source files the fingerprint covers, sorted by their path under ``root``."""
    files = {
        path
        for package in PACKAGES
        for pattern in SOURCES
        for path in (root / package).rglob(pattern)
        if path.relative_to(root).as_posix() not in JUDGING and path.is_file()
    }
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def training_code(root: Path = ROOT) -> str | None:
    """SHA-256 of the training sources: each file's path under ``root`` and its bytes, length-prefixed so
    no two different trees hash alike; None when one cannot be read (then no run is the same training)."""
    digest = hashlib.sha256()
    try:
        for path in training_sources(root):
            update_framed(digest, path.relative_to(root).as_posix().encode(), path.read_bytes())
    except OSError:
        return None
    return digest.hexdigest()


def git_commit(root: Path = ROOT) -> str | None:
    """The commit of the checkout ``root`` is, with ``-dirty`` when its training sources have changes not
    committed; None where ``root`` is not a checkout's top (an image, a package installed inside another
    checkout)."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(root), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None
        head = git("rev-parse", "HEAD")
        sources = [f":(glob){package}/**/{pattern}" for package in PACKAGES for pattern in SOURCES]
        changed = git("status", "--porcelain", "--", *sources, *(f":(exclude){path}" for path in sorted(JUDGING)))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if changed else head


def kernels_library() -> str | None:
    """The SHA-256 of the compiled kernels' library in use (built for this CPU by this compiler), or None
    where torch ops stand in for them."""
    library = native.library()
    if library is None:
        return None
    try:
        return hashlib.sha256(Path(library._name).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def data_fingerprint(dataset: KGDataset) -> str | None:
    """SHA-256 of the converted dataset's manifest (every file's checksum, the counts, the partitioning),
    where it came from aside; None when the manifest lists no checksums."""
    manifest = asdict(dataset.store.manifest)
    if not manifest.get("files"):
        return None
    manifest.pop("source", None)
    manifest.pop("name", None)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def config_fingerprint(config: RunConfig) -> str:
    """SHA-256 of every setting: a run resumed with other settings (a seed, a longer run) is not the run
    its last config would train from the start."""
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()


def training_record(config: RunConfig, device: torch.device, dataset: KGDataset, streams: int) -> dict[str, Any]:
    """What decides a run's numbers (its config among them), and (``commit``) where its code came from."""
    return {
        "config": config_fingerprint(config),
        "training_code": training_code(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "kernels": kernels_library(),
        "device": device_name(device),
        "data": data_fingerprint(dataset),
        "streams": streams,
        "commit": git_commit(),
    }


def merged(previous: dict[str, Any] | None, current: dict[str, Any], resumed: bool) -> dict[str, Any]:
    """The record of a run after this process joins it: ``current`` for a fresh run; the checkpoint's for a
    run resumed by the same training; else ``{"mixed": [each record]}`` (a checkpoint from before records
    were kept counts as unknown, None)."""
    if not resumed:
        return current
    if previous is not None and "mixed" not in previous and same_training(previous, current):
        return previous
    earlier = previous["mixed"] if previous is not None and "mixed" in previous else [previous]
    return {"mixed": [*earlier, current]}


def same_training(recorded: Any, expected: dict[str, Any]) -> bool:
    """Whether a run's recorded ``code`` says it is the run ``expected`` (``training_record`` of the training
    one would run now) would train, bit for bit: every key but where it came from equal, none unknown."""
    if not isinstance(recorded, dict):
        return False
    if any(expected[key] is None for key in UNKNOWN_AS_NONE):
        return False
    return all(recorded.get(key, "absent") == expected[key] for key in expected if key not in WHERE_FROM)
