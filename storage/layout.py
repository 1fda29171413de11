"""The on-disk dataset format: a contract between the converters that write it and the readers.

    DATASET/
      manifest.json            format version, counts, partitioning, sha256 and size of every file
      entities.parquet         id (int32), name (string), frequency (int64: occurrences in train)
      relations.parquet        id (int32), name (string), frequency (int64)
      train/part-00000.parquet head, relation, tail (int32), row groups of ``row_group_rows``
      valid/part-00000.parquet
      test/part-00000.parquet
      valid_negatives/part-00000.parquet   optional: facts known to be false (same columns)
      test_negatives/part-00000.parquet

Entity ids ``[0, num_train_entities)`` occur in train; ids past it occur only in valid/test (their
facts are kept in the files and counted as ``unseen_facts``; a model cannot score them). The same
holds for relations. A triple's partition is a seeded hash of (head, relation, tail), so each
partition is a uniform sample of its split and duplicates meet in one partition, where they are
dropped; rows are shuffled inside a partition.

The negative splits are optional: a manifest lists them under ``splits`` only when the input had them,
so a dataset without them is the format-1 dataset it always was, and a reader that predates them
ignores them. Their symbols follow valid/test (unseen ones get ids past the train ranges, their facts
are counted as ``unseen_facts``), and none of their facts is a train, valid or test fact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENTITIES = "entities.parquet"
RELATIONS = "relations.parquet"
SPLITS = ("train", "valid", "test")
NEGATIVE_SPLITS = ("valid_negatives", "test_negatives")
"""Optional splits of facts known to be false, for triple classification."""
ALL_SPLITS = SPLITS + NEGATIVE_SPLITS
COLUMNS = ("head", "relation", "tail")


def partition_name(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


@dataclass
class SplitCounts:
    triples: int = 0
    """Rows written (after dropping duplicates and bad lines)."""
    lines: int = 0
    """Input records read for this split (non-empty lines, or rows of an id file)."""
    duplicates: int = 0
    bad_lines: int = 0
    """Malformed lines skipped with --skip-bad-lines (otherwise conversion fails on the first)."""
    literals: int = 0
    """N-Triples only: triples whose object is a literal, skipped."""
    filtered: int = 0
    """N-Triples only: triples whose predicate is not in the relation allow-list."""
    unseen_facts: int = 0
    """valid/test and the negative splits: facts with an entity or relation that never occurs in train."""
    partitions: int = 0


@dataclass
class Manifest:
    name: str
    source: dict
    num_entities: int
    num_train_entities: int
    num_relations: int
    num_train_relations: int
    row_group_rows: int
    partitioning: dict
    splits: dict[str, SplitCounts]
    files: dict[str, dict] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise ValueError(f"{root}: not an nvkg dataset ({MANIFEST} missing)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON: {err}") from None
        version = raw.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{path}: format_version {version!r} is newer than this nvkg reads ({FORMAT_VERSION}); upgrade nvkg"
            )
        try:
            raw["splits"] = {split: SplitCounts(**counts) for split, counts in raw["splits"].items()}
            return cls(**raw)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: malformed manifest ({err})") from None

    def partitions(self, split: str) -> list[str]:
        return [partition_name(split, i) for i in range(self.splits[split].partitions)]


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def update_framed(digest: hashlib._Hash, *parts: bytes) -> None:
    """Feed ``parts`` to ``digest`` each behind its length, so that no two different sequences of parts (bytes
    moved from one to the next) feed it the same bytes."""
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)


def describe_file(root: Path, relative: str) -> dict:
    path = Path(root) / relative
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def verify_files(root: Path, manifest: Manifest, checksums: bool = True) -> None:
    """Every file the manifest lists exists with its size (and sha256); raise naming the first that does not."""
    for relative, expected in manifest.files.items():
        path = Path(root) / relative
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise ValueError(f"{path}: {size} bytes, manifest says {expected['bytes']} (truncated or replaced)")
        if checksums and sha256_file(path) != expected["sha256"]:
            raise ValueError(f"{path}: sha256 mismatch with {MANIFEST} (corrupted or replaced)")
