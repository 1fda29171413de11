import pytest

from storage.triples import bundled_names, load_dataset


def _write(directory, train="a\tr\tb\nb\tr\tc\n", valid="a\tr\tc\n", test="c\tr\ta\n"):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        if text is not None:
            (directory / f"{name}.txt").write_text(text)
    return directory


def test_loads_a_directory_with_ids_from_train(tmp_path):
    data = load_dataset(_write(tmp_path / "g"))
    assert data.entity_names == ["a", "b", "c"] and data.relation_names == ["r"]
    assert data.train.tolist() == [[0, 0, 1], [1, 0, 2]]
    assert data.test.tolist() == [[2, 0, 0]]
    assert data.dropped == {"valid": 0, "test": 0}


def test_facts_with_unseen_entities_are_dropped_and_counted(tmp_path):
    data = load_dataset(_write(tmp_path / "g", test="c\tr\ta\nzzz\tr\ta\na\tnew\tb\n"))
    assert data.test.tolist() == [[2, 0, 0]]
    assert data.dropped["test"] == 2


def test_malformed_line_names_file_and_line(tmp_path):
    directory = _write(tmp_path / "g", train="a\tr\tb\nb\tr\n")
    with pytest.raises(ValueError, match=r"train\.txt:2: expected 3"):
        load_dataset(directory)


def test_empty_field_is_malformed(tmp_path):
    directory = _write(tmp_path / "g", valid="a\t\tb\n")
    with pytest.raises(ValueError, match=r"valid\.txt:1"):
        load_dataset(directory)


def test_empty_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"test\.txt: split is empty"):
        load_dataset(_write(tmp_path / "g", test="\n"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing file: .*valid\.txt"):
        load_dataset(_write(tmp_path / "g", valid=None))


def test_unknown_dataset_lists_the_bundled_ones():
    with pytest.raises(ValueError, match=r"bundled: .*nations"):
        load_dataset("no-such-dataset")


@pytest.mark.parametrize(
    ("name", "entities", "relations", "train"),
    [("nations", 14, 55, 1592), ("umls", 135, 46, 5216), ("kinships", 104, 25, 8544), ("wn18rr", 40559, 11, 86835)],
)
def test_bundled_datasets(name, entities, relations, train):
    assert name in bundled_names()
    data = load_dataset(name)
    assert (data.num_entities, data.num_relations, len(data.train)) == (entities, relations, train)
