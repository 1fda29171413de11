import gzip
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from storage.convert import ConvertOptions, NameIndex, convert, lookup, partition_of, write_id_dataset
from storage.layout import MANIFEST, Manifest, SplitCounts
from storage.reader import TripleStore
from storage.sources import _IRI_ALLOWED, BOM, NT_BLANK, NT_LITERAL, NT_TRIPLE, DglKeSource, NTriplesSource, TsvSource


def _names(root, which):
    return pq.read_table(root / f"{which}.parquet")["name"].to_pylist()


def _facts(store, split):
    """The split as a sorted list of (head, relation, tail) names."""
    entities, relations = _names(store.root, "entities"), _names(store.root, "relations")
    return sorted((entities[h], relations[r], entities[t]) for h, r, t in store.read_split(split).tolist())


def _tsv_dir(tmp_path, train, valid="a\tr\tb\n", test="a\tr\tb\n"):
    directory = tmp_path / "tsv"
    directory.mkdir()
    (directory / "train.txt").write_text(train)
    (directory / "valid.txt").write_text(valid)
    (directory / "test.txt").write_text(test)
    return directory


def _random_graph(num_triples, num_entities=200, num_relations=7, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (f"e{rng.integers(num_entities)}", f"r{rng.integers(num_relations)}", f"e{rng.integers(num_entities)}")
        for _ in range(num_triples)
    ]


def test_tsv_round_trip_with_partitions_duplicates_and_row_groups(tmp_path):
    facts = _random_graph(3000)
    train = "".join("\t".join(f) + "\n" for f in facts)
    options = ConvertOptions(partition_rows=700, row_group_rows=128, seed=3)
    manifest = convert(TsvSource(_tsv_dir(tmp_path, train)), tmp_path / "ds", options=options)
    store = TripleStore(tmp_path / "ds")
    distinct = sorted(set(facts))
    assert _facts(store, "train") == distinct
    counts = manifest.splits["train"]
    assert (counts.lines, counts.triples, counts.duplicates) == (3000, len(distinct), 3000 - len(distinct))
    assert counts.partitions == 5 and len(store.row_groups("train")) > counts.partitions
    # ids: train entities sorted by name; frequency counts head and tail occurrences of distinct facts
    names = _names(tmp_path / "ds", "entities")
    train_names = names[: manifest.num_train_entities]
    assert train_names == sorted(train_names) and names[manifest.num_train_entities :] == ["a", "b"]  # valid/test only
    frequency = pq.read_table(tmp_path / "ds" / "entities.parquet")["frequency"].to_pylist()
    expected = {n: sum((h == n) + (t == n) for h, _, t in distinct) for n in names}
    assert dict(zip(names, frequency, strict=True)) == expected


def test_partition_hash_is_uniform_and_seeded():
    ids = np.random.default_rng(0).integers(0, 1000, size=(200_000, 3)).astype(np.int32)
    counts = np.bincount(partition_of(ids, 8, seed=0), minlength=8)
    assert counts.min() > 0.95 * 25_000 and counts.max() < 1.05 * 25_000
    assert not np.array_equal(partition_of(ids, 8, seed=0), partition_of(ids, 8, seed=1))


def test_both_engines_read_identical_triples(tmp_path):
    train = "".join("\t".join(f) + "\n" for f in _random_graph(2000))
    convert(TsvSource(_tsv_dir(tmp_path, train)), tmp_path / "ds", options=ConvertOptions(row_group_rows=300))
    a = TripleStore(tmp_path / "ds", engine="pyarrow")
    b = TripleStore(tmp_path / "ds", engine="fastparquet")
    for split in ("train", "valid", "test"):
        assert a.read_split(split).tolist() == b.read_split(split).tolist()
    assert len(a.read_split("train")) > 0


def test_gzipped_tsv_and_skip_bad_lines(tmp_path):
    directory = _tsv_dir(tmp_path, "")
    with gzip.open(directory / "train.txt.gz", "wt") as handle:
        handle.write("a\tr\tb\nbroken line\nb\tr\tc\nc\t\ta\nx\ty\tz\tw\n")
    (directory / "train.txt").unlink()
    with pytest.raises(ValueError, match=r"train\.txt\.gz:2: expected 3"):
        convert(TsvSource(directory), tmp_path / "strict")
    assert not (tmp_path / "strict").exists()
    manifest = convert(TsvSource(directory, skip_bad_lines=True), tmp_path / "ds")
    assert manifest.splits["train"].bad_lines == 3 and manifest.splits["train"].triples == 2
    assert _facts(TripleStore(tmp_path / "ds"), "train") == [("a", "r", "b"), ("b", "r", "c")]


NT = """# a comment
<http://x/a> <http://x/knows> <http://x/b> .
<http://x/a> <http://x/name> "Alice \\"A\\""@en .
<http://x/b>\t<http://x/knows>\t<http://x/c\\u00E9> .
_:n1 <http://x/likes> <http://x/a> .
<http://x/b> <http://x/age> "3"^^<http://www.w3.org/2001/XMLSchema#integer> .

<http://x/a> <http://x/knows> <http://x/b> .
"""


@pytest.mark.parametrize("kernels", ["on", "off"], indirect=True)
def test_ntriples_skips_literals_counts_duplicates_and_filters_relations(tmp_path, kernels):
    path = tmp_path / "dump.nt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(NT)
    manifest = convert(NTriplesSource({"train": path}), tmp_path / "all")
    counts = manifest.splits["train"]
    assert (counts.lines, counts.literals, counts.duplicates, counts.triples) == (6, 2, 1, 3)
    assert _facts(TripleStore(tmp_path / "all"), "train") == [
        ("_:n1", "http://x/likes", "http://x/a"),
        ("http://x/a", "http://x/knows", "http://x/b"),
        ("http://x/b", "http://x/knows", "http://x/c\\u00E9"),
    ]
    assert manifest.splits["valid"].partitions == 0  # a dump has no validation split
    kept = convert(NTriplesSource({"train": path}, relations={"http://x/likes"}), tmp_path / "likes")
    assert kept.splits["train"].triples == 1 and kept.splits["train"].filtered == 3  # the duplicate included


@pytest.mark.parametrize(
    "line",
    [
        "<http://x/a> <http://x/p> <http://x/b\\q> .",  # bad escape in an IRI
        '<http://x/a> <http://x/p> "bad \\x escape" .',  # bad escape in a literal
        "<http://x/a> <http://x/p> <http://x/b>",  # no final dot
        "<http://x/a> <http://x/p> .",  # two terms
    ],
)
@pytest.mark.parametrize("kernels", ["on", "off"], indirect=True)
def test_ntriples_malformed_line_is_named(tmp_path, line, kernels):
    path = tmp_path / "bad.nt"
    path.write_text(f"<http://x/a> <http://x/p> <http://x/b> .\n{line}\n")
    with pytest.raises(ValueError, match=r"bad\.nt:2: not an N-Triples statement"):
        convert(NTriplesSource({"train": path}), tmp_path / "ds")
    manifest = convert(NTriplesSource({"train": path}, skip_bad_lines=True), tmp_path / "ok")
    assert manifest.splits["train"].bad_lines == 1 and manifest.splits["train"].triples == 1


# Lines for the fast path and the regex path alike: tabs and spaces, literals holding either, escapes,
# blank nodes, comments, runs of blanks, CRLF, and malformed lines of every kind.
NT_MIXED = [
    "<http://x/a>\t<http://x/p>\t<http://x/b>\t.",
    "<http://x/a> <http://x/p> <http://x/c> .",
    '<http://x/a>\t<http://x/name>\t"two words"@en\t.',
    '<http://x/a>\t<http://x/name>\t"a\ttab"\t.',
    '<http://x/a> <http://x/n> "x"^^<http://www.w3.org/2001/XMLSchema#string> .',
    "<http://x/b>\t<http://x/p>\t<http://x/caf\\u00E9>\t.",
    "_:n1\t<http://x/p>\t_:n2\t.",
    "<http://x/a>\t\t<http://x/p>  <http://x/d>\t.",
    "<http://x/a>\t<http://x/p>\t<http://x/e>\t. # a comment",
    "# a comment line",
    "",
    "   ",
    "<http://x/a>\t<http://x/p>\t<http://x/f>\t.\r",
    "<http://x/a>\t<http://x/p>\t<http://x/{bad}>\t.",
    "<http://x/a>\t<http://x/p>\t<http://x/sp ace>\t.",
    "<http://x/a>\t<http://x/p>\t<http://x/g>",
    "<http://x/a>\t<http://x/p>\t<http://x/g>\t..",
    '<http://x/a>\t<http://x/p>\t"bad \\x escape"\t.',
    '<http://x/a>\t<http://x/p>\t"unclosed\t.',
    "<http://x/a>\t<http://x/p>\t<http://x/h>>\t.",
    "<<http://x/a>\t<http://x/p>\t<http://x/h>\t.",
    "http://x/a\t<http://x/p>\t<http://x/h>\t.",
    "<http://x/a>\t<http://x/p>\t<http://x/i>\t.\t<http://x/j>",
    "<http://x/a>\t<http://x/pé>\t<http://x/ü>\t.",
]


def _reference_parse(lines):
    """Each line matched whole by Python's re: (sorted triples, lines, bad lines, literals)."""
    import re

    triple, literal, blank = (re.compile(p) for p in (NT_TRIPLE, NT_LITERAL, NT_BLANK))
    triples, counted, bad, literals = [], 0, 0, 0
    for line in lines:
        line = line.removesuffix("\r")
        if blank.search(line):
            continue
        counted += 1
        if match := triple.search(line):
            triples.append(tuple(re.sub(r"^<(.*)>$", r"\1", match[name]) for name in ("head", "relation", "tail")))
        elif literal.search(line):
            literals += 1
        else:
            bad += 1
    return sorted(triples), counted, bad, literals


@pytest.mark.parametrize("kernels", ["on", "off"], indirect=True)
@pytest.mark.parametrize("block_bytes", [64, 4096])
def test_ntriples_fast_path_parses_as_the_grammar_does(tmp_path, block_bytes, kernels):
    """The fast path (compiled, or pyarrow's CSV split without the kernels) and the regex path together
    give what matching each line whole gives."""
    rng = np.random.default_rng(0)
    lines = [NT_MIXED[i] for i in rng.integers(len(NT_MIXED), size=400)]
    path = tmp_path / "mixed.nt"
    path.write_bytes("\n".join(lines).encode() + b"\n")
    source = NTriplesSource({"train": path}, skip_bad_lines=True, block_bytes=block_bytes)
    counts = SplitCounts()
    tables = list(source.chunks("train", counts))
    got = sorted(
        zip(*(pa.concat_tables(tables)[name].to_pylist() for name in ("head", "relation", "tail")), strict=True)
    )
    assert (got, counts.lines, counts.bad_lines, counts.literals) == _reference_parse(lines)
    with pytest.raises(ValueError, match=r"mixed\.nt:\d+: not an N-Triples statement"):
        list(NTriplesSource({"train": path}, block_bytes=block_bytes).chunks("train"))


@pytest.mark.parametrize("kernels", ["on", "off"], indirect=True)
def test_ntriples_lone_carriage_return_is_not_a_line_break(tmp_path, kernels):
    path = tmp_path / "cr.nt"
    path.write_bytes(b"<http://x/a>\t<http://x/p>\t<http://x/b>\t.\r<http://x/c>\t<http://x/p>\t<http://x/d>\t.\n")
    with pytest.raises(ValueError, match=r"cr\.nt:1: not an N-Triples statement"):
        list(NTriplesSource({"train": path}).chunks("train"))


@pytest.mark.parametrize("kernels", ["on", "off"], indirect=True)
def test_ntriples_invalid_utf8_is_named(tmp_path, kernels):
    path = tmp_path / "bytes.nt"
    path.write_bytes(b"<http://x/a>\t<http://x/p>\t<http://x/b>\t.\n<http://x/\xff>\t<http://x/p>\t<http://x/b>\t.\n")
    with pytest.raises(ValueError, match=r"bytes\.nt:2: not valid UTF-8"):
        list(NTriplesSource({"train": path}).chunks("train"))


@pytest.mark.parametrize("kernels", ["on", "off"], indirect=True)
def test_ntriples_byte_order_mark_opening_the_file_is_dropped(tmp_path, kernels):
    path = tmp_path / "bom.nt"
    lines = [b"<http://x/a>\t<http://x/p>\t<http://x/b>\t.", b"<http://x/c>\t<http://x/p>\t<http://x/d>\t."]
    path.write_bytes(BOM + b"\n".join(lines) + b"\n")
    counts = SplitCounts()
    table = pa.concat_tables(list(NTriplesSource({"train": path}).chunks("train", counts)))
    assert table["head"].to_pylist() == ["http://x/a", "http://x/c"] and (counts.lines, counts.bad_lines) == (2, 0)
    path.write_bytes(BOM + b"\n".join([*lines, b"<http://x/e> broken ."]) + b"\n")
    with pytest.raises(ValueError, match=r"bom\.nt:3: not an N-Triples statement"):
        list(NTriplesSource({"train": path}).chunks("train"))


def _parsed(path, block_bytes, on):
    """(head, relation, tail) of every triple in the order the converter reads them, and the counts; or
    the error's message with the line number dropped where parsing fails."""
    from sharding.kernels import native

    native.library.cache_clear()
    try:
        if not on:
            os.environ["NVKG_NATIVE"] = "0"
        counts = SplitCounts()
        source = NTriplesSource({"train": path}, skip_bad_lines=True, block_bytes=block_bytes)
        table = pa.concat_tables(list(source.chunks("train", counts)))
        return table.to_pylist(), (counts.lines, counts.bad_lines, counts.literals)
    except ValueError as err:
        return str(err)
    finally:
        os.environ.pop("NVKG_NATIVE", None)
        native.library.cache_clear()


def test_ntriples_compiled_scan_reads_what_the_csv_path_reads(tmp_path):
    """The same triples in the same order and the same counts with and without the kernels, over lines
    of NT_MIXED with characters swapped for ones the grammar cares about."""
    rng = np.random.default_rng(1)
    alphabet = ["<", ">", '"', " ", "\t", ".", "\\", "a", "#", "_", ":", "é", "{", "@"]
    lines = []
    for _ in range(3000):
        line = list(NT_MIXED[rng.integers(len(NT_MIXED))])
        for _ in range(rng.choice([0, 0, 1, 2])):
            if line:
                line[rng.integers(len(line))] = alphabet[rng.integers(len(alphabet))]
        lines.append("".join(line))
    path = tmp_path / "mutated.nt"
    path.write_bytes("\n".join(lines).encode() + b"\n")
    for block_bytes in (256, 1 << 16):
        compiled, csv = _parsed(path, block_bytes, on=True), _parsed(path, block_bytes, on=False)
        assert compiled == csv
        assert not isinstance(compiled, str) and compiled[1][0] > 1000  # most lines were read


def test_ntriples_compiled_scan_takes_the_iri_bytes_the_csv_path_takes(tmp_path):
    """Every ASCII byte (and a multi-byte character) inside an IRI: the same verdict on both paths."""
    inner = [chr(b) for b in range(128) if chr(b) not in "\n\r"] + ["é"]
    lines = [f"<http://x/a{c}b>\t<http://x/p>\t<http://x/o>\t." for c in inner]
    path = tmp_path / "bytes.nt"
    path.write_bytes("\n".join(lines).encode() + b"\n")
    compiled, csv = _parsed(path, 1 << 16, on=True), _parsed(path, 1 << 16, on=False)
    assert compiled == csv and len(compiled[0]) == sum(ord(c) in _IRI_ALLOWED for c in inner[:-1]) + 1 == 87


@pytest.mark.parametrize(
    "sequence",
    [b"\xc3\xa9", b"\xe0\xa0\x80", b"\xef\xbf\xbf", b"\xf0\x9f\x98\x80", b"\xf4\x8f\xbf\xbf",  # valid
     b"\x80", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x9f\xbf", b"\xed\xa0\x80", b"\xf0\x8f\xbf\xbf",
     b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xe2\x82", b"\xe2\x28\xa1", b"\xff"],
)  # fmt: skip
def test_ntriples_compiled_scan_checks_utf8_as_the_csv_path_does(tmp_path, sequence):
    """Valid sequences parse and invalid ones (overlong, surrogate, past U+10FFFF, cut short, stray
    continuation bytes) are named by line on both paths, in an IRI and at a block's last byte."""
    for body in (
        b"<http://x/a" + sequence + b">\t<http://x/p>\t<http://x/b>\t.\n",
        b"<http://x/a>\t<http://x/p>\t<http://x/b>\t.\n# " + sequence,
    ):
        path = tmp_path / "utf8.nt"
        path.write_bytes(b"<http://x/c>\t<http://x/p>\t<http://x/d>\t.\n" + body)
        compiled, csv = _parsed(path, 1 << 16, on=True), _parsed(path, 1 << 16, on=False)
        assert compiled == csv
        valid = _is_utf8(sequence)
        assert isinstance(compiled, str) != valid and (valid or "not valid UTF-8" in compiled)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _dglke_dir(tmp_path, train="0\t1\t0\n1\t2\t1\n", entity_count="3"):
    directory = tmp_path / "Freebase"
    directory.mkdir()
    (directory / "entity2id.txt").write_text(f"{entity_count}\n/m/a\t0\n/m/b\t1\n/m/c\t2\n")
    (directory / "relation2id.txt").write_text("2\n/r/x\t0\n/r/y\t1\n")
    (directory / "train.txt").write_text(train)
    (directory / "valid.txt").write_text("2\t0\t1\n")
    (directory / "test.txt").write_text("0\t2\t1\n")
    return directory


def test_dglke_layout_is_head_tail_relation(tmp_path):
    manifest = convert(DglKeSource(_dglke_dir(tmp_path)), tmp_path / "ds")
    store = TripleStore(tmp_path / "ds")
    assert _facts(store, "train") == [("/m/a", "/r/x", "/m/b"), ("/m/b", "/r/y", "/m/c")]
    assert _facts(store, "valid") == [("/m/c", "/r/y", "/m/a")]
    assert manifest.num_entities == manifest.num_train_entities == 3


def test_dglke_errors_name_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"train\.txt:2: id out of range"):
        convert(DglKeSource(_dglke_dir(tmp_path, train="0\t1\t0\n1\t9\t1\n")), tmp_path / "ds")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match=r"train\.txt:1: expected 3 tab-separated integers"):
        convert(DglKeSource(_dglke_dir(other, train="0\tx\t0\n")), other / "ds")
    third = tmp_path / "third"
    third.mkdir()
    with pytest.raises(ValueError, match=r"entity2id\.txt: first line says 4 entries, the file has 3"):
        convert(DglKeSource(_dglke_dir(third, entity_count="4")), third / "ds")


class _Interrupted(RuntimeError):
    pass


def test_interrupted_conversion_leaves_nothing(tmp_path):
    source = TsvSource(_tsv_dir(tmp_path, "a\tr\tb\nb\tr\tc\n"))
    chunks = source.chunks

    def failing(split, counts=None):
        if counts is not None:  # the encoding pass
            raise _Interrupted
        yield from chunks(split, counts)

    source.chunks = failing
    with pytest.raises(_Interrupted):
        convert(source, tmp_path / "out" / "ds")
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    source = TsvSource(_tsv_dir(tmp_path, "a\tr\tb\n"))
    convert(source, tmp_path / "ds")
    with pytest.raises(ValueError, match="already exists"):
        convert(source, tmp_path / "ds")
    convert(source, tmp_path / "ds", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "tsv"]


@pytest.fixture
def small_store(tmp_path):
    write_id_dataset(
        tmp_path / "ds",
        entity_names=["a", "b", "c"],
        relation_names=["r"],
        splits={"train": [[0, 0, 1], [1, 0, 2]], "valid": [[0, 0, 2]], "test": [[2, 0, 0]]},
    )
    return tmp_path / "ds"


def test_newer_manifest_version_is_refused(small_store):
    path = small_store / MANIFEST
    raw = json.loads(path.read_text())
    raw["format_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        Manifest.read(small_store)


def test_truncated_partition_fails_with_its_name(small_store):
    part = small_store / "train" / "part-00000.parquet"
    data = part.read_bytes()
    part.write_bytes(data[:50])
    with pytest.raises(ValueError, match=r"part-00000\.parquet: .*bytes, manifest says"):
        TripleStore(small_store)
    part.write_bytes(data[:-8] + b"\0" * 8)  # same size, footer destroyed, checksums not checked
    with pytest.raises(ValueError, match=r"part-00000\.parquet: unreadable Parquet"):
        TripleStore(small_store, verify=False)


def test_checksum_mismatch_fails_with_the_file_name(small_store):
    names = small_store / "entities.parquet"
    data = bytearray(names.read_bytes())
    data[len(data) // 2] ^= 0xFF
    names.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"entities\.parquet: sha256 mismatch"):
        TripleStore(small_store)


def test_lookup_agrees_whichever_side_is_hashed():
    vocabulary = pa.array([f"n{i}" for i in range(50)])
    rng = np.random.default_rng(0)
    small = pa.chunked_array([pa.array([f"n{i}" for i in rng.integers(50, size=20)])])  # hashes the chunk
    large = pa.chunked_array([pa.array([f"n{i}" for i in rng.integers(50, size=200)])])  # hashes the vocabulary
    for values in (small, large):
        expected = [int(v.as_py()[1:]) for v in values.chunk(0)]
        assert lookup(values, vocabulary).tolist() == expected
        index = NameIndex.of(vocabulary)
        assert index is not None and index.lookup(values, "x").tolist() == expected


def test_hashed_lookup_agrees_with_pyarrow_on_a_large_vocabulary():
    """Buckets of every fill, and chunks large enough for the probe's parallel loop."""
    vocabulary = pa.array([f"http://rdf.freebase.com/ns/m.{i:x}" for i in range(200_000)])
    ids = np.random.default_rng(0).integers(len(vocabulary), size=100_000)
    values = pa.chunked_array([vocabulary.take(pa.array(ids[:30_000])), vocabulary.take(pa.array(ids[30_000:]))])
    index = NameIndex.of(vocabulary)
    assert index is not None
    assert index.lookup(values, "x").tolist() == lookup(values, vocabulary).tolist() == ids.tolist()


def test_compiled_distinct_is_pyarrows_unique_even_when_every_hash_collides(monkeypatch):
    from sharding.kernels import native

    rng = np.random.default_rng(0)
    names = pa.array(["", *(f"http://x/{i}" for i in rng.integers(3000, size=20_000)), "", "http://x/1"])
    for values in (names, names.slice(7, 9000)):
        assert native.distinct_strings(values).equals(pc.unique(values))
    # Equal hashes must still be told apart by their bytes: every string hashed alike.
    monkeypatch.setattr(native, "hash_strings", lambda strings, seed=0: np.zeros(len(strings), np.uint64))
    assert native.distinct_strings(names.slice(0, 2000)).equals(pc.unique(names.slice(0, 2000)))


def test_distinct_names_past_one_arrays_offsets_go_to_pyarrow(monkeypatch):
    """Merged name sets too large to concatenate into one string array are left to pyarrow's unique."""
    from storage import convert as module

    arrays = [pa.array(["b", "a", "b"]), pa.array(["c", "a"])]
    monkeypatch.setattr(module, "CONCAT_BYTES", 1)
    monkeypatch.setattr(module.native, "distinct_strings", lambda names: pytest.fail("concatenated"))
    assert module._distinct(arrays).to_pylist() == ["b", "a", "c"]


def test_hashed_lookup_names_a_missing_name_and_refuses_colliding_vocabularies(monkeypatch):
    vocabulary = pa.array([f"http://x/{i}" for i in range(1000)])
    index = NameIndex.of(vocabulary)
    with pytest.raises(ValueError, match=r"train\.nt: a name is missing"):
        index.lookup(pa.chunked_array([pa.array(["http://x/5", "http://x/absent"])]), "train.nt")
    # Two names with one hash: no index, and the pyarrow lookup serves instead.
    monkeypatch.setattr("sharding.kernels.native.hash_strings", lambda names, seed=0: np.zeros(len(names), np.uint64))
    assert NameIndex.of(vocabulary) is None


def _with_negatives(tmp_path, valid_negatives, test_negatives=None):
    directory = _tsv_dir(tmp_path, "a\tr\tb\nb\tr\tc\nc\ts\ta\n", valid="a\tr\tc\n", test="c\tr\ta\n")
    (directory / "valid_negatives.txt").write_text(valid_negatives)
    if test_negatives is not None:
        (directory / "test_negatives.tsv").write_text(test_negatives)
    return directory


def test_negative_splits_are_converted_like_valid_and_test(tmp_path):
    # A duplicate, a blank line, an entity (zz) and a relation (q) train never has.
    directory = _with_negatives(tmp_path, "b\tr\ta\nzz\tr\ta\n\nb\tr\ta\na\tq\tb\n", test_negatives="a\ts\tc\n")
    manifest = convert(TsvSource(directory), tmp_path / "ds")
    store = TripleStore(tmp_path / "ds")
    assert list(manifest.splits) == ["train", "valid", "test", "valid_negatives", "test_negatives"]
    counts = manifest.splits["valid_negatives"]
    assert (counts.lines, counts.triples, counts.duplicates, counts.unseen_facts) == (4, 3, 1, 2)
    assert _facts(store, "valid_negatives") == [("a", "q", "b"), ("b", "r", "a"), ("zz", "r", "a")]
    assert _facts(store, "test_negatives") == [("a", "s", "c")]
    assert "valid_negatives/part-00000.parquet" in manifest.files and manifest.format_version == 1
    assert _names(tmp_path / "ds", "entities")[manifest.num_train_entities :] == ["zz"]
    assert store.negative_splits() == ["valid_negatives", "test_negatives"]


def test_bad_line_in_a_negatives_file_names_file_and_line(tmp_path):
    directory = _with_negatives(tmp_path, "b\tr\ta\nc\tr\n")
    with pytest.raises(ValueError, match=r"valid_negatives\.txt:2: expected 3 non-empty tab-separated fields"):
        convert(TsvSource(directory), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_a_negative_that_is_a_known_fact_is_refused_naming_its_line(tmp_path):
    directory = _with_negatives(tmp_path, "b\tr\ta\n", test_negatives="x\tr\ty\n\nc\tr\ta\na\tr\tb\n")
    with pytest.raises(ValueError, match=r"test_negatives\.tsv:3: 'c\\tr\\ta' is a fact of test, but test_negatives "
                       r"must hold only facts known to be false \(2 known true fact\(s\) in it"):  # fmt: skip
        convert(TsvSource(directory), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    dglke = _dglke_dir(tmp_path)
    (dglke / "valid_negatives.txt").write_text("0\t0\t1\n1\t2\t1\n")  # (b, y, c) is a train fact, in h t r order
    with pytest.raises(ValueError, match=r"valid_negatives\.txt:2: '1\\t2\\t1' is a fact of train"):
        convert(DglKeSource(dglke), tmp_path / "fb")
    with pytest.raises(ValueError, match=r"<valid_negatives array>: the fact of ids \(0, 0, 1\) is a fact of train"):
        write_id_dataset(tmp_path / "ids", entity_names=["a", "b"], relation_names=["r"],
                         splits={"train": [[0, 0, 1]], "valid": [[1, 0, 0]], "test": [[1, 0, 0]],
                                 "valid_negatives": [[0, 0, 1]]})  # fmt: skip


def test_negative_files_on_disk_must_be_listed(tmp_path):
    convert(TsvSource(_tsv_dir(tmp_path, "a\tr\tb\n")), tmp_path / "ds")
    (tmp_path / "ds" / "test_negatives").mkdir()
    shutil.copy(tmp_path / "ds" / "train" / "part-00000.parquet", tmp_path / "ds" / "test_negatives")
    with pytest.raises(ValueError, match=r"test_negatives/ holds files, but the split is not listed"):
        TripleStore(tmp_path / "ds")
