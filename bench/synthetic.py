"""Synthetic Freebase-like graphs: power-law degrees, string names, TSV and N-Triples files.

Every one of the ``num_entities`` names occurs (a covering set of facts comes first), so graphs of
different sizes share one vocabulary; the remaining facts draw heads and tails from a Zipf law over a
random ranking of the entities, and relations from a Zipf law too, as in Freebase.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FREEBASE_NS = "http://rdf.freebase.com/ns/"


def _zipf_ids(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    ranking = rng.permutation(n)
    return ranking[(rng.zipf(exponent, size) - 1) % n]


def triple_ids(num_triples: int, num_entities: int, num_relations: int, seed: int) -> np.ndarray:
    """[num_triples, 3] (head, relation, tail) ids."""
    rng = np.random.default_rng(seed)
    cover = min(num_triples, (num_entities + 1) // 2)
    everyone = rng.permutation(num_entities)
    heads = np.concatenate([everyone[0::2][:cover], _zipf_ids(rng, num_entities, num_triples - cover, 1.1)])
    tails = np.concatenate([everyone[1::2][:cover], _zipf_ids(rng, num_entities, num_triples - cover, 1.1)])
    if len(tails) < num_triples:  # odd vocabulary: the covering set's last head has no tail partner
        tails = np.append(tails, everyone[0])
    relations = _zipf_ids(rng, num_relations, num_triples, 1.1)
    return np.stack([heads, relations, tails[:num_triples]], axis=1)


def _names(prefix: str, n: int) -> pa.Array:
    numbers = pa.array(np.arange(n)).cast(pa.string())
    return pc.binary_join_element_wise(pa.scalar(prefix), numbers, "")


def write_graph(directory: Path, num_triples: int, *, num_entities: int, num_relations: int, seed: int = 0) -> None:
    """train/valid/test as ``.txt`` (TSV of names) and ``.nt`` (N-Triples, with 10% literal facts)."""
    directory.mkdir(parents=True, exist_ok=True)
    entities, relations = _names("m.0", num_entities), _names("rel.", num_relations)
    num_eval = max(1, num_triples // 100)
    sizes = {"train": num_triples, "valid": num_eval, "test": num_eval}
    for index, (split, size) in enumerate(sizes.items()):
        ids = triple_ids(size, num_entities, num_relations, seed + index)
        literal = np.random.default_rng(seed + 10 + index).random(size) < 0.1
        with open(directory / f"{split}.txt", "wb") as tsv, open(directory / f"{split}.nt", "wb") as nt:
            for start in range(0, size, 2_000_000):  # Arrow string arrays stop at 2 GiB
                part = slice(start, start + 2_000_000)
                head, rel, tail = (
                    pc.take(names, pa.array(ids[part, i])) for i, names in enumerate((entities, relations, entities))
                )
                _write_lines(tsv, pc.binary_join_element_wise(head, rel, tail, "\t"))
                obj = pc.if_else(
                    pa.array(literal[part]), pc.binary_join_element_wise('"', tail, '"@en', ""), _iri(tail)
                )
                _write_lines(nt, pc.binary_join_element_wise(_iri(head), _iri(rel), obj, ".", "\t"))


def _iri(names: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise("<" + FREEBASE_NS, names, ">", "")


def _write_lines(handle: BinaryIO, lines: pa.Array) -> None:
    """Each string followed by a newline, written straight from the Arrow buffer."""
    joined = pc.binary_join_element_wise(lines, "\n", "")
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[: len(joined) + 1]
    handle.write(memoryview(joined.buffers()[2])[offsets[0] : offsets[-1]])
