"""Every random number of a run, and why it does not depend on the number of workers.

The central invariant: a run's numbers are a function of its seed and its data streams, never of how
many workers share them or which rank owns a row. So nothing here is keyed by rank. Every draw is keyed
by a tuple of integers mixed with splitmix64 (``seed_of``):

  * initial values: (seed, INIT, block), drawn per block of ``block_rows`` rows (``block_normal``);
  * a step's Bernoulli negatives: (seed, epoch, step, stream), one torch generator per data stream;
  * a step's relation noise: (seed, epoch, step, RELATION_STREAM);
  * a step's entity noise for the rows a stream asked for: (seed, epoch, step, stream, NOISE), a
    counter-based stream indexed by the row's position in the stream's sorted id list
    (``row_normal``), so an owner draws exactly the values of the rows it serves;
  * a step's dense entity noise (every local row: 1-vs-all, full LIM KL): (seed, epoch, step) per block;
  * evaluation samples: (seed, EVAL_SAMPLES, k) for sample k;
  * the facts a sampled evaluation ranks: (seed, EVAL_FACTS); the candidates of its batch b, side d
    (0 tail, 1 head): (seed, EVAL_CANDIDATES, b, d). Every rank draws the same ids and keeps its own.

The counter-based stream is compiled (``sharding/kernels/noise.c``); where the kernels cannot run, the same
rows come from torch's generator per block of ``NOISE_BLOCK`` rows: other values, the same distribution,
and still independent of the sharding. The Parquet partition hash of ``storage/convert.py`` uses the same
splitmix64, so it is a function of the fact and the seed alone.
"""

from __future__ import annotations

import numpy as np
import torch

from sharding.kernels import native

INIT = 0x1A17
"""Tag of the initial values of a table."""
NOISE = 0x401E
"""Tag of the per-row entity noise of a data stream in a training step."""
EVAL_SAMPLES = 0x5A3E
"""Tag of the Monte-Carlo samples of evaluation."""
EVAL_FACTS = 0x5A3F
"""Tag of the sample of facts an evaluation with ``max_facts`` ranks."""
EVAL_CANDIDATES = 0x5A40
"""Tag of the sampled candidates of an evaluation batch."""
RELATION_STREAM = -1
"""The stream id of the relation noise of a training step (data streams are 0, 1, ...)."""
NOISE_BLOCK = 256
"""Rows per torch generator of the per-row noise where the compiled stream is not available."""

_MASK = 0xFFFFFFFFFFFFFFFF


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each uint64 element (golden-ratio increment, then the finaliser): a uniform 64-bit hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixing several integers: splitmix64 chained over the parts (negative parts as two's
    complement)."""
    state = np.zeros(1, dtype=np.uint64)
    for part in parts:
        state = splitmix64(state ^ np.uint64(part & _MASK))
    return int(state[0]) & 0x7FFFFFFFFFFFFFFF


def generator(key: tuple[int, ...], device: torch.device | None = None) -> torch.Generator:
    """A torch generator seeded by ``seed_of(*key)``."""
    return torch.Generator(device=device or torch.device("cpu")).manual_seed(seed_of(*key))


def step_generator(key: tuple[int, ...], stream: int, device: torch.device | None = None) -> torch.Generator:
    """Negatives (and the relation noise, with ``RELATION_STREAM``) of one stream in one step:
    ``key`` is (seed, epoch, step)."""
    return generator((*key, stream), device)


def block_normal(
    row_range: tuple[int, int],
    dim: int,
    key: tuple[int, ...],
    block_rows: int,
    device: torch.device | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard normal [hi - lo, dim] for rows [lo, hi), from one generator per block of ``block_rows``
    seeded by (key, block): the same numbers for a row whatever range it is drawn in (on one device type).
    Written into ``out`` when given."""
    device = torch.device("cpu") if device is None else device
    lo, hi = row_range
    out = torch.empty(hi - lo, dim, device=device) if out is None else out
    for block in range(lo // block_rows, -(-hi // block_rows)):
        block_generator = generator((*key, block), device)
        start, stop = block * block_rows, (block + 1) * block_rows
        first, last = max(lo, start), min(hi, stop)
        if (first, last) == (start, stop):  # a whole block: drawn in place, as randn would draw it
            out[first - lo : last - lo].normal_(generator=block_generator)
        else:
            values = torch.randn(block_rows, dim, generator=block_generator, device=device)
            out[first - lo : last - lo] = values[first - start : last - start]
    return out


def row_normal(row_range: tuple[int, int], dim: int, key: tuple[int, ...], out: torch.Tensor) -> None:
    """Standard normal noise for rows [lo, hi) of the stream ``key`` into ``out`` [hi - lo, dim]: from the
    compiled counter-based stream on the CPU (value (row, j) is a function of the key and row * dim + j),
    otherwise per block of ``NOISE_BLOCK`` rows with torch's generator. Either way a row's noise does not
    depend on the range it is drawn in."""
    lo, _ = row_range
    if not native.normal_into(out, seed_of(*key), lo * dim):
        block_normal(row_range, dim, key, NOISE_BLOCK, out.device, out)
