"""A dataset as the trainer sees it: ids, frequencies, evaluation facts, and streamed training batches.

``open_dataset`` takes a converted dataset directory (``manifest.json``), or a bundled name or a
directory of ``train.txt``/``valid.txt``/``test.txt`` (and optionally ``valid_negatives.txt``,
``test_negatives.txt``: facts known to be false), which it converts once into a cache directory
keyed by the files' sha256, so there is one read path: Parquet through storage/reader.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import torch

from storage.atomic import recover_swap
from storage.convert import convert
from storage.layout import FORMAT_VERSION, MANIFEST, Manifest, update_framed
from storage.reader import Engine, TripleStore
from storage.sources import TsvSource

BUNDLED_DIR = Path(__file__).parent / "bundled"


@dataclass(kw_only=True)
class DataConfig:
    """The ``data`` section of a run's config."""

    dataset: str = "umls"
    """Bundled dataset name (nations, umls, kinships, wn18, wn18rr), a directory with
    train/valid/test.txt (converted once into cache_dir), or a converted dataset directory."""
    cache_dir: str = "~/.cache/nvkg/datasets"
    """Where triple files are converted to Parquet the first time they are used."""
    engine: Engine = "pyarrow"
    """Parquet reader: pyarrow or fastparquet."""
    verify_checksums: bool = True
    """Check every file's sha256 against the manifest when the dataset is opened."""
    prefetch: int = 2
    """Row groups a worker reads ahead in a background thread (0: read inline)."""


@dataclass(frozen=True)
class KGDataset:
    """The scorable part of a dataset: entities and relations that occur in train.

    ``valid``/``test`` are int64 [N, 3] (head, relation, tail) facts whose symbols all occur in train;
    ``dropped`` counts, per split, the facts left out because one does not. ``negative_facts`` holds, by
    split (``valid``, ``test``), the facts known to be false of the optional negative splits, filtered
    alike (``dropped_negatives`` counts what was left out); see ``negatives``.
    """

    name: str
    store: TripleStore
    valid: torch.Tensor
    test: torch.Tensor
    dropped: dict[str, int] = field(default_factory=dict)
    negative_facts: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped_negatives: dict[str, int] = field(default_factory=dict)

    @property
    def num_entities(self) -> int:
        return self.store.manifest.num_train_entities

    @property
    def num_relations(self) -> int:
        return self.store.manifest.num_train_relations

    @cached_property
    def train(self) -> torch.Tensor:
        """Every training fact [N, 3], in stored order (filters and small-graph tools; training streams)."""
        return torch.from_numpy(self.store.read_split("train"))

    @cached_property
    def entity_frequency(self) -> torch.Tensor:
        """Occurrences of each entity in train (as head or tail), [num_entities]."""
        return torch.from_numpy(self.store.names("entities")["frequency"].to_numpy()[: self.num_entities].copy())

    def negatives(self, split: str) -> torch.Tensor | None:
        """Facts known to be false for ``split`` (``valid`` or ``test``), int64 [N, 3], or None when the
        dataset has no ``{split}_negatives`` file."""
        if split not in ("valid", "test"):
            raise ValueError(f"negatives of {split!r}: expected valid or test")
        return self.negative_facts.get(split)

    def negatives_file(self, split: str) -> str:
        """The name of the file ``split``'s negatives were converted from (``test_negatives.txt``)."""
        return Path(source_file(self.store.manifest, f"{split}_negatives")).name

    def all_known(self) -> torch.Tensor:
        """Every known true fact (train + valid + test), used to filter rankings."""
        return torch.cat([self.train, self.valid, self.test])

    def known_chunks(self) -> Iterator[torch.Tensor]:
        """The facts of ``all_known`` as int64 [n, 3] pieces, train one row group at a time: a caller
        that only asks whether some facts are known never holds the whole train split."""
        for group in self.store.row_groups("train"):
            yield torch.from_numpy(self.store.read_group(group))
        yield self.valid
        yield self.test

    def names(self, which: str) -> pa.Table:
        """``entities`` or ``relations`` that occur in train: id, name, frequency, as Arrow columns (a
        Python list of Freebase86m's names would take several GB)."""
        count = self.num_entities if which == "entities" else self.num_relations
        return self.store.names(which).slice(0, count)

    def num_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
        return self.store.num_batches("train", batch_size, rank, world_size)

    def batches(
        self, *, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1, prefetch: int = 2
    ) -> Iterator[torch.Tensor]:
        batches = self.store.batches(
            "train", batch_size=batch_size, epoch=epoch, seed=seed, rank=rank, world_size=world_size, prefetch=prefetch
        )
        return (torch.from_numpy(batch) for batch in batches)


def bundled_names() -> list[str]:
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "train.txt").is_file())


def _source_dir(name_or_dir: str | Path) -> Path:
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if (BUNDLED_DIR / str(name_or_dir)).is_dir():
        return BUNDLED_DIR / str(name_or_dir)
    raise ValueError(
        f"dataset {str(name_or_dir)!r} is neither a directory nor a bundled dataset "
        f"(bundled: {', '.join(bundled_names())})"
    )


def _cache_key(source: TsvSource) -> str:
    digest = hashlib.sha256(f"nvkg-format-{FORMAT_VERSION}".encode())
    for split, path in sorted(source.files.items()):
        update_framed(digest, split.encode(), path.read_bytes())
    return digest.hexdigest()[:16]


def resolve_store(name_or_dir: str | Path, cache_dir: str | Path) -> Path:
    """A dataset directory for ``name_or_dir``, converting triple files into ``cache_dir`` the first time."""
    recover_swap(Path(name_or_dir).expanduser())
    directory = _source_dir(name_or_dir)
    if (directory / MANIFEST).is_file():
        return directory
    source = TsvSource(directory)
    target = Path(cache_dir).expanduser() / f"{directory.name}-{_cache_key(source)}"
    recover_swap(target)
    if not (target / MANIFEST).is_file():
        try:
            convert(source, target, name=directory.name)
        except (ValueError, OSError):
            if not (target / MANIFEST).is_file():  # not another process winning the same conversion
                raise
    return target


def scorable(facts: torch.Tensor, num_entities: int, num_relations: int) -> torch.Tensor:
    keep = (facts[:, 0] < num_entities) & (facts[:, 2] < num_entities) & (facts[:, 1] < num_relations)
    return facts[keep]


def load_data(data: DataConfig, *, lead: bool = True, barrier: Callable[[], None] = lambda: None) -> KGDataset:
    """Open the configured dataset. With several workers, the ``lead`` one converts triple files first and
    the others wait at ``barrier``, so they never race on the cache."""
    root = resolve_store(data.dataset, data.cache_dir) if lead else None
    barrier()
    # Resolving hashes triple files to find their cached conversion: once per worker, not twice.
    root = root or resolve_store(data.dataset, data.cache_dir)
    return open_dataset(root, cache_dir=data.cache_dir, engine=data.engine, verify=data.verify_checksums)


def source_file(manifest: Manifest, split: str) -> str:
    """The file ``split`` (``test``, ``valid_negatives``) was converted from, as the manifest records it, else
    the split's name."""
    return str(manifest.source.get("files", {}).get(split) or split)


def open_dataset(
    name_or_dir: str | Path, *, cache_dir: str | Path, engine: Engine = "pyarrow", verify: bool = True
) -> KGDataset:
    store = TripleStore(resolve_store(name_or_dir, cache_dir), engine=engine, verify=verify)
    manifest = store.manifest
    evaluation, dropped = {}, {}
    for split in ("valid", "test"):
        facts = torch.from_numpy(store.read_split(split))
        evaluation[split] = scorable(facts, manifest.num_train_entities, manifest.num_train_relations)
        dropped[split] = len(facts) - len(evaluation[split])
        if len(evaluation[split]) == 0:
            where = source_file(manifest, split)
            what = "has no facts" if not len(facts) else "has no fact whose symbols all occur in train"
            raise ValueError(f"{store.root} ({where}): the {split} split {what}; training evaluates on valid and test")
    negatives, dropped_negatives = {}, {}
    for split in store.negative_splits():
        facts = torch.from_numpy(store.read_split(split))
        kept = scorable(facts, manifest.num_train_entities, manifest.num_train_relations)
        if len(kept) == 0:
            raise ValueError(
                f"{source_file(manifest, split)} (converted to {store.root}): none of its {len(facts)} negatives "
                "has all its symbols in train, so none can be scored"
            )
        evaluated = split.removesuffix("_negatives")
        negatives[evaluated], dropped_negatives[evaluated] = kept, len(facts) - len(kept)
    return KGDataset(name=manifest.name, store=store, dropped=dropped, negative_facts=negatives,
                     dropped_negatives=dropped_negatives, **evaluation)  # fmt: skip
