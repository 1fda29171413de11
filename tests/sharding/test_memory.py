"""Tables on huge pages: the request reaches the kernel, and the tables hold what they held before."""

import math
import re
from pathlib import Path

import pytest
import torch

from sharding import memory, rng
from sharding.row_optim import RowAdagrad, RowAdam
from sharding.table import init_rows

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _huge_kib(tensor: torch.Tensor) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds ``tensor``'s first whole huge page (the
    advice splits the mapping there)."""
    address, inside = -(-tensor.data_ptr() // memory.HUGE_PAGE) * memory.HUGE_PAGE, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        bounds = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if bounds:
            inside = int(bounds[1], 16) <= address < int(bounds[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(
    not THP.is_file() or "[never]" in THP.read_text(), reason="transparent huge pages are off (or not Linux)"
)
def test_the_entity_table_and_its_adam_state_are_backed_by_huge_pages():
    table = init_rows(4096, 512, (0, 4096), variational=True, init_std=None, init_logvar=None, seed=0,
                      block_rows=1024, device=torch.device("cpu"))  # fmt: skip
    adam = RowAdam(table, 0.1)  # 16 MiB each
    adagrad = RowAdagrad(torch.empty(600_000, 8), 0.1, parts=2)  # accumulators of 4.8 MB
    for tensor in (table, adam.exp_avg, adam.exp_avg_sq, adagrad.sum_sq):
        assert _huge_kib(tensor) >= memory.HUGE_PAGE // 1024
    assert not adagrad.sum_sq.any()


def test_small_tensors_and_tensors_without_whole_huge_pages_are_left_alone():
    assert memory.empty((10, 10)).shape == (10, 10)
    assert not memory.advise_huge_pages(torch.empty(1000))  # no whole 2 MiB page inside


def test_init_rows_and_adam_state_hold_the_values_they_held_before():
    """The tables are written in place of what torch.cat and torch.zeros made: the same numbers."""
    rows, dim, block = (100, 1600), 8, 512
    table = init_rows(3000, dim, rows, variational=True, init_std=None, init_logvar=None, seed=5, block_rows=block,
                      device=torch.device("cpu"))  # fmt: skip
    mean = rng.block_normal(rows, dim, (5, rng.INIT), block, torch.device("cpu")) * math.sqrt(2.0 / (3000 + dim))
    assert torch.equal(table, torch.cat([mean, torch.full_like(mean, math.log(1.0 / dim))], dim=1))
    point = init_rows(3000, dim, rows, variational=False, init_std=0.1, init_logvar=None, seed=5, block_rows=block,
                      device=torch.device("cpu"))  # fmt: skip
    assert torch.equal(point, rng.block_normal(rows, dim, (5, rng.INIT), block, torch.device("cpu")) * 0.1)
    adam = RowAdam(table, 0.1)
    assert adam.exp_avg.shape == table.shape and not adam.exp_avg.any() and not adam.exp_avg_sq.any()
