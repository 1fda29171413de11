import pytest
import torch

from sharding.plan import RowPlan
from sharding.rng import block_normal


@pytest.mark.parametrize(("rows", "world"), [(10, 1), (5000, 2), (5000, 3), (100, 4), (4096, 4)])
def test_ranges_cover_every_row_once_on_block_boundaries(rows, world):
    plan = RowPlan(rows, world, block_rows=1024)
    bounds = plan.bounds
    assert bounds[0] == 0 and bounds[-1] == rows and bounds == sorted(bounds)
    assert all(b % 1024 == 0 for b in bounds[:-1])
    sizes = [plan.range(r)[1] - plan.range(r)[0] for r in range(world)]
    assert max(sizes) - min(sizes) <= 1024


def test_counts_by_owner():
    plan = RowPlan(100, 2, block_rows=10)  # ranks own [0, 50) and [50, 100)
    assert plan.counts_by_owner(torch.tensor([0, 3, 49, 50, 99])) == [3, 2]
    assert RowPlan(100, 1, block_rows=10).counts_by_owner(torch.tensor([0, 3, 49, 50, 99])) == [5]


def test_block_noise_does_not_depend_on_the_range_it_is_drawn_in():
    whole = block_normal((0, 100), 3, (7, 1), block_rows=16)
    parts = torch.cat([block_normal((0, 37), 3, (7, 1), 16), block_normal((37, 100), 3, (7, 1), 16)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, block_normal((0, 100), 3, (7, 2), 16))
