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
  * a step's dense entity noise (every local row: 1-vs-all, full LIM KL): the counter-based stream
    (seed, epoch, step), value (row, j) at row * dim + j;
  * evaluation samples: (seed, EVAL_SAMPLES, k) for sample k;
  * the facts a sampled evaluation ranks: (seed, EVAL_FACTS); the candidates of its batch b, side d
    (0 tail, 1 head): (seed, EVAL_CANDIDATES, b, d). Every rank draws the same ids and keeps its own.

The counter-based stream is compiled on the CPU (``sharding/kernels/noise.c``) and written in torch
ops for CUDA and for machines without a compiler (``counter_normal``): the same integers everywhere, the
same floats to rounding, one vectorised draw with no loop over rows or blocks. The Parquet partition
hash of ``storage/convert.py`` uses the same splitmix64, so it is a function of the fact and the seed
alone.
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

_MASK = 0xFFFFFFFFFFFFFFFF
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
"""splitmix64's increment and the multipliers of its finaliser (shared by the array and the int version)."""


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each uint64 element (golden-ratio increment, then the finaliser): a uniform 64-bit hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
    return x ^ (x >> np.uint64(31))


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixing several integers: splitmix64 chained over the parts (negative parts as two's
    complement). On Python ints: a step draws a few seeds, and numpy's per-call cost on one-element arrays
    made them a twentieth of a small step."""
    state = 0
    for part in parts:
        x = ((state ^ (int(part) & _MASK)) + _GOLDEN) & _MASK
        x = ((x ^ (x >> 30)) * _MIX1) & _MASK
        x = ((x ^ (x >> 27)) * _MIX2) & _MASK
        state = x ^ (x >> 31)
    return state & 0x7FFFFFFFFFFFFFFF


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
    """Standard normal noise for rows [lo, hi) of the stream ``key`` into ``out`` [hi - lo, dim]: value
    (row, j) is value row * dim + j of the counter-based stream ``seed_of(*key)``, so a row's noise does not
    depend on the range it is drawn in: the compiled kernel on the CPU, else ``counter_normal`` (CUDA, or no
    compiler)."""
    seed, first = seed_of(*key), row_range[0] * dim
    if not native.normal_into(out, seed, first):
        index = torch.arange(first, first + out.numel(), device=out.device)
        out.copy_(counter_normal(seed, index).view(out.shape))


def rows_normal(rows: torch.Tensor, dim: int, key: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Rows ``rows`` (any order) of the stream ``key`` seen as [.., dim]: ``row_normal``'s values for them."""
    seed = seed_of(*key)
    out = torch.empty(len(rows), dim, device=device)
    if not native.normal_rows_into(out, seed, rows):
        index = rows.to(device=device, dtype=torch.int64).unsqueeze(1) * dim + torch.arange(dim, device=device)
        out.copy_(counter_normal(seed, index))
    return out


_GOLDEN = 0x9E3779B97F4A7C15
CHUNK = 256
"""Box-Muller pairs per chunk of the counter-based stream (``CHUNK`` in noise.c)."""


def _signed(x: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bits."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64_torch(x: torch.Tensor) -> torch.Tensor:
    """``splitmix64`` on int64 tensors holding uint64 bits (products wrap modulo 2^64, as on every device)."""
    x = x + _signed(_GOLDEN)
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c modulo 2^32 for x in [0, 2^32) held in int64, in 16-bit halves of c (no product overflows)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _log_approx(u: torch.Tensor) -> torch.Tensor:
    """vecmath.h's log_approx, op for op."""
    bits = u.view(torch.int32)
    e = ((bits >> 23) - 126).float()
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    small = m < 0.707106781186547524
    e = torch.where(small, e - 1.0, e)
    m = torch.where(small, m + m - 1.0, m - 1.0)
    z = m * m
    y = torch.full_like(m, 7.0376836292e-2)
    for coefficient in (
        -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
        -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
    ):  # fmt: skip
        y = y * m + coefficient
    y = y * m * z - 2.12194440e-4 * e - 0.5 * z
    return m + y + 0.693359375 * e


def _turn_approx(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vecmath.h's turn_approx: (cos, sin) of 2 pi v, op for op."""
    w = 4.0 * v
    q = torch.floor(w + 0.5)
    t = (w - q) * 1.57079632679489662
    t2 = t * t
    s = t + t * t2 * (-1.6666654611e-1 + t2 * (8.3321608736e-3 + t2 * -1.9515295891e-4))
    c = 1.0 - 0.5 * t2 + t2 * t2 * (4.166664568298827e-2 + t2 * (-1.388731625493765e-3 + t2 * 2.443315711809948e-5))
    quadrant = q.to(torch.int32)
    odd = (quadrant & 1).bool()
    sine, cosine = torch.where(odd, c, s), torch.where(odd, s, c)
    return torch.where(((quadrant + 1) & 2).bool(), -cosine, cosine), torch.where((quadrant & 2).bool(), -sine, sine)


def counter_normal(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Values ``index`` (int64, any shape, any device) of the counter-based stream ``seed`` of noise.c, in
    torch ops: value e is the cosine (e even) or sine (e odd) Box-Muller normal of pair e // 2, whose
    uniforms hash the pair's place in its chunk under the chunk's keys. The integer part is exact on every
    device; the float part runs noise.c's polynomials op for op, so values agree with the compiled kernel to
    rounding (it fuses multiply-adds). No loop over rows or blocks, and no host sync."""
    pair = index >> 1
    chunk_key = splitmix64_torch(splitmix64_torch(pair // CHUNK) ^ _signed(seed & 0xFFFFFFFFFFFFFFFF))
    k0, k1 = chunk_key & 0xFFFFFFFF, _shr(chunk_key, 32)
    a = _lowbias32(_lowbias32((pair % CHUNK) ^ k0) ^ k1)
    b = _lowbias32(a ^ k0)
    radius = torch.sqrt(-2.0 * _log_approx(((a >> 8) + 1).float() * 2.0**-24))
    cosine, sine = _turn_approx((b >> 8).float() * 2.0**-24)
    return radius * torch.where((index & 1).bool(), sine, cosine)
