"""Tables on huge pages: the request reaches the kernel, and the tables hold what they held before."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharding import memory, rng
from sharding.row_optim import RowAdagrad, RowAdam
from sharding.table import init_rows

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: in a long-lived one, glibc may serve a 16 MiB table from heap pages freed
# earlier, which stay 4 KiB pages until khugepaged merges them.
_PROBE = """
import json, re, sys
from pathlib import Path
import torch
from sharding import memory
from sharding.row_optim import RowAdagrad, RowAdam
from sharding.table import init_rows

def huge_kib(tensor):
    # AnonHugePages of the mapping holding the tensor's first whole huge page (the advice splits it there)
    address, inside = -(-tensor.data_ptr() // memory.HUGE_PAGE) * memory.HUGE_PAGE, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        bounds = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if bounds:
            inside = int(bounds[1], 16) <= address < int(bounds[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")

table = init_rows(4096, 512, (0, 4096), variational=True, init_std=None, init_logvar=None, seed=0,
                  block_rows=1024, device=torch.device("cpu"))  # 16 MiB
adam = RowAdam(table, 0.1)
adagrad = RowAdagrad(torch.empty(600_000, 8), 0.1, parts=2)  # accumulators of 4.8 MB
control = torch.empty(4096, 1024).fill_(1.0)  # 16 MiB, not advised
tensors = {"table": table, "exp_avg": adam.exp_avg, "exp_avg_sq": adam.exp_avg_sq, "sum_sq": adagrad.sum_sq,
           "control": control}
print(json.dumps({name: huge_kib(tensor) for name, tensor in tensors.items()}))
"""


@pytest.mark.skipif(
    not THP.is_file() or "[never]" in THP.read_text(), reason="transparent huge pages are off (or not Linux)"
)
def test_the_entity_table_and_its_optimiser_state_are_backed_by_huge_pages():
    probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    huge = json.loads(probe.stdout)
    for name in ("table", "exp_avg", "exp_avg_sq", "sum_sq"):
        assert huge[name] >= memory.HUGE_PAGE // 1024, huge
    if "[madvise]" in THP.read_text():  # under "always" every large tensor gets them, asked or not
        assert huge["control"] == 0, huge


def test_only_whole_huge_pages_of_contiguous_memory_are_advised():
    if THP.is_file():  # a kernel built without transparent huge pages refuses the advice
        assert memory.advise_huge_pages(torch.empty(1 << 21))  # 8 MiB: whole huge pages inside
    assert not memory.advise_huge_pages(torch.empty(1000))  # no whole huge page inside
    assert not memory.advise_huge_pages(torch.empty(2048, 2048).t())  # not contiguous
    assert not memory.advise_huge_pages(torch.zeros(()).expand(4096, 1024))  # owns 4 bytes
    assert memory.zeros_like(torch.ones(2048, 2048)).count_nonzero() == 0


def test_init_rows_and_the_optimiser_state_hold_the_values_they_held_before():
    """The tables are written in place of what torch.cat and torch.zeros made: the same numbers."""
    rows, dim, block = (100, 1600), 8, 512
    table = init_rows(3000, dim, rows, variational=True, init_std=None, init_logvar=None, seed=5, block_rows=block,
                      device=torch.device("cpu"))  # fmt: skip
    mean = rng.block_normal(rows, dim, (5, rng.INIT), block, torch.device("cpu")) * math.sqrt(2.0 / (3000 + dim))
    assert torch.equal(table, torch.cat([mean, torch.full_like(mean, math.log(1.0 / dim))], dim=1))
    point = init_rows(3000, dim, rows, variational=False, init_std=0.1, init_logvar=None, seed=5, block_rows=block,
                      device=torch.device("cpu"))  # fmt: skip
    assert torch.equal(point, rng.block_normal(rows, dim, (5, rng.INIT), block, torch.device("cpu")) * 0.1)
    adam, adagrad = RowAdam(table, 0.1), RowAdagrad(table, 0.1, parts=2)
    assert adam.exp_avg.shape == table.shape and not adam.exp_avg.any() and not adam.exp_avg_sq.any()
    assert adagrad.sum_sq.shape == (1500, 2) and not adagrad.sum_sq.any()
