from bench.uncertainty import _read_facts, typed_negatives
from storage.dataset import BUNDLED_DIR, open_dataset


def test_typed_negatives_are_unknown_corruptions_by_entities_of_the_relation_s_kind(tmp_path):
    source = BUNDLED_DIR / "kinships"
    out = tmp_path / "kinships-typed"
    counts = typed_negatives(source, out, seed=3)
    splits = {name: _read_facts(source / f"{name}.txt") for name in ("train", "valid", "test")}
    known = {fact for facts in splits.values() for fact in facts}
    heads = {(r, h) for h, r, _ in splits["train"]}
    tails = {(r, t) for _, r, t in splits["train"]}
    for name in ("valid", "test"):
        negatives = _read_facts(out / f"{name}_negatives.txt")
        assert len(set(negatives)) == len(splits[name]) and not set(negatives) & known
        sides = []
        for (h, r, t), (nh, nr, nt) in zip(splits[name], negatives, strict=True):
            assert nr == r and (nh == h) != (nt == t)  # exactly one side replaced
            assert (r, nh) in heads if nh != h else (r, nt) in tails  # by an entity of that role (kinships: always)
            sides.append(nh != h)
        assert 0.4 < sum(sides) / len(sides) < 0.6  # heads and tails alike
    # The copy converts as a user's dataset does, its negatives read as verified.
    data = open_dataset(out, cache_dir=tmp_path / "cache")
    assert len(data.negatives("test")) == len(splits["test"])
    assert counts == {name: {"negatives": len(splits[name]), "not_of_the_kind": 0} for name in ("valid", "test")}
    typed_negatives(source, tmp_path / "again", seed=3)
    assert (tmp_path / "again" / "test_negatives.txt").read_text() == (out / "test_negatives.txt").read_text()


def test_a_fact_with_no_corruption_of_the_kind_left_takes_another_entity_and_is_counted(tmp_path):
    source = BUNDLED_DIR / "nations"  # 14 entities: some facts have every corruption of the kind known
    counts = typed_negatives(source, tmp_path / "nations-typed")
    train = _read_facts(source / "train.txt")
    heads, tails = {(r, h) for h, r, _ in train}, {(r, t) for _, r, t in train}
    known = {fact for split in ("train", "valid", "test") for fact in _read_facts(source / f"{split}.txt")}
    for name in ("valid", "test"):
        negatives = _read_facts(tmp_path / "nations-typed" / f"{name}_negatives.txt")
        assert len(set(negatives)) == len(negatives) == counts[name]["negatives"] and not set(negatives) & known
        pairs = zip(_read_facts(source / f"{name}.txt"), negatives, strict=True)
        off = sum((r, nh) not in heads if nh != h else (r, nt) not in tails for (h, r, _), (nh, _, nt) in pairs)
        assert off == counts[name]["not_of_the_kind"] > 0
