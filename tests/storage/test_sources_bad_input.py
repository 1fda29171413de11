"""Bad input to the converter's readers (storage/sources.py): each is refused with a ValueError that names the
file and, where there is one, the line; none is converted into a silently wrong dataset."""

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage import cli
from storage.convert import convert
from storage.sources import DglKeSource, NTriplesSource, TsvSource, first_bad_line

ENTITIES = "3\n/m/a\t0\n/m/b\t1\n/m/c\t2\n"
RELATIONS = "2\n/r/x\t0\n/r/y\t1\n"
HINT = "(convert it with `python -m storage convert ... --skip-bad-lines` to skip such lines)"
EXPECTED_IDS = "expected 3 tab-separated integers (head, tail, relation)"
EXPECTED_NAMES = "expected 2 tab-separated fields ['name', 'id']"


def dglke_dir(tmp_path: Path, **texts: str | bytes) -> Path:
    """A DGL-KE directory (triples as head, tail, relation ids); ``texts`` replace files by stem
    (``train=...``, ``entity2id=...``)."""
    directory = tmp_path / "dglke"
    directory.mkdir()
    files = {"entity2id": ENTITIES, "relation2id": RELATIONS, "train": "0\t1\t0\n1\t2\t1\n", "valid": "2\t0\t1\n"}
    for stem, text in {**files, "test": "0\t2\t1\n", **texts}.items():
        (directory / f"{stem}.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
    return directory


def tsv_dir(tmp_path: Path, files: dict[str, str | bytes] | None = None) -> Path:
    """A TSV directory of train.txt, valid.txt, test.txt; ``files`` adds or replaces files by name."""
    directory = tmp_path / "tsv"
    directory.mkdir()
    texts = {"train.txt": "a\tr\tb\nb\tr\tc\n", "valid.txt": "a\tr\tc\n", "test.txt": "c\tr\ta\n", **(files or {})}
    for name, text in texts.items():
        (directory / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return directory


def refusal(make_source, out: Path) -> str:
    """The message of the ValueError that building the source or converting it raises."""
    with pytest.raises(ValueError) as caught:
        convert(make_source(), out)
    return str(caught.value)


def many_lines(count: int = 3000) -> bytes:
    """Lines that compress poorly enough for a gzip stream cut in half to end inside its data."""
    return "".join(f"e{i}\tr{i % 7}\te{i * 7919 % 1000}\n" for i in range(count)).encode()


# 1. DGL-KE ids that pyarrow's default null handling read as null (then a garbage integer) are parse errors.


@pytest.mark.parametrize("field", ["", "NULL", "NA", "NaN", "nan", "N/A"])
@pytest.mark.parametrize("split", ["train", "valid"])
def test_dglke_null_like_id_is_refused_naming_the_line_and_nothing_is_written(tmp_path, split, field):
    first = {"train": "0\t1\t0\n", "valid": "2\t0\t1\n"}[split]
    directory = dglke_dir(tmp_path, **{split: f"{first}1\t{field}\t0\n"})
    out = tmp_path / "ds"
    problem = "tail is empty" if field == "" else "tail is not an integer"
    text = f"1\t{field}\t0"
    assert refusal(lambda: DglKeSource(directory), out) == (
        f"{directory / f'{split}.txt'}:2: {EXPECTED_IDS}; {problem}: {text!r}"
    )
    assert not out.exists() and sorted(tmp_path.iterdir()) == [directory]


def test_dglke_bad_id_is_named_past_ids_pyarrow_reads_with_spaces_and_leading_zeros(tmp_path):
    # The line checker accepts what the reader accepts, so it blames the empty field, not line 1 or 2.
    directory = dglke_dir(tmp_path, train="0\t 1 \t0\n1\t02\t1\n1\t\t0\n")
    assert refusal(lambda: DglKeSource(directory), tmp_path / "ds") == (
        f"{directory / 'train.txt'}:3: {EXPECTED_IDS}; tail is empty: '1\\t\\t0'"
    )
    assert not (tmp_path / "ds").exists()


def test_dglke_empty_id_in_entity2id_is_refused_naming_the_line(tmp_path):
    directory = dglke_dir(tmp_path, entity2id="3\n/m/a\t0\n/m/b\t\n/m/c\t2\n")
    assert refusal(lambda: DglKeSource(directory), tmp_path / "ds") == (
        f"{directory / 'entity2id.txt'}:3: {EXPECTED_NAMES}; id is empty: '/m/b\\t'"
    )


# 2. What the line checkers did not recognise ("... but no line of it is malformed").


@pytest.mark.parametrize("text", [b"", b"\xef\xbb\xbf"], ids=["empty", "bom-only"])
@pytest.mark.parametrize("split", ["train", "valid"])
def test_dglke_empty_split_is_said_to_be_empty(tmp_path, split, text):
    directory = dglke_dir(tmp_path, **{split: text})
    assert refusal(lambda: DglKeSource(directory), tmp_path / "ds") == f"{directory / f'{split}.txt'}: split is empty"


@pytest.mark.parametrize("value", ["9223372036854775808", "-9223372036854775809", "1" * 5000])
def test_dglke_id_past_int64_is_refused_naming_the_line(tmp_path, value):
    directory = dglke_dir(tmp_path, train=f"0\t1\t0\n1\t{value}\t0\n")
    text = f"1\t{value}\t0"[:120]
    assert refusal(lambda: DglKeSource(directory), tmp_path / "ds") == (
        f"{directory / 'train.txt'}:2: {EXPECTED_IDS}; tail is outside the 64-bit integer range: {text!r}"
    )


def test_dglke_invalid_utf8_name_is_refused_naming_the_line(tmp_path):
    directory = dglke_dir(tmp_path, entity2id=b"3\n/m/a\t0\n/m/\xffb\t1\n/m/c\t2\n")
    text = b"/m/\xffb\t1".decode("utf-8", errors="replace")
    assert refusal(lambda: DglKeSource(directory), tmp_path / "ds") == (
        f"{directory / 'entity2id.txt'}:3: {EXPECTED_NAMES}; not valid UTF-8 (byte 4): {text!r}"
    )


HUGE_NAME = "x" * (9 << 20)
"""A name longer than twice pyarrow's parse block (4 MiB): the CSV reader refused its block ("straddling")."""


def test_tsv_line_longer_than_the_csv_block_is_converted(tmp_path):
    directory = tsv_dir(tmp_path, {"train.txt": f"a\tr\tb\n{HUGE_NAME}\tr\tb\n"})
    manifest = convert(TsvSource(directory), tmp_path / "ds")
    assert manifest.splits["train"].triples == 2
    assert HUGE_NAME in pq.read_table(tmp_path / "ds" / "entities.parquet")["name"].to_pylist()


def test_tsv_bad_line_beside_a_huge_line_is_named_and_skipped_once(tmp_path):
    directory = tsv_dir(tmp_path, {"train.txt": f"a\tr\tb\n{HUGE_NAME}\tr\tb\nbad line\nc\tr\ta\n"})
    assert refusal(lambda: TsvSource(directory), tmp_path / "strict") == (
        f"{directory / 'train.txt'}:3: expected 3 non-empty tab-separated fields (head, relation, tail): "
        f"'bad line' {HINT}"
    )
    manifest = convert(TsvSource(directory, skip_bad_lines=True), tmp_path / "ds")
    assert (manifest.splits["train"].lines, manifest.splits["train"].bad_lines) == (4, 1)


def test_last_resort_message_carries_the_parsers_own(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("a\tr\tb\n")
    with pytest.raises(ValueError) as caught:
        first_bad_line(path, lambda line: False, "CSV parse error: something new")
    assert str(caught.value) == (
        f"{path}: the CSV parser rejected a block, but no line of it is malformed "
        "(pyarrow: CSV parse error: something new)"
    )


# 3. Damaged gzip files.


def truncated_gzip() -> bytes:
    data = gzip.compress(many_lines())
    return data[: len(data) // 2]


GZIP_DAMAGE = {
    "truncated": ("Compressed file ended before the end-of-stream marker was reached", truncated_gzip),
    "not-gzip": ("Not a gzipped file (b'no')", lambda: b"not gzip at all\n"),
}
"""Each damage: gzip's own words for it, and the file's bytes."""


@pytest.mark.parametrize("damage", sorted(GZIP_DAMAGE))
def test_damaged_gzip_tsv_is_refused_naming_the_file(tmp_path, damage):
    reason, data = GZIP_DAMAGE[damage]
    directory = tsv_dir(tmp_path, {"train.txt.gz": data()})
    (directory / "train.txt").unlink()
    assert refusal(lambda: TsvSource(directory), tmp_path / "ds") == (
        f"{directory / 'train.txt.gz'}: not a complete gzip file ({reason})"
    )
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("damage", sorted(GZIP_DAMAGE))
def test_damaged_gzip_ntriples_is_refused_naming_the_file(tmp_path, damage):
    reason, data = GZIP_DAMAGE[damage]
    path = tmp_path / "train.nt.gz"
    path.write_bytes(data())
    assert refusal(lambda: NTriplesSource({"train": path}), tmp_path / "ds") == (
        f"{path}: not a complete gzip file ({reason})"
    )


# 4. DGL-KE id maps: repeated and empty names refused, a byte-order mark accepted.


@pytest.mark.parametrize(
    ("stem", "text", "error"),
    [
        (
            "entity2id",
            "4\n/m/a\t0\n/m/b\t1\n/m/c\t2\n/m/b\t3\n",
            ":5: name '/m/b' has an id on line 3 already: '/m/b\\t3'",
        ),
        ("relation2id", "3\n/r/x\t0\n/r/y\t1\n/r/x\t2\n", ":4: name '/r/x' has an id on line 2 already: '/r/x\\t2'"),
    ],
)
def test_dglke_name_with_two_ids_is_refused_naming_both_lines(tmp_path, stem, text, error):
    directory = dglke_dir(tmp_path, **{stem: text})
    assert refusal(lambda: DglKeSource(directory), tmp_path / "ds") == f"{directory / f'{stem}.txt'}{error}"


def test_dglke_empty_name_is_refused_naming_the_line(tmp_path):
    directory = dglke_dir(tmp_path, entity2id="3\n/m/a\t0\n\t1\n/m/c\t2\n")
    assert refusal(lambda: DglKeSource(directory), tmp_path / "ds") == (
        f"{directory / 'entity2id.txt'}:3: empty name: '\\t1'"
    )


def test_dglke_byte_order_mark_opening_entity2id_is_accepted(tmp_path):
    directory = dglke_dir(tmp_path, entity2id=b"\xef\xbb\xbf" + ENTITIES.encode())
    convert(DglKeSource(directory), tmp_path / "ds")
    assert pq.read_table(tmp_path / "ds" / "entities.parquet")["name"].to_pylist() == ["/m/a", "/m/b", "/m/c"]


# 5. A directory where a file is expected.


def test_tsv_split_that_is_a_directory_is_said_to_be_one(tmp_path):
    directory = tsv_dir(tmp_path)
    (directory / "train.txt").unlink()
    (directory / "train.txt").mkdir()
    assert refusal(lambda: TsvSource(directory), tmp_path / "ds") == (
        f"{directory / 'train.txt'}: is a directory, not a file"
    )


def test_ntriples_file_that_is_a_directory_is_said_to_be_one(tmp_path):
    (tmp_path / "train.nt").mkdir()
    assert refusal(lambda: NTriplesSource({"train": tmp_path / "train.nt"}), tmp_path / "ds") == (
        f"{tmp_path / 'train.nt'}: is a directory, not a file"
    )


def test_dglke_id_map_that_is_a_directory_is_said_to_be_one(tmp_path):
    directory = dglke_dir(tmp_path)
    (directory / "entity2id.txt").unlink()
    (directory / "entity2id.txt").mkdir()
    assert refusal(lambda: DglKeSource(directory), tmp_path / "ds") == (
        f"{directory / 'entity2id.txt'}: is a directory, not a file"
    )


# 6. The hint names the command that has --skip-bad-lines.


def test_tsv_bad_line_hint_names_the_convert_command(tmp_path, capsys):
    directory = tsv_dir(tmp_path, {"train.txt": "a\tr\tb\nbroken\n"})
    assert cli.main(["convert", "--format", "tsv", "--no-progress", str(directory), str(tmp_path / "ds")]) == 2
    assert capsys.readouterr().err == (
        f"error: {directory / 'train.txt'}:2: expected 3 non-empty tab-separated fields (head, relation, tail): "
        f"'broken' {HINT}\n"
    )


def test_ntriples_bad_line_hint_names_the_convert_command(tmp_path):
    path = tmp_path / "train.nt"
    path.write_text("<http://x/a> <http://x/p> <http://x/b> .\nbroken\n")
    assert refusal(lambda: NTriplesSource({"train": path}), tmp_path / "ds") == (
        f"{path}:2: not an N-Triples statement (<s> <p> <o> . ; check escapes): 'broken' {HINT}"
    )


# 7. Two files for one split.


@pytest.mark.parametrize("other", ["train.tsv", "train.txt.gz"])
def test_tsv_split_in_two_files_is_refused_naming_both(tmp_path, other):
    directory = tsv_dir(tmp_path, {other: gzip.compress(b"x\tr\ty\n") if other.endswith(".gz") else "x\tr\ty\n"})
    assert refusal(lambda: TsvSource(directory), tmp_path / "ds") == (
        f"{directory}: more than one file holds the train split ({directory / 'train.txt'}, {directory / other}): "
        "keep only one"
    )


def test_dglke_split_in_two_files_is_refused_naming_both(tmp_path):
    directory = dglke_dir(tmp_path)
    (directory / "valid.tsv").write_text("2\t0\t1\n")
    files = f"{directory / 'valid.txt'}, {directory / 'valid.tsv'}"
    assert refusal(lambda: DglKeSource(directory), tmp_path / "ds") == (
        f"{directory}: more than one file holds the valid split ({files}): keep only one"
    )
