import numpy as np
import pytest

from storage.convert import ConvertOptions, write_id_dataset
from storage.reader import RowGroup, TripleStore, worker_share

NUM_TRIPLES = 1000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """1,000 distinct triples in 3 partitions of row groups of 64 rows."""
    root = tmp_path_factory.mktemp("reader") / "ds"
    train = np.stack([np.arange(NUM_TRIPLES) % 100, np.arange(NUM_TRIPLES) // 100, np.arange(NUM_TRIPLES) % 97], 1)
    write_id_dataset(
        root,
        entity_names=[f"e{i}" for i in range(100)],
        relation_names=[f"r{i}" for i in range(10)],
        splits={"train": train, "valid": train[:5], "test": train[5:10]},
        options=ConvertOptions(partition_rows=400, row_group_rows=64),
    )
    return TripleStore(root)


def _epoch(store, world_size, epoch, batch_size=50, seed=7):
    return [
        np.concatenate(
            list(store.batches("train", batch_size=batch_size, epoch=epoch, seed=seed, rank=r, world_size=world_size))
        )
        for r in range(world_size)
    ]


def _keys(rows):
    return (rows[:, 0] * 1000 + rows[:, 1]) * 1000 + rows[:, 2]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_every_triple_once_per_epoch_across_ranks(store, world_size):
    assert store.manifest.splits["train"].partitions == 3
    everything = set(_keys(store.read_split("train")).tolist())
    for epoch in (0, 1):
        shares = _epoch(store, world_size, epoch)
        seen = np.concatenate(shares)
        assert len(seen) == NUM_TRIPLES and set(_keys(seen).tolist()) == everything
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1  # balanced to one row whatever divides what


def test_epochs_are_reshuffled_and_reproducible(store):
    first, again, second = _epoch(store, 2, 0)[0], _epoch(store, 2, 0)[0], _epoch(store, 2, 1)[0]
    assert np.array_equal(first, again)
    assert not np.array_equal(first[:100], second[:100])


def test_batches_are_full_but_the_last(store):
    batches = list(store.batches("train", batch_size=64, epoch=0, seed=0, rank=1, world_size=3))
    assert all(len(b) == 64 for b in batches[:-1]) and 0 < len(batches[-1]) <= 64
    assert len(batches) == store.num_batches("train", 64, rank=1, world_size=3)
    assert batches[0].dtype == np.int64 and batches[0].shape[1] == 3


def test_inline_and_prefetched_reads_agree(store):
    a = list(store.batches("train", batch_size=33, epoch=2, seed=1, prefetch=0))
    b = list(store.batches("train", batch_size=33, epoch=2, seed=1, prefetch=3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_read_errors_surface_in_the_consumer(store, monkeypatch):
    def broken(group, rows=None):
        raise ValueError(f"{group.file}: cannot read row group {group.index} (disk on fire)")

    monkeypatch.setattr(store, "read_group", broken)
    with pytest.raises(ValueError, match="disk on fire"):
        list(store.batches("train", batch_size=10, epoch=0, seed=0))


def test_abandoned_iterator_stops_its_thread(store):
    batches = store.batches("train", batch_size=10, epoch=0, seed=0, prefetch=1)
    next(batches)
    batches.close()  # must not hang on the full queue


def test_worker_share_cuts_row_groups_at_rank_boundaries():
    groups = [RowGroup("a", 0, 5), RowGroup("a", 1, 5)]
    pieces = [worker_share(groups, rank, 3, epoch=0, seed=0) for rank in range(3)]
    lengths = [sum(p.stop - p.start for p in share) for share in pieces]
    assert lengths == [3, 3, 4]
    with pytest.raises(ValueError, match="rank 3 outside world size 3"):
        worker_share(groups, 3, 3, epoch=0, seed=0)
