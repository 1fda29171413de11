"""Which worker owns which entity rows: a pure function of (number of rows, world size).

Rows are split into contiguous ranges, one per rank, with boundaries on multiples of ``BLOCK_ROWS`` so
that per-block random streams (see ``ShardedTable.dense_noise``) are the same whatever the world size.
Ids come from sorted names, which carry no frequency order, so contiguous ranges balance the load.
Checkpoints are stored by row range, so any plan can load any other plan's files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_ROWS = 1024


@dataclass(frozen=True)
class RowPlan:
    num_rows: int
    world_size: int
    block_rows: int = BLOCK_ROWS

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size {self.world_size} must be positive")

    @property
    def bounds(self) -> list[int]:
        """Row boundaries [0, b1, ..., num_rows]: rank r owns [bounds[r], bounds[r + 1])."""
        num_blocks = -(-self.num_rows // self.block_rows)
        return [
            min(self.num_rows, num_blocks * r // self.world_size * self.block_rows) for r in range(self.world_size + 1)
        ]

    def range(self, rank: int) -> tuple[int, int]:
        bounds = self.bounds
        return bounds[rank], bounds[rank + 1]

    def counts_by_owner(self, sorted_ids: torch.Tensor) -> list[int]:
        """How many of the ascending row ids ``sorted_ids`` (each in [0, num_rows)) each rank owns."""
        if self.world_size == 1:  # every step asks; one owner needs no search
            return [len(sorted_ids)]
        edges = torch.tensor(self.bounds, dtype=sorted_ids.dtype, device=sorted_ids.device)
        return torch.diff(torch.searchsorted(sorted_ids, edges)).tolist()


OPTIMIZER_STATE = {"adam": 2.0, "rowwise_adagrad": 0.0}
"""Optimiser state per row as a multiple of the row (Adam: two moments); row-wise Adagrad adds one
float per row part instead (see ``table_bytes``)."""


def table_bytes(num_rows: int, dim: int, *, variational: bool, optimizer: str, world_size: int) -> int:
    """fp32 bytes of the largest rank's entity shard: rows [mean | logvar] plus their optimiser state."""
    plan = RowPlan(num_rows, world_size)
    rows = max(hi - lo for lo, hi in (plan.range(r) for r in range(world_size)))
    parts = 2 if variational else 1
    per_row = parts * dim * (1.0 + OPTIMIZER_STATE[optimizer]) + (parts if optimizer == "rowwise_adagrad" else 0)
    return int(rows * per_row * 4)
