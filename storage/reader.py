"""Reading a dataset directory: whole splits for evaluation, and each worker's share of train, streamed.

An epoch's order is a seeded permutation of the split's row groups; the rows of that order are cut into
``world_size`` contiguous ranges of equal size (to one row), so every triple goes to exactly one worker
whatever the number of partitions, and a range may start or end inside a row group. A worker reads its
row groups in a background thread (``prefetch`` ahead) and shuffles the rows of each one, so the trainer
never waits on disk and batches are uniform samples (partitions already are).
"""

from __future__ import annotations

import math
import queue
import threading
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import (
    ALL_SPLITS,
    COLUMNS,
    ENTITIES,
    MANIFEST,
    NEGATIVE_SPLITS,
    RELATIONS,
    SPLITS,
    Manifest,
    verify_files,
)

Engine = Literal["pyarrow", "fastparquet"]
ENGINES: tuple[Engine, ...] = typing.get_args(Engine)


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    num_rows: int


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a row group."""

    group: RowGroup
    start: int
    stop: int


def worker_share(groups: list[RowGroup], rank: int, world_size: int, epoch: int, seed: int) -> list[Piece]:
    """The pieces of row groups worker ``rank`` reads in ``epoch``: a pure function of its arguments."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(len(groups))
    total = sum(g.num_rows for g in groups)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    pieces, offset = [], 0
    for index in order:
        group = groups[index]
        start, stop = max(lo, offset), min(hi, offset + group.num_rows)
        if start < stop:
            pieces.append(Piece(group, start - offset, stop - offset))
        offset += group.num_rows
    return pieces


def share_rows(groups: list[RowGroup], rank: int, world_size: int) -> int:
    total = sum(g.num_rows for g in groups)
    return total * (rank + 1) // world_size - total * rank // world_size


def _column_maxima(handle: pq.ParquetFile, row_group: int) -> dict[str, int]:
    """The largest value of each id column of a row group, from its statistics (when written)."""
    metadata = handle.metadata.row_group(row_group)
    maxima = {}
    for i in range(metadata.num_columns):
        column = metadata.column(i)
        stats = column.statistics
        if column.path_in_schema in COLUMNS and stats is not None and stats.has_min_max:
            maxima[column.path_in_schema] = int(stats.max)
    return maxima


class TripleStore:
    """An opened dataset directory: manifest checked, files verified, row groups indexed."""

    def __init__(self, root: Path, *, engine: Engine = "pyarrow", verify: bool = True):
        if engine not in ENGINES:
            raise ValueError(f"data.engine={engine!r}: expected one of {', '.join(ENGINES)}")
        self.root, self.engine = Path(root), engine
        self.manifest = Manifest.read(self.root)
        verify_files(self.root, self.manifest, checksums=verify)
        self._check_listing()
        m = self.manifest
        self._limits = {"head": m.num_entities, "relation": m.num_relations, "tail": m.num_entities}
        self._maxima: dict[tuple[str, int], dict[str, int]] = {}
        self._groups = {split: self._index(split) for split in m.splits}
        self._check_manifest()

    def _check_listing(self) -> None:
        """Every split's partitions are the files in its directory, and listed with their checksums; the
        negative splits are optional, but not on disk without the manifest listing them."""
        m, problems = self.manifest, []
        problems += [f"unknown split {split!r}" for split in m.splits if split not in ALL_SPLITS]
        for split in ALL_SPLITS:
            if split not in m.splits:
                if split in SPLITS:
                    problems.append(f"split {split!r} missing")
                elif any((self.root / split).glob("*.parquet")):
                    problems.append(f"{split}/ holds files, but the split is not listed")
                continue
            listed = set(m.partitions(split))
            on_disk = {f"{split}/{p.name}" for p in (self.root / split).glob("*.parquet")}
            if listed - set(m.files) or on_disk != listed:
                problems.append(f"{split}: {len(listed)} partitions listed, {len(on_disk)} files in {split}/")
        if problems:
            raise ValueError(f"{self.root / MANIFEST}: does not match the files it describes: {'; '.join(problems)}")

    def _check_manifest(self) -> None:
        """The manifest's counts against the files it describes (their Parquet metadata, not their rows)."""
        m, path = self.manifest, self.root / MANIFEST
        problems = []
        if not 0 <= m.num_train_entities <= m.num_entities or not 0 <= m.num_train_relations <= m.num_relations:
            problems.append("train entity/relation counts exceed the totals")
        for which, relative, expected in (
            ("entities", ENTITIES, m.num_entities),
            ("relations", RELATIONS, m.num_relations),
        ):
            rows = self._parquet(relative).metadata.num_rows
            if rows != expected:
                problems.append(f"num_{which}={expected}, {relative} has {rows} rows")
        for split in m.splits:
            if self.num_triples(split) != m.splits[split].triples:
                problems.append(
                    f"{split}: {m.splits[split].triples} triples listed, the files hold {self.num_triples(split)}"
                )
            for group in self._groups.get(split, []):
                for column, top in self._maxima[group.file, group.index].items():
                    if top >= self._limits[column]:
                        problems.append(
                            f"{group.file}: {column} id {top} is past the {self._limits[column]} the manifest lists"
                        )
                        break
        if problems:
            raise ValueError(f"{path}: does not match the files it describes: {'; '.join(problems[:5])}")

    def _index(self, split: str) -> list[RowGroup]:
        groups = []
        for relative in self.manifest.partitions(split):
            handle = self._parquet(relative)
            for i in range(handle.metadata.num_row_groups):
                groups.append(RowGroup(relative, i, handle.metadata.row_group(i).num_rows))
                self._maxima[relative, i] = _column_maxima(handle, i)
        return groups

    def _parquet(self, relative: str) -> pq.ParquetFile:
        path = self.root / relative
        try:
            return pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"{path}: unreadable Parquet file ({err})") from None

    def negative_splits(self) -> list[str]:
        """The optional splits of facts known to be false that this dataset has."""
        return [split for split in NEGATIVE_SPLITS if split in self.manifest.splits]

    def row_groups(self, split: str) -> list[RowGroup]:
        return self._groups[split]

    def num_triples(self, split: str) -> int:
        return sum(g.num_rows for g in self._groups[split])

    def read_columns(self, group: RowGroup) -> list[np.ndarray]:
        """The head, relation and tail columns of one row group, as stored (int32)."""
        path = self.root / group.file
        try:
            if self.engine == "fastparquet":
                import fastparquet

                handle = fastparquet.ParquetFile(str(path))
                frame = handle.read_row_group_file(handle.row_groups[group.index], list(COLUMNS), {})
                return [frame[name].to_numpy() for name in COLUMNS]
            table = self._parquet(group.file).read_row_group(group.index, columns=list(COLUMNS))
        except (pa.ArrowInvalid, OSError, ValueError, IndexError) as err:
            raise ValueError(f"{path}: cannot read row group {group.index} ({err})") from None
        return [table[name].to_numpy() for name in COLUMNS]

    def read_group(self, group: RowGroup, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """[rows, 3] int64 (head, relation, tail) of one row group, optionally only ``rows`` of it."""
        columns = self.read_columns(group)
        if any(len(c) != group.num_rows for c in columns):
            lengths = ", ".join(str(len(c)) for c in columns)
            raise ValueError(
                f"{self.root / group.file}: row group {group.index} holds {lengths} rows, expected {group.num_rows}"
            )
        for name, column in zip(COLUMNS, columns, strict=True):
            if len(column) and (column.min() < 0 or column.max() >= self._limits[name]):
                raise ValueError(
                    f"{self.root / group.file}: row group {group.index} has {name} ids outside "
                    f"[0, {self._limits[name]}) (corrupt file?)"
                )
        out = np.empty((len(columns[0][rows]), 3), np.int64)
        for i, column in enumerate(columns):
            out[:, i] = column[rows]  # gathering int32 columns, then widening, beats permuting [n, 3] int64 rows
        return out

    def read_split(self, split: str) -> np.ndarray:
        """The whole split as int64 [N, 3], in stored order."""
        groups = self._groups.get(split, [])
        if not groups:
            return np.empty((0, 3), np.int64)
        return np.concatenate([self.read_group(g) for g in groups])

    def names(self, which: str) -> pa.Table:
        """``entities`` or ``relations``: id, name, frequency."""
        relative = {"entities": ENTITIES, "relations": RELATIONS}[which]
        try:
            return pq.read_table(self.root / relative)
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"{self.root / relative}: unreadable Parquet file ({err})") from None

    def num_batches(self, split: str, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
        return math.ceil(share_rows(self._groups[split], rank, world_size) / batch_size)

    def batches(
        self,
        split: str,
        *,
        batch_size: int,
        epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
    ) -> Iterator[np.ndarray]:
        """Worker ``rank``'s batches ([<=batch_size, 3] int64) of ``epoch``; only the last may be short."""
        pieces = worker_share(self._groups[split], rank, world_size, epoch, seed)
        rng = np.random.default_rng([seed, epoch, rank, world_size])
        carry = np.empty((0, 3), np.int64)
        for rows in _prefetched(self._read_pieces(pieces, rng), prefetch):
            rows = np.concatenate([carry, rows]) if len(carry) else rows
            whole = len(rows) - len(rows) % batch_size
            for start in range(0, whole, batch_size):
                yield rows[start : start + batch_size]
            carry = rows[whole:]
        if len(carry):
            yield carry

    def _read_pieces(self, pieces: list[Piece], rng: np.random.Generator) -> Iterator[np.ndarray]:
        for piece in pieces:
            yield self.read_group(piece.group, piece.start + rng.permutation(piece.stop - piece.start))


_DONE = object()


def _prefetched(items: Iterator[np.ndarray], depth: int) -> Iterator[np.ndarray]:
    """Run ``items`` in a background thread, ``depth`` ahead; errors surface in the consumer."""
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        """Put unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            offer(err)

    thread = threading.Thread(target=produce, name="nvkg-reader", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
