"""Raw triples -> the Parquet dataset of storage/layout.py, streaming, with memory bounded by the vocabulary.

Named inputs (TSV, N-Triples) take two passes over the files:
  1. vocabulary: the distinct entity and relation names of train (sorted: the same files always give
     the same ids), then those only valid/test (or the negative splits) use, appended after them;
  2. encoding: each chunk's names become int32 ids (one hash lookup per column, pyarrow's ``index_in``)
     and its rows are appended to per-partition spill files by a seeded hash of the triple.
Id inputs (DGL-KE) skip pass 1. Finally each spill file (one partition, ``partition_rows`` triples on
average) is loaded alone, de-duplicated, shuffled and written as Parquet row groups. Peak memory is the
vocabulary plus one chunk plus one partition, whatever the number of triples.

Everything is written under a temporary directory beside the output and swapped into place at the end
(storage/atomic.py), so an interrupted conversion leaves nothing that loads, a killed swap is finished by
the next start, and the next conversion removes the temporary directory of a writer that died.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from sharding.kernels import native
from sharding.rng import splitmix64
from storage.atomic import recover_swap, remove_stale_temps, swap_dir, temp_dir_beside
from storage.faults import fault_point
from storage.layout import (
    ALL_SPLITS,
    COLUMNS,
    ENTITIES,
    MANIFEST,
    NEGATIVE_SPLITS,
    RELATIONS,
    SPLITS,
    Manifest,
    SplitCounts,
    describe_file,
    partition_name,
)
from storage.sources import BLOCK_BYTES, DglKeSource, first_bad_line, numbered_lines, shown

# pyarrow rebuilds the lookup table of ``index_in`` for every chunk; chunks at least this many bytes
# per vocabulary entry keep that rebuild a small share of the work on large vocabularies.
BYTES_PER_NAME = 64
MAX_BLOCK_BYTES = 1 << 30


def _ignore(rows: int) -> None:
    """The progress callback of a conversion without a progress bar."""


@dataclass(kw_only=True)
class ConvertOptions:
    partition_rows: int = 2_000_000
    """Target triples per partition file (the unit of de-duplication and of memory while finishing)."""
    row_group_rows: int = 262_144
    """Rows per Parquet row group: the unit a streaming reader fetches."""
    seed: int = 0
    """Seeds the partition hash and the shuffle inside partitions."""

    def validate(self) -> None:
        """Raise naming the option (the command line's --partition-rows, --row-group-rows, --seed)."""
        for option, value in (("partition_rows", self.partition_rows), ("row_group_rows", self.row_group_rows)):
            if value <= 0:
                raise ValueError(f"{option}={value}: must be positive")
        if not 0 <= self.seed < 2**64:  # it seeds a 64-bit hash
            raise ValueError(f"seed={self.seed}: must be an integer in [0, 2**64)")


@dataclass(frozen=True, kw_only=True)
class ExpectedCounts:
    """What a published dataset holds; a conversion that finds other numbers is refused before writing."""

    num_entities: int
    """Entities in the vocabulary (every split)."""
    num_relations: int
    """Relations in the vocabulary (every split)."""
    num_train_triples: int
    """Rows of the train file as published, before duplicates are dropped."""

    def check(self, dataset: str, vocab: Vocabulary, rows: dict[str, int]) -> None:
        wrong = self._differences((len(vocab.entities), len(vocab.relations), rows.get("train", 0)))
        if wrong:
            raise ValueError(
                f"dataset {dataset!r}: the archive does not hold the published dataset ({wrong}); nothing was written"
            )

    def check_manifest(self, dataset: str, root: Path, manifest: Manifest) -> None:
        """A dataset directory converted earlier (perhaps from a sample) against the published counts."""
        wrong = self._differences((manifest.num_entities, manifest.num_relations, manifest.splits["train"].lines))
        if wrong:
            raise ValueError(f"{root}: does not hold the published {dataset!r} ({wrong})")

    def _differences(self, found: tuple[int, int, int]) -> str:
        expected = (self.num_entities, self.num_relations, self.num_train_triples)
        return "; ".join(
            f"{what}: expected {want:,}, found {got:,}"
            for what, want, got in zip(("entities", "relations", "train triples"), expected, found, strict=True)
            if want != got
        )


class Source(Protocol):
    kind: str
    files: dict[str, Path]
    block_bytes: int

    def chunks(self, split: str, counts: SplitCounts | None = None): ...


@dataclass
class Vocabulary:
    """Names in id order; ids below ``num_train_*`` occur in train."""

    entities: pa.Array
    relations: pa.Array
    num_train_entities: int
    num_train_relations: int
    named: bool
    """True: chunks hold names to look up; False: chunks hold ids to range-check."""
    indexes: dict[str, NameIndex | None] = field(default_factory=dict)
    """The hashed index of ``entities`` and ``relations`` (built on first use; None: pyarrow's lookup)."""

    def index(self, kind: str) -> NameIndex | None:
        if kind not in self.indexes:
            self.indexes[kind] = NameIndex.of(getattr(self, kind))
        return self.indexes[kind]

    def lookup(self, values: pa.ChunkedArray, kind: str, path: Path) -> np.ndarray:
        index = self.index(kind)
        return lookup(values, getattr(self, kind)) if index is None else index.lookup(values, path)

    def encode(self, table: pa.Table, path: Path) -> np.ndarray:
        """[n, 3] int32 (head, relation, tail) ids of a chunk."""
        if self.named:
            # One lookup for heads and tails together.
            ends = self.lookup(pa.chunked_array(table["head"].chunks + table["tail"].chunks), "entities", path)
            ids = np.empty((table.num_rows, 3), np.int32)
            ids[:, 0], ids[:, 2] = ends[: table.num_rows], ends[table.num_rows :]
            ids[:, 1] = self.lookup(table["relation"], "relations", path)
            return ids
        ids = np.stack([table[name].to_numpy() for name in COLUMNS], axis=1)
        bounds = np.array([len(self.entities), len(self.relations), len(self.entities)])
        if ((ids < 0) | (ids >= bounds)).any():
            number, text = first_bad_line(path, _out_of_range(bounds))
            raise ValueError(
                f"{path}:{number}: id out of range ({len(self.entities)} entities, "
                f"{len(self.relations)} relations): {text!r}"
            )
        return ids.astype(np.int32)


def _out_of_range(bounds: np.ndarray):
    def is_bad(line: bytes) -> bool:
        if not line.strip():
            return False  # the reader skips empty lines
        head, tail, relation = (_int64_as_read(f) for f in line.split(b"\t"))  # DGL-KE order
        return not all(0 <= v < b for v, b in zip((head, relation, tail), bounds, strict=True))

    return is_bad


def _int64_as_read(field: bytes) -> int:
    """The integer pyarrow's CSV reader makes of an id field: spaces trimmed, decimal with any leading zeros,
    or hexadecimal (``0x10``), which it reads as 64 bits wrapping to a negative int64 past 2^63."""
    digits = field.strip(b" ")
    if digits[:2].lower() == b"0x":
        value = int(digits[2:], 16)
        return value - 2**64 if value >= 2**63 else value
    return int(digits)


CONCAT_BYTES = 1 << 31
"""Strings that one string array's 32-bit offsets cannot hold: ``_distinct`` leaves them to pyarrow."""


def _distinct(arrays: list[pa.Array]) -> pa.Array:
    """The distinct strings of ``arrays``: through the compiled hash table (``native.distinct_strings``, ~3x
    pyarrow's ``unique`` here, which was most of the first pass), else pyarrow's."""
    if not arrays or not any(len(a) for a in arrays):
        return pa.array([], pa.string())
    if sum(a.nbytes for a in arrays) >= CONCAT_BYTES:
        return pc.unique(pa.chunked_array(arrays, pa.string()))
    names = pa.concat_arrays([a.cast(pa.string()) for a in arrays]) if len(arrays) > 1 else arrays[0]
    found = native.distinct_strings(names)
    return pc.unique(names) if found is None else found


def _collect_names(
    source: Source, splits: tuple[str, ...], rows: dict[str, int], advance: Callable[[int], None] = _ignore
) -> tuple[pa.Array, pa.Array]:
    """Distinct entity and relation names over ``splits``; adds the triples read per split to ``rows``."""
    entities: list[pa.Array] = []
    relations: list[pa.Array] = []
    merged_size = 0
    for split in splits:
        rows[split] = 0
        for table in source.chunks(split):
            rows[split] += table.num_rows
            advance(table.num_rows)
            entities.append(_distinct(table["head"].chunks + table["tail"].chunks))
            relations.append(_distinct(table["relation"].chunks))
            # Merge the per-chunk sets once they outgrow the merged set: memory stays O(vocabulary).
            if sum(len(a) for a in entities) > 2 * merged_size + 500_000:
                entities, relations = [_distinct(entities)], [_distinct(relations)]
                merged_size = len(entities[0])
    return _distinct(entities), _distinct(relations)


@dataclass
class NameIndex:
    """Names -> positions through a 64-bit hash of each name (``native.hash_strings``): the vocabulary's
    hashes are sorted once and bucketed by their top bits (about two per bucket), so a chunk costs a hash
    and a probe of its bucket per name (``native.probe_hashes``), whatever the vocabulary's size
    (pyarrow's ``index_in`` builds a hash table of a whole side per call). Used only when the vocabulary's
    hashes are distinct; every name looked up is in the vocabulary (the first pass collected them), so an
    equal hash is the name."""

    hashes: np.ndarray
    """The vocabulary's hashes, sorted."""
    positions: np.ndarray
    """The position in the vocabulary of each of ``hashes``."""
    starts: np.ndarray
    """Where each bucket of ``hashes`` starts, and the end."""
    shift: int

    @classmethod
    def of(cls, names: pa.Array) -> NameIndex | None:
        """None where the kernels cannot be built or two names share a hash (then pyarrow looks up)."""
        hashes = native.hash_strings(names)
        if hashes is None or len(hashes) == 0:
            return None
        positions = np.argsort(hashes)
        hashes = hashes[positions]
        if (hashes[1:] == hashes[:-1]).any():
            return None
        bits = max(1, int(np.ceil(np.log2(len(hashes)))) - 1)
        shift = 64 - bits
        counts = np.bincount((hashes >> np.uint64(shift)).astype(np.intp), minlength=1 << bits)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(hashes, positions.astype(np.int32), starts, shift)

    def lookup(self, values: pa.ChunkedArray, path: Path) -> np.ndarray:
        wanted = np.concatenate([_hashes(chunk) for chunk in values.chunks] or [np.empty(0, np.uint64)])
        ids, missing = native.probe_hashes(self.hashes, self.starts, self.positions, self.shift, wanted)
        if missing:
            raise ValueError(f"{path}: a name is missing from the first pass's vocabulary (changed meanwhile?)")
        return ids


def _hashes(names: pa.Array) -> np.ndarray:
    hashes = native.hash_strings(names)
    if hashes is None:  # a NameIndex exists only where the kernels were built
        raise RuntimeError("the compiled kernels hashed the vocabulary but cannot hash a chunk")
    return hashes


def lookup(values: pa.ChunkedArray, vocabulary: pa.Array) -> np.ndarray:
    """Position of each value in ``vocabulary`` (every value must occur there).

    pyarrow's ``index_in`` builds a hash table of its value set on every call. A chunk with at least as
    many values as the vocabulary hashes the vocabulary; a smaller one (valid/test, a short last block)
    hashes its own distinct values and probes them with the vocabulary instead.
    """
    if len(values) >= len(vocabulary):
        return pc.index_in(values, value_set=vocabulary).to_numpy()
    encoded = pc.dictionary_encode(values.combine_chunks())
    position = pc.index_in(vocabulary, value_set=encoded.dictionary)  # [V]: index among the distinct values
    found = position.is_valid().to_numpy(zero_copy_only=False)
    ids = np.empty(len(encoded.dictionary), np.int64)
    ids[position.filter(position.is_valid()).to_numpy()] = np.flatnonzero(found)
    return ids[encoded.indices.to_numpy()]


def _sorted(names: pa.Array) -> pa.Array:
    return pc.take(names, pc.sort_indices(names))


def _append_unseen(train: pa.Array, other: pa.Array) -> pa.Array:
    """Train names sorted, then the names only ``other`` has, sorted (hashing the smaller side)."""
    if len(other) >= len(train):
        seen = pc.is_in(other, value_set=train)
    else:
        seen = np.zeros(len(other), dtype=bool)
        position = pc.index_in(train, value_set=other)
        seen[position.filter(position.is_valid()).to_numpy()] = True
        seen = pa.array(seen)
    return pa.concat_arrays([_sorted(train), _sorted(pc.filter(other, pc.invert(seen)))])


def build_vocabulary(source: Source, advance: Callable[[int], None] = _ignore) -> tuple[Vocabulary, dict[str, int]]:
    """The vocabulary of a source, and the triples per split (to size the partitions); ``advance`` is told
    of the triples read."""
    if isinstance(source, DglKeSource):
        entities, relations = source.vocabularies()
        counts = {split: sum(t.num_rows for t in source.chunks(split)) for split in source.files}
        return Vocabulary(entities.names, relations.names, len(entities.names), len(relations.names), False), counts
    rows: dict[str, int] = {}
    train_entities, train_relations = _collect_names(source, ("train",), rows, advance)
    if rows["train"] == 0:
        raise ValueError(f"{source.files['train']}: split is empty")
    eval_splits = tuple(s for s in ("valid", "test", *NEGATIVE_SPLITS) if s in source.files)
    eval_entities, eval_relations = _collect_names(source, eval_splits, rows, advance)
    vocab = Vocabulary(
        entities=_append_unseen(train_entities, eval_entities),
        relations=_append_unseen(train_relations, eval_relations),
        num_train_entities=len(train_entities),
        num_train_relations=len(train_relations),
        named=True,
    )
    return vocab, rows


def partition_of(ids: np.ndarray, num_partitions: int, seed: int) -> np.ndarray:
    """Partition of each (head, relation, tail) row: splitmix64 chained over seed, head, relation, tail."""
    h, r, t = (ids[:, i].astype(np.uint64) for i in range(3))
    key = splitmix64(splitmix64(splitmix64(np.uint64(seed) ^ h) ^ r) ^ t)
    return (key % np.uint64(num_partitions)).astype(np.int64)


class _Spill:
    """Appends each chunk's rows to one raw int32 file per partition."""

    def __init__(self, directory: Path, num_partitions: int, seed: int):
        self.directory, self.num_partitions, self.seed = directory, num_partitions, seed
        directory.mkdir(parents=True)
        # One handle per partition stays open across all chunks; close() (in a finally) closes them.
        self.handles = [open(self.path(i), "wb") for i in range(num_partitions)]  # noqa: SIM115

    def path(self, index: int) -> Path:
        return self.directory / f"{index:05d}.bin"

    def add(self, ids: np.ndarray) -> None:
        if self.num_partitions == 1:  # nothing to route: skip hashing every row
            self.handles[0].write(ids.tobytes())
            return
        part = partition_of(ids, self.num_partitions, self.seed)
        order = np.argsort(part, kind="stable")
        bounds = np.cumsum(np.bincount(part, minlength=self.num_partitions))
        start = 0
        for index, stop in enumerate(bounds):
            if stop > start:
                self.handles[index].write(ids[order[start:stop]].tobytes())
            start = stop

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


def _distinct_shuffled(raw: np.ndarray, num_entities: int, num_relations: int, rng: np.random.Generator):
    """The distinct rows of [n, 3] int32 ids in a random order, as three int32 columns."""
    if len(raw) and num_entities * num_relations * num_entities < 2**63:
        # One int64 key per row, sorted and shuffled in place: several times faster than sorting
        # 12-byte records, and about 32 bytes per row at the peak.
        key = raw[:, 0].astype(np.int64)
        key *= num_relations
        key += raw[:, 1]
        key *= num_entities
        key += raw[:, 2]
        key.sort()
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]
        rng.shuffle(key)
        tail = (key % num_entities).astype(np.int32)
        key //= num_entities
        relation = (key % num_relations).astype(np.int32)
        key //= num_relations
        return [key.astype(np.int32), relation, tail]
    rows = np.unique(raw.view(np.dtype((np.void, 12))).ravel()).view(np.int32).reshape(-1, 3)
    rows = rows[rng.permutation(len(rows))]
    return [np.ascontiguousarray(rows[:, i]) for i in range(3)]


def _finish_partition(
    spill: Path, out: Path, counts: SplitCounts, rng: np.random.Generator, vocab: Vocabulary, row_group_rows: int
) -> list[np.ndarray]:
    raw = np.fromfile(spill, dtype=np.int32).reshape(-1, 3)
    spill.unlink()
    columns = _distinct_shuffled(raw, len(vocab.entities), len(vocab.relations), rng)
    counts.duplicates += len(raw) - len(columns[0])
    counts.triples += len(columns[0])
    del raw
    table = pa.table(dict(zip(COLUMNS, columns, strict=True)))
    # Ids are near-uniform integers: dictionary pages and compression cost time and save little.
    pq.write_table(table, out, row_group_size=row_group_rows, compression="none", use_dictionary=False)
    return columns


def _write_split(
    source: Source, vocab: Vocabulary, split: str, num_rows: int, tmp: Path, options: ConvertOptions,
    advance: Callable[[int], None] = _ignore,
):  # fmt: skip
    counts = SplitCounts()
    path = source.files.get(split)
    if path is None:
        return counts, None, None
    counts.partitions = max(1, math.ceil(num_rows / options.partition_rows))
    spill = _Spill(tmp / "_spill" / split, counts.partitions, options.seed)
    try:
        for table in source.chunks(split, counts):
            spill.add(vocab.encode(table, path))
            advance(table.num_rows)
    finally:
        spill.close()
    entity_freq = np.zeros(len(vocab.entities), np.int64)
    relation_freq = np.zeros(len(vocab.relations), np.int64)
    (tmp / split).mkdir()
    for index in range(counts.partitions):
        rng = np.random.default_rng([options.seed, ALL_SPLITS.index(split), index])
        out = tmp / partition_name(split, index)
        head, relation, tail = _finish_partition(spill.path(index), out, counts, rng, vocab, options.row_group_rows)
        if split == "train":
            entity_freq += np.bincount(head, minlength=len(entity_freq))
            entity_freq += np.bincount(tail, minlength=len(entity_freq))
            relation_freq += np.bincount(relation, minlength=len(relation_freq))
        else:
            unseen = (head >= vocab.num_train_entities) | (tail >= vocab.num_train_entities)
            counts.unseen_facts += int((unseen | (relation >= vocab.num_train_relations)).sum())
    if counts.triples == 0:
        raise ValueError(f"{path}: split is empty")
    return counts, entity_freq, relation_freq


def _fact_keys(ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each [n, 3] (head, relation, tail) row (equal facts, equal keys)."""
    h, r, t = (ids[:, i].astype(np.uint64) for i in range(3))
    return splitmix64(splitmix64(splitmix64(h) ^ r) ^ t)


def _written_rows(tmp: Path, split: str, counts: SplitCounts) -> Iterator[np.ndarray]:
    """The rows of a split written under ``tmp``, one row group at a time, as [n, 3] int32."""
    for index in range(counts.partitions):
        handle = pq.ParquetFile(tmp / partition_name(split, index))
        for group in range(handle.metadata.num_row_groups):
            table = handle.read_row_group(group, columns=list(COLUMNS))
            yield np.stack([table[name].to_numpy() for name in COLUMNS], axis=1)


def _refuse_true_negatives(tmp: Path, source: Source, vocab: Vocabulary, splits: dict[str, SplitCounts]) -> None:
    """A negative split must hold no train, valid or test fact: a fact labelled both true and false is
    an input error (either label makes triple classification's accuracy wrong), refused naming the
    file, the line of the first such fact and how many there are. Streams the true splits one row group
    at a time against the (small) negatives' hashes; a hash match is confirmed exactly."""
    for split in NEGATIVE_SPLITS:
        if split not in splits:
            continue
        negatives = np.concatenate(list(_written_rows(tmp, split, splits[split])))
        keys = np.sort(_fact_keys(negatives))
        exact: set[tuple[int, ...]] | None = None
        clashes: dict[tuple[int, ...], str] = {}
        for true_split in SPLITS:
            for rows in _written_rows(tmp, true_split, splits[true_split]):
                row_keys = _fact_keys(rows)
                position = np.minimum(np.searchsorted(keys, row_keys), len(keys) - 1)
                candidates = rows[keys[position] == row_keys]
                if len(candidates):
                    exact = exact if exact is not None else set(map(tuple, negatives.tolist()))
                    for fact in map(tuple, candidates.tolist()):
                        if fact in exact:
                            clashes.setdefault(fact, true_split)
        if clashes:
            raise ValueError(_true_negative_message(source, vocab, split, clashes))


def _true_negative_message(source: Source, vocab: Vocabulary, split: str, clashes: dict) -> str:
    """Names the line of the first clash in the negatives' file (when it is a file: not an array)."""
    path = source.files[split]
    if vocab.named:
        entity, relation = vocab.entities, vocab.relations
        names: dict[tuple[str, ...], str] = {
            (entity[h].as_py(), relation[r].as_py(), entity[t].as_py()): s for (h, r, t), s in clashes.items()
        }

        def true_split(line: bytes) -> str | None:
            return names.get(tuple(line.decode("utf-8", errors="replace").split("\t")))
    else:

        def true_split(line: bytes) -> str | None:
            try:
                h, t, r = (int(f) for f in line.split(b"\t"))  # DGL-KE order
            except ValueError:
                return None
            return clashes.get((h, r, t))

    rule = f"{split} must hold only facts known to be false ({len(clashes):,} known true fact(s) in it; remove them)"
    if Path(path).is_file():
        for number, line in numbered_lines(path):  # as the readers see them: line breaks and a BOM dropped
            if (found := true_split(line)) is not None:
                return f"{path}:{number}: {shown(line)!r} is a fact of {found}, but {rule}"
    (h, r, t), found = next(iter(clashes.items()))
    return f"{path}: the fact of ids ({h}, {r}, {t}) is a fact of {found}, but {rule}"


def _write_names(path: Path, names: pa.Array, frequency: np.ndarray) -> None:
    table = pa.table(
        {"id": pa.array(np.arange(len(names), dtype=np.int32)), "name": names, "frequency": pa.array(frequency)}
    )
    pq.write_table(table, path)


def convert(
    source: Source,
    out: Path,
    *,
    name: str | None = None,
    options: ConvertOptions | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
    expect: ExpectedCounts | None = None,
    progress: bool = False,
) -> Manifest:
    """Convert ``source`` into the dataset directory ``out`` (atomically) and return its manifest;
    ``provenance`` (e.g. the archive's URL and sha256) is recorded under the manifest's ``source``;
    counts other than ``expect`` are refused before anything is written. ``progress``: a progress bar of
    the triples read, on a terminal."""
    options = _checked(Path(out), overwrite, source, options)
    name = name or Path(out).name
    # disable=None: tqdm shows the bar only when stderr is a terminal.
    bar = tqdm(desc=f"{name}: vocabulary", unit="triples", unit_scale=True, leave=False,
               disable=None if progress else True)  # fmt: skip
    with bar:
        vocab, rows = build_vocabulary(source, bar.update)
        if expect is not None:
            expect.check(name, vocab, rows)
        bar.reset(total=sum(rows.values()))
        bar.set_description(f"{name}: writing")
        return _write_dataset(source, vocab, rows, Path(out), name, options, provenance or {}, bar.update)


def _checked(out: Path, overwrite: bool, source: Source, options: ConvertOptions | None) -> ConvertOptions:
    """The options to write ``out`` with, once ``out`` and they are checked: before any input is read."""
    _check_out(out, overwrite, _inputs(source))
    options = options or ConvertOptions()
    options.validate()
    return options


def _inputs(source: Source) -> list[Path]:
    """The files a conversion reads, and the directory they were found in where there is one."""
    directory = getattr(source, "directory", None)
    return [*source.files.values(), *([Path(directory)] if directory is not None else [])]


def _check_out(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse an ``out`` that would replace what the conversion reads (the output is swapped in whole, so
    an ``out`` that is an input or holds one would delete it), or anything but a dataset: ``--overwrite``
    replaces an earlier conversion, never a directory or file of other contents."""
    recover_swap(out)
    resolved = out.resolve()
    for path in inputs:
        if resolved == path.resolve() or resolved in path.resolve().parents:
            raise ValueError(f"{out}: the output would replace the input {path}; write the dataset elsewhere")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ValueError(f"{out}: already exists (pass --overwrite to replace it)")
    if not (out / MANIFEST).is_file() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(
            f"{out}: is not an nvkg dataset ({MANIFEST} missing) and not empty; --overwrite replaces only a "
            "dataset, so remove it yourself or choose another output"
        )


def _write_dataset(
    source: Source,
    vocab: Vocabulary,
    rows: dict[str, int],
    out: Path,
    name: str,
    options: ConvertOptions,
    provenance: dict,
    advance: Callable[[int], None] = _ignore,
) -> Manifest:
    """``options`` as ``_checked`` gave them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    with temp_dir_beside(out) as tmp:
        try:
            manifest = _fill(tmp, source, vocab, rows, name, options, provenance, advance)
            swap_dir(tmp, out)
            return manifest
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _fill(
    tmp: Path,
    source: Source,
    vocab: Vocabulary,
    rows: dict[str, int],
    name: str,
    options: ConvertOptions,
    provenance: dict,
    advance: Callable[[int], None] = _ignore,
) -> Manifest:
    """Write the whole dataset into ``tmp``, its manifest last."""
    source.block_bytes = min(MAX_BLOCK_BYTES, max(BLOCK_BYTES, BYTES_PER_NAME * len(vocab.entities)))
    splits: dict[str, SplitCounts] = {}
    splits["train"], entity_freq, relation_freq = _write_split(
        source, vocab, "train", rows["train"], tmp, options, advance
    )
    fault_point("convert.split_written")
    for split in ("valid", "test"):
        splits[split], _, _ = _write_split(source, vocab, split, rows.get(split, 0), tmp, options, advance)
    for split in NEGATIVE_SPLITS:
        if split in source.files:  # optional: absent from the manifest when the input has none
            splits[split], _, _ = _write_split(source, vocab, split, rows.get(split, 0), tmp, options, advance)
    shutil.rmtree(tmp / "_spill", ignore_errors=True)
    _refuse_true_negatives(tmp, source, vocab, splits)
    _write_names(tmp / ENTITIES, vocab.entities, entity_freq)
    _write_names(tmp / RELATIONS, vocab.relations, relation_freq)
    manifest = Manifest(
        name=name,
        source={"kind": source.kind, "files": {s: str(p) for s, p in source.files.items()}, **provenance},
        num_entities=len(vocab.entities),
        num_train_entities=vocab.num_train_entities,
        num_relations=len(vocab.relations),
        num_train_relations=vocab.num_train_relations,
        row_group_rows=options.row_group_rows,
        partitioning={
            "method": "hash",
            "hash": "splitmix64(splitmix64(splitmix64(seed ^ head) ^ relation) ^ tail) % partitions",
            "seed": options.seed,
            "partition_rows": options.partition_rows,
            "shuffled_within_partition": True,
        },
        splits=splits,
    )
    files = [ENTITIES, RELATIONS] + [p for split in manifest.splits for p in manifest.partitions(split)]
    manifest.files = {relative: describe_file(tmp, relative) for relative in files}
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def write_id_dataset(
    out: Path,
    *,
    entity_names: list[str],
    relation_names: list[str],
    splits: dict[str, np.ndarray],
    name: str | None = None,
    options: ConvertOptions | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write in-memory id triples ([N, 3] head, relation, tail) as a dataset: every entity and relation
    given is a train symbol, as in an id-mapped (DGL-KE) input."""
    source = _ArraySource(splits)
    return write_id_source(
        source, out, entity_names=pa.array(entity_names, pa.string()),
        relation_names=pa.array(relation_names, pa.string()),
        rows={split: len(ids) for split, ids in source.splits.items()}, name=name, options=options,
        overwrite=overwrite,
    )  # fmt: skip


def write_id_source(
    source: Source,
    out: Path,
    *,
    entity_names: pa.Array,
    relation_names: pa.Array,
    rows: dict[str, int],
    name: str | None = None,
    options: ConvertOptions | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
) -> Manifest:
    """Write a source whose chunks hold id triples (not names), streamed, as a dataset; ``rows`` counts
    each split's triples. Every entity and relation named is a train symbol."""
    vocab = Vocabulary(
        entities=entity_names,
        relations=relation_names,
        num_train_entities=len(entity_names),
        num_train_relations=len(relation_names),
        named=False,
    )
    options = _checked(Path(out), overwrite, source, options)
    name = name or Path(out).name
    return _write_dataset(source, vocab, rows, Path(out), name, options, provenance or {})


class _ArraySource:
    kind = "arrays"
    block_bytes = BLOCK_BYTES

    def __init__(self, splits: dict[str, np.ndarray]):
        self.splits = {k: np.asarray(v, dtype=np.int64).reshape(-1, 3) for k, v in splits.items()}
        self.files = {split: Path(f"<{split} array>") for split in self.splits}

    def chunks(self, split: str, counts: SplitCounts | None = None):
        ids = self.splits[split]
        if counts is not None:
            counts.lines += len(ids)
        yield pa.table({name: ids[:, i] for i, name in enumerate(COLUMNS)})
