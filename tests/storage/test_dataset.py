import re

import pytest

from storage.dataset import bundled_names, open_dataset, resolve_store


def _write(directory, train="a\tr\tb\nb\tr\tc\n", valid="a\tr\tc\n", test="c\tr\ta\n"):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        if text is not None:
            (directory / f"{name}.txt").write_text(text)
    return directory


def _open(directory, tmp_path):
    return open_dataset(directory, cache_dir=tmp_path / "cache")


def test_loads_a_directory_with_ids_from_train(tmp_path):
    data = _open(_write(tmp_path / "g"), tmp_path)
    assert data.names("entities")["name"].to_pylist() == ["a", "b", "c"]
    assert data.names("relations")["name"].to_pylist() == ["r"]
    assert sorted(data.train.tolist()) == [[0, 0, 1], [1, 0, 2]]
    assert data.test.tolist() == [[2, 0, 0]]
    assert data.dropped == {"valid": 0, "test": 0}
    assert data.entity_frequency.tolist() == [1, 2, 1]


def test_facts_with_unseen_entities_are_dropped_and_counted(tmp_path):
    data = _open(_write(tmp_path / "g", test="c\tr\ta\nzzz\tr\ta\na\tnew\tb\n"), tmp_path)
    assert data.test.tolist() == [[2, 0, 0]]
    assert data.dropped["test"] == 2
    assert data.store.manifest.splits["test"].unseen_facts == 2
    assert data.store.manifest.num_entities == 4 and data.num_entities == 3


def test_conversion_is_cached_by_content(tmp_path):
    directory = _write(tmp_path / "g")
    first = resolve_store(directory, tmp_path / "cache")
    assert resolve_store(directory, tmp_path / "cache") == first
    (directory / "train.txt").write_text("a\tr\tb\nb\tr\tc\nc\tr\ta\n")
    second = resolve_store(directory, tmp_path / "cache")
    assert second != first and len(_open(directory, tmp_path).train) == 3


def test_malformed_line_names_file_and_line(tmp_path):
    directory = _write(tmp_path / "g", train="a\tr\tb\nb\tr\n")
    with pytest.raises(ValueError, match=r"train\.txt:2: expected 3"):
        _open(directory, tmp_path)


def test_empty_field_is_malformed(tmp_path):
    directory = _write(tmp_path / "g", valid="a\tr\tb\na\t\tb\n")
    with pytest.raises(ValueError, match=r"valid\.txt:2"):
        _open(directory, tmp_path)


def test_empty_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"test\.txt: split is empty"):
        _open(_write(tmp_path / "g", test="\n"), tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing file: .*valid\.txt"):
        _open(_write(tmp_path / "g", valid=None), tmp_path)


def test_unknown_dataset_lists_the_bundled_ones(tmp_path):
    with pytest.raises(ValueError, match=r"bundled: .*nations"):
        _open("no-such-dataset", tmp_path)


@pytest.mark.parametrize(
    ("name", "entities", "relations", "train", "dropped"),
    [
        ("nations", 14, 55, 1592, 0),
        ("umls", 135, 46, 5216, 0),
        ("kinships", 104, 25, 8544, 0),
        ("wn18rr", 40559, 11, 86835, 420),
    ],
)
def test_bundled_datasets(tmp_path, name, entities, relations, train, dropped):
    assert name in bundled_names()
    data = _open(name, tmp_path)
    assert (data.num_entities, data.num_relations, len(data.train)) == (entities, relations, train)
    assert sum(data.dropped.values()) == dropped


def test_a_dataset_without_negatives_loads_as_before(tmp_path):
    data = _open(_write(tmp_path / "g"), tmp_path)
    assert list(data.store.manifest.splits) == ["train", "valid", "test"]
    assert not any(p.name.endswith("_negatives") for p in data.store.root.iterdir())
    assert data.negatives("valid") is None and data.negatives("test") is None and data.dropped_negatives == {}


def test_negatives_are_loaded_with_unseen_symbols_dropped_and_counted(tmp_path):
    directory = _write(tmp_path / "g")
    first = resolve_store(directory, tmp_path / "cache")
    (directory / "test_negatives.txt").write_text("b\tr\ta\nzzz\tr\ta\nc\tr\tb\n")
    data = _open(directory, tmp_path)
    assert data.store.root != first  # the negatives file is part of the input: a new conversion
    assert sorted(data.negatives("test").tolist()) == [[1, 0, 0], [2, 0, 1]]
    assert data.negatives("valid") is None
    assert data.dropped_negatives == {"test": 1} and data.dropped == {"valid": 0, "test": 0}
    assert data.negatives_file("test") == "test_negatives.txt"
    assert len(data.all_known()) == 4  # negatives are never known facts


def test_negatives_with_no_scorable_fact_are_an_error(tmp_path):
    directory = _write(tmp_path / "g")
    (directory / "valid_negatives.txt").write_text("zzz\tr\ta\n")
    file = re.escape(str(directory / "valid_negatives.txt"))
    with pytest.raises(ValueError, match=rf"^{file} \(converted to .*\): none of its 1 negatives has all its symbols"):
        _open(directory, tmp_path)
