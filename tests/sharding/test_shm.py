"""The shared-memory all-to-all and all-reduce on real gloo ranks: the tensors gloo would deliver, files
cleaned up, and gloo again where the ranks do not share the directory, an outbox cannot grow or a rank does
not come."""

import errno
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharding import shm
from sharding.exchange import GroupExchange
from sharding.gaussian import training_encoder
from sharding.kernels import native
from sharding.table import SampledGradient, ShardedTable

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler for the barrier")


def _init(root: Path, rank: int, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=world)


def _calls(world: int, seed: int) -> list[tuple[torch.dtype, tuple[int, ...], list[list[int]]]]:
    """(dtype, shape of a row, counts[source][destination]) of each all-to-all; the same on every rank
    (one generator)."""
    g = torch.Generator().manual_seed(seed)
    calls = []
    for shape, dtype, most in [((5,), torch.float32, 40), ((3,), torch.int64, 40), ((), torch.float32, 400_000)]:
        for _ in range(3):
            counts = torch.randint(0, most, (world, world), generator=g)
            counts[0, world - 1] = 0  # an empty segment
            calls.append((dtype, shape, counts.tolist()))
    return calls


def _exchange_all(rank: int, root: Path, world: int, fail_growth_on: int | None) -> None:
    _init(root, rank, world)
    try:
        if rank == fail_growth_on:

            def refuse(path: Path, nbytes: int) -> None:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

            real_create = shm._create
            shm._create = lambda path, nbytes: (refuse if "control" not in path.name else real_create)(path, nbytes)
        exchange = shm.SharedMemoryExchange.join(60.0, root / "shm")
        assert isinstance(exchange, shm.SharedMemoryExchange)
        gloo = GroupExchange()
        for i, (dtype, shape, counts) in enumerate(_calls(world, seed=7)):
            send = [counts[rank][peer] for peer in range(world)]
            recv = [counts[peer][rank] for peer in range(world)]
            tensor = (torch.arange(sum(send) * max(1, int(torch.tensor(shape).prod()))) + 1000 * rank + i).to(dtype)
            tensor = tensor.reshape(sum(send), *shape)
            # All-reduces started before the all-to-all ride on it, of element sizes 4, 8 and 8 after an odd
            # count of 4-byte ones; whole numbers, so any order sums alike.
            kinds = [(3 + 70_000 * (i % 2), torch.float32), (5, torch.int64), (2, torch.float64)]
            reduced = [torch.arange(size, dtype=kind) * (rank + 1) + i for size, kind in kinds]
            pending = [exchange.all_reduce_async(t) for t in reduced]
            expected_rows = gloo.all_to_all_back(tensor, send, recv)
            # Each dtype through both all-to-alls: whole, or as parts read where they arrived.
            if i % 2 == 0:
                assert torch.equal(exchange.all_to_all_back(tensor, send, recv), expected_rows), f"call {i}"
            else:
                parts = exchange.all_to_all_parts(tensor, send, recv)
                assert [len(part) for part in parts] == recv, f"call {i}"
                expected_parts = expected_rows.split(recv)
                assert all(torch.equal(a, b) for a, b in zip(parts, expected_parts, strict=True)), f"call {i}"
            for t, p in zip(reduced, pending, strict=True):
                p.wait()
                expected = torch.arange(len(t), dtype=t.dtype) * sum(range(1, world + 1)) + world * i
                assert torch.equal(t, expected), f"all-reduce of call {i}"
        # Alone (a generation of its own), queued before an empty one (which goes over gloo, after it), by
        # max, of integers, and of arbitrary floats: every rank the same bits.
        alone, empty = torch.full((3,), float(rank)), torch.empty(0)
        for p in [exchange.all_reduce_async(alone), exchange.all_reduce_async(empty)]:
            p.wait()
        assert torch.equal(alone, torch.full((3,), float(sum(range(world)))))
        top = exchange.all_reduce(torch.tensor([rank, -rank, 7], dtype=torch.int64), "max")
        assert top.tolist() == [world - 1, 0, 7]
        noisy = exchange.all_reduce(torch.randn(1000, generator=torch.Generator().manual_seed(rank)))
        everyone = [torch.empty_like(noisy) for _ in range(world)]
        dist.all_gather(everyone, noisy)
        assert all(torch.equal(other, noisy) for other in everyone)
        expected = torch.stack([torch.randn(1000, generator=torch.Generator().manual_seed(r)) for r in range(world)])
        assert torch.allclose(noisy, expected.sum(0))
        header = torch.arange(world * 3).reshape(world, 3) + 10 * rank
        assert torch.equal(exchange.all_to_all_rows(header), gloo.all_to_all_rows(header))
        exchange.close()
        dist.barrier()
        (root / f"rank{rank}.json").write_text(
            json.dumps({"shared": exchange.shared, "files": sorted(p.name for p in (root / "shm").iterdir())})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fail_growth_on", [None, 1])
def test_shared_memory_delivers_what_gloo_does_and_leaves_no_file(tmp_path, fail_growth_on):
    """Three ranks, uneven and empty segments, outboxes grown past their first megabyte, both all-to-alls
    (whole, in parts), all-reduces carried by them or alone; with one rank's outbox unable to grow, every
    rank goes on over gloo from that call with the same results."""
    (tmp_path / "shm").mkdir()
    mp.spawn(_exchange_all, args=(tmp_path, 3, fail_growth_on), nprocs=3, join=True)
    for rank in range(3):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"shared": fail_growth_on is None, "files": []}


def _join_apart(rank: int, root: Path, world: int) -> None:
    _init(root, rank, world)
    try:
        mine = root / f"dir{rank}"  # each rank its own directory: they do not share one
        mine.mkdir()
        exchange = shm.SharedMemoryExchange.join(60.0, mine)
        (root / f"rank{rank}.json").write_text(json.dumps(type(exchange).__name__))
    finally:
        dist.destroy_process_group()


def test_ranks_that_do_not_share_the_directory_use_gloo(tmp_path):
    mp.spawn(_join_apart, args=(tmp_path, 2), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == ["GroupExchange"] * 2
    assert not any((tmp_path / "dir0").iterdir())


def _wait_alone(rank: int, root: Path, world: int) -> None:
    _init(root, rank, world)
    exchange = shm.SharedMemoryExchange.join(1.0, root)
    assert isinstance(exchange, shm.SharedMemoryExchange)
    if rank == 0:
        try:
            exchange.all_to_all_back(torch.ones(2, 1), [1, 1], [1, 1])
        except RuntimeError as err:
            (root / "error.txt").write_text(str(err))
    dist.barrier()  # rank 1 stays here, never in the all-to-all
    exchange.close()
    dist.destroy_process_group()


def test_a_rank_that_does_not_come_is_named_after_the_timeout(tmp_path):
    mp.spawn(_wait_alone, args=(tmp_path, 2), nprocs=2, join=True)
    assert "rank 0: waited 1 s" in (tmp_path / "error.txt").read_text()
    assert "rank(s) [1]" in (tmp_path / "error.txt").read_text()


def _join_as_configured(rank: int, root: Path, world: int) -> None:
    _init(root, rank, world)
    try:
        chosen = [type(shm.join_exchange(flag, 1.0)).__name__ for flag in (False, True)]
        (root / f"rank{rank}.json").write_text(json.dumps(chosen))
    finally:
        dist.destroy_process_group()


def test_sharding_shared_memory_false_keeps_gloo(tmp_path):
    mp.spawn(_join_as_configured, args=(tmp_path, 2), nprocs=2, join=True)
    for rank in (0, 1):
        chosen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert chosen == ["GroupExchange", "SharedMemoryExchange"]


def _update_after_collective(rank: int, root: Path, world: int) -> None:
    _init(root, rank, world)
    try:
        exchange = shm.SharedMemoryExchange.join(60.0, root)
        assert isinstance(exchange, shm.SharedMemoryExchange)
        table = ShardedTable(
            40, 4, exchange, variational=True, optimizer="rowwise_adagrad", lr=0.1, seed=0, block_rows=8
        )
        results = []
        for late_collective in (False, True):
            ids = torch.arange(rank, 40, 3)  # rows of both owners
            encoded = table.encode(ids, training_encoder(4, (0, 0, int(late_collective)), None, False), tag=rank)
            encoded.values.grad = torch.ones_like(encoded.values)
            _, grad = table.collect([encoded], None, unformed=True)
            assert isinstance(grad, SampledGradient)  # each peer's rows left in its outbox
            if late_collective:
                exchange.all_reduce(torch.ones(1))  # the outboxes may be rewritten from here
            try:
                table.step(None, grad)
                results.append("updated")
            except RuntimeError as err:
                results.append(str(err))
        (root / f"rank{rank}.json").write_text(json.dumps(results))
        exchange.close()
    finally:
        dist.destroy_process_group()


def test_a_sampled_gradient_is_not_read_after_a_later_collective(tmp_path):
    """The owner's update reads each peer's gradient rows in the peer's outbox: after a later collective
    (which may have rewritten it) it refuses rather than read what may be another step's rows."""
    mp.spawn(_update_after_collective, args=(tmp_path, 2), nprocs=2, join=True)
    for rank in (0, 1):
        updated, late = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert updated == "updated" and "after a later collective" in late


def _update_from_streams(rank: int, root: Path, world: int) -> None:
    _init(root, rank, world)
    try:
        exchange = shm.SharedMemoryExchange.join(60.0, root)
        assert isinstance(exchange, shm.SharedMemoryExchange)
        tables = {}
        for name, through in (("shm", exchange), ("gloo", GroupExchange())):
            table = ShardedTable(
                400, 8, through, variational=True, optimizer="rowwise_adagrad", lr=0.1, seed=0, block_rows=64
            )
            g = torch.Generator().manual_seed(rank)
            encoded = []
            for stream in range(3):  # three requests in one step: three all-to-alls before the update
                ids = torch.randperm(400, generator=g)[: 150 + 20 * stream].sort().values
                item = table.encode(ids, training_encoder(8, (0, 0, 0), None, False), tag=2 * stream + rank)
                item.values.grad = torch.randn(item.values.shape, generator=g)
                encoded.append(item)
            _, grad = table.collect(encoded, None, unformed=True)
            assert isinstance(grad, SampledGradient)
            table.step(None, grad)
            tables[name] = table.weight
        (root / f"rank{rank}.json").write_text(json.dumps(torch.equal(tables["shm"], tables["gloo"])))
        exchange.close()
    finally:
        dist.destroy_process_group()


def test_an_update_from_several_streams_reads_what_gloo_delivers(tmp_path):
    """Several requests in one step are several all-to-alls before the update: a peer may write its outbox
    again meanwhile, so only the last request's rows may be read where they arrived; the update equals the
    one from gloo's copies, bit for bit."""
    mp.spawn(_update_from_streams, args=(tmp_path, 2), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [True, True]
