"""What a conversion refuses before it writes or deletes anything, and what it leaves behind."""

import os
import re
import stat

import pytest

from storage import cli
from storage.atomic import remove_stale_temps, swap_dir
from storage.convert import ConvertOptions, convert
from storage.dataset import _cache_key, open_dataset
from storage.layout import MANIFEST
from storage.sources import DglKeSource, TsvSource

TRAIN = "a\tr\tb\nb\tr\tc\nc\ts\ta\n"


def tsv_dir(path, train=TRAIN, valid="a\tr\tc\n", test="c\tr\ta\n"):
    path.mkdir(parents=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (path / f"{split}.txt").write_text(text)
    return path


def contents(path):
    return sorted((p.relative_to(path).as_posix(), p.read_bytes()) for p in path.rglob("*") if p.is_file())


def test_overwrite_never_replaces_what_the_conversion_reads(tmp_path):
    inputs = tsv_dir(tmp_path / "data" / "graph")
    (tmp_path / "data" / "notes.md").write_text("the user's")
    before = contents(tmp_path / "data")
    for out in (inputs, tmp_path / "data", inputs / "train.txt"):  # the input, a folder holding it, a file of it
        with pytest.raises(ValueError, match=f"^{out}: the output would replace the input "):
            convert(TsvSource(inputs), out, overwrite=True)
    assert contents(tmp_path / "data") == before
    convert(TsvSource(inputs), inputs / "converted")  # inside the input's folder: nothing of it is replaced
    assert (inputs / "converted" / MANIFEST).is_file()


def test_overwrite_replaces_a_dataset_or_an_empty_folder_and_nothing_else(tmp_path):
    source = TsvSource(tsv_dir(tmp_path / "graph"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.csv").write_text("keep me")
    (tmp_path / "file.txt").write_text("keep me too")
    for out in (tmp_path / "other", tmp_path / "file.txt"):
        with pytest.raises(ValueError, match=f"^{out}: is not an nvkg dataset \\(manifest.json missing\\) and not "):
            convert(source, out, overwrite=True)
    assert (tmp_path / "other" / "results.csv").read_text() == "keep me"
    assert (tmp_path / "file.txt").read_text() == "keep me too"
    (tmp_path / "empty").mkdir()
    convert(source, tmp_path / "empty", overwrite=True)
    convert(source, tmp_path / "empty", overwrite=True)  # a dataset now
    assert (tmp_path / "empty" / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file.txt", "graph", "other"]  # nothing left over


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ConvertOptions(seed=-1), r"seed=-1: must be an integer in \[0, 2\*\*64\)"),
        (ConvertOptions(seed=2**64), r"seed=18446744073709551616: must be"),
        (ConvertOptions(partition_rows=0), "partition_rows=0: must be positive"),
        (ConvertOptions(row_group_rows=-5), "row_group_rows=-5: must be positive"),
    ],
)
def test_bad_options_are_refused_before_any_input_is_read(tmp_path, options, message):
    source = TsvSource(tsv_dir(tmp_path / "graph", train="a\tr\n"))  # a bad line: reading would fail on it
    with pytest.raises(ValueError, match=message):
        convert(source, tmp_path / "ds", options=options)
    assert not (tmp_path / "ds").exists()


def test_the_command_line_refuses_what_it_cannot_do_and_reads_a_relations_file_as_written(tmp_path, capsys):
    assert cli.main(["convert", "--format", "dglke", str(tmp_path), str(tmp_path / "ds"), "--skip-bad-lines"]) == 2
    assert "--skip-bad-lines: not for --format dglke" in capsys.readouterr().err
    dump = tmp_path / "dump.nt"
    dump.write_text(
        "<http://x/a> <http://x/p> <http://x/b> .\n<http://x/b> <http://x/q> <http://x/c> .\n"
        "<http://x/c> <http://x/p> <http://x/a> .\n"
    )
    wanted = tmp_path / "relations.txt"
    wanted.write_bytes(b"\xef\xbb\xbf<http://x/p>\n")  # a BOM, as editors on some systems write
    argv = ["convert", "--format", "ntriples", str(dump), str(tmp_path / "ds"), "--relations", str(wanted)]
    assert cli.main(argv) == 0
    assert "1 relations" in capsys.readouterr().out  # the BOM did not hide <http://x/p>
    wanted.write_bytes(b"<http://x/p>\n<http://x/\xff>\n")
    assert cli.main([*argv[:-3], str(tmp_path / "ds2"), "--relations", str(wanted)]) == 2
    assert f"--relations {wanted}, line 2: not UTF-8" in capsys.readouterr().err
    assert cli.main([*argv[:-3], str(tmp_path / "ds2"), "--relations", str(tmp_path)]) == 2
    assert f"--relations {tmp_path}: a directory" in capsys.readouterr().err


def test_a_known_fact_on_a_negatives_file_s_first_line_after_a_bom_is_named_by_its_line(tmp_path):
    directory = tsv_dir(tmp_path / "graph")
    (directory / "valid_negatives.txt").write_bytes(b"\xef\xbb\xbfa\tr\tb\n")
    with pytest.raises(ValueError, match=r"valid_negatives\.txt:1: 'a\\tr\\tb' is a fact of train"):
        convert(TsvSource(directory), tmp_path / "ds")


def test_a_replaced_plain_file_and_its_trash_leave_nothing_behind(tmp_path):
    target = tmp_path / "ds"
    target.write_text("a plain file")
    new = tmp_path / "new"
    new.mkdir()
    swap_dir(new, target)
    assert target.is_dir() and [p.name for p in tmp_path.iterdir()] == ["ds"]
    (tmp_path / ".ds.old.trash-1-2").write_text("left by a killed delete")
    assert remove_stale_temps(target) == [tmp_path / ".ds.old.trash-1-2"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_a_converted_dataset_is_readable_as_a_new_directory_would_be(tmp_path):
    previous = os.umask(0o022)
    try:
        convert(TsvSource(tsv_dir(tmp_path / "graph")), tmp_path / "ds")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "ds").stat().st_mode) == 0o755


def test_the_cache_key_tells_apart_bytes_moved_from_one_split_to_another(tmp_path):
    # Hashed one after another without lengths, these two trees are the same bytes: "test" + test.txt +
    # "train" + train.txt + "valid" + valid.txt.
    a = tsv_dir(tmp_path / "a" / "ds", train="e5\tr\te6\ntrainx\tr\ty\n", test="e1\tr\te2\n")
    b = tsv_dir(tmp_path / "b" / "ds", train="x\tr\ty\n", test="e1\tr\te2\ntraine5\tr\te6\n")

    def unframed(directory):
        return b"".join(
            split.encode() + (directory / f"{split}.txt").read_bytes() for split in ("test", "train", "valid")
        )

    assert unframed(a) == unframed(b)
    assert _cache_key(TsvSource(a)) != _cache_key(TsvSource(b))


def test_a_valid_split_with_nothing_to_evaluate_is_named_by_its_file(tmp_path):
    directory = tsv_dir(tmp_path / "graph", valid="zz\tr\tyy\n")  # entities train never has
    with pytest.raises(ValueError, match=r"valid\.txt\): the valid split has no fact whose symbols all occur in"):
        open_dataset(directory, cache_dir=tmp_path / "cache")


def test_a_dglke_id_out_of_range_is_named_by_its_line_however_the_reader_spelt_it(tmp_path):
    directory = tmp_path / "dglke"
    directory.mkdir()
    (directory / "entity2id.txt").write_text("3\na\t0\nb\t1\nc\t2\n")
    (directory / "relation2id.txt").write_text("1\nr\t0\n")
    for split in ("valid", "test"):
        (directory / f"{split}.txt").write_text("0\t1\t0\n")
    for line in ("0x10\t1\t0", "0xFFFFFFFFFFFFFFFF\t1\t0", " 007 \t1\t0"):  # 16, -1 and 7: none an entity
        (directory / "train.txt").write_text(f"0\t1\t0\n\n0x1\t02\t0\n{line}\n")
        expected = f"train.txt:4: id out of range (3 entities, 1 relations): {line!r}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            convert(DglKeSource(directory), tmp_path / "ds")
