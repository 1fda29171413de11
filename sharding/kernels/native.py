"""The loader of the compiled CPU kernels: in-place row updates of Adam and row-wise Adagrad and the owner's
merge of gradient rows (``rows.c``), the counter-based noise of the training samples with the fused sample
and KL of Gaussian rows (``noise.c``), the 1-vs-all log-partition and its backward (``partition.c``), the
Bernoulli NLL of chunked facts under DistMult or ComplEx, both ways (``bilinear.c``), a hash of strings for
the converter's name lookup (``strings.c``), the N-Triples converter's fast path (``ntriples.c``) and the
barrier of the shared-memory all-to-all (``barrier.c``). Built on first use with the machine's C compiler,
for its CPU, into a cache keyed by the sources, flags and CPU; loaded with ctypes.

Where they cannot be had (no compiler, ``NVKG_NATIVE=0``, or tensors that are not contiguous float32 on
the CPU) torch ops do the work: the same Adam update, the same sample and KL, and noise from torch's
generator (other values, the same distribution). A failed build is said once, with the compiler's message.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

HERE = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-fPIC", "-fopenmp")
SOURCES = {
    HERE / "rows.c": (*FLAGS, "-fno-math-errno"),
    HERE / "noise.c": (*FLAGS, "-ffast-math"),
    HERE / "partition.c": (*FLAGS, "-fno-math-errno", "-fno-trapping-math"),
    HERE / "bilinear.c": (*FLAGS, "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"),
    HERE / "strings.c": FLAGS,
    HERE / "barrier.c": FLAGS,
    HERE / "ntriples.c": FLAGS,
}
HEADERS = (HERE / "vecmath.h",)
"""Each file with its flags. -fno-math-errno lets sqrtf vectorise (with errno the Adam update is a scalar
call); -ffast-math lets the row sums vectorise (noise and samples only); -march=native gives the
polynomials FMA; -fopenmp runs the loops on torch's OpenMP threads (libgomp.so.1 is the copy torch has
loaded, so torch.set_num_threads governs them too). -Wno-psabi: without AVX-512, gcc warns that bilinear.c's
64-byte vectors would be passed by another ABI, which matters only for calls between objects; its
functions are static inline."""
LINK = ("-shared", "-fopenmp", "-lm")
WARNINGS = ("-Wall", "-Wextra", "-Werror")
"""What ``make lint`` adds to each file's flags (``python -m sharding.kernels.native --check``)."""

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # name: (argument types, return type)
    "row_adam": ([_P, _P, _P, _P, _P, _I, _I, _I, _F, _F, _F, _F, _F, _F], ctypes.c_int),
    "row_adagrad": ([_P, _P, _P, _P, _I, _I, _I, _I, _F, _F], ctypes.c_int),
    "row_sum_exp": ([_P, _P, _P, _I, _I], None),
    "softmax_scale": ([_P, _P, _P, _P, _I, _I], None),
    "bernoulli_forward": ([_P, _I, _I, _P, _P, _I, _I, _P, _P, *[_I] * 5, _F, _P, _P], ctypes.c_int),
    "bernoulli_backward": (
        [_P, _I, _I, _P, _P, _I, _I, _P, *[_P] * 3, *[_I] * 5, _F, _F, *[_P] * 4, _I, _P, _P],
        ctypes.c_int,
    ),
    "normal_range": ([_P, ctypes.c_uint64, _I, _I], None),
    "normal_rows": ([_P, ctypes.c_uint64, _P, _I, _I], None),
    "sample_kl_forward": ([_P, _P, _I, _P, _P, _P, _I, _I, ctypes.c_uint64, _I], ctypes.c_int),
    "sample_kl_backward": ([_P, _P, _P, _P, _P, _I, _I], None),
    "sample_kl_update": ([_P, _I, _P, _I, _I, _I, _P, _P, _I, _P, _P], ctypes.c_int64),
    "hash_strings": ([_P, _P, _I, ctypes.c_uint64, _P], None),
    "merge_rows": ([_P, _I, _I, _P, _P], ctypes.c_int64),
    "unique_ids": ([_P, _I, _P, _P], ctypes.c_int64),
    "occurrence_weights": ([_P, _I, _P, _I, _P, _I, _P], ctypes.c_int),
    "shm_barrier": ([_P, _I, _I, _I, ctypes.c_double], ctypes.c_int),
    "nt_scan": ([_P, _I, ctypes.c_uint8, *[_P] * 11], ctypes.c_int),
    "probe_hashes": ([_P, _P, _P, _I, _P, _I, _P], ctypes.c_int64),
    "distinct_strings": ([_P, _P, _P, _I, _P, _I, _P], ctypes.c_int64),
}
MERGE_MAX_RUNS = 64
"""As rows.c: ``merge_rows`` scans every run's head per row, so more runs go to torch's sort."""


def cache_dir() -> Path:
    return Path(os.environ.get("NVKG_NATIVE_CACHE", "~/.cache/nvkg/native")).expanduser()


def private_cache() -> Path:
    """The cache directory, owned by this user and made private (0700). Refused (ValueError) when another
    user owns it, or when a directory above it (up to the home directory or a sticky one like /tmp) is
    writable by everyone: a library planted there would run in this process."""
    directory = cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise ValueError(f"{directory}: kernel cache directory is owned by another user")
    if info.st_mode & 0o077:  # ours, but made under a permissive umask: make it private
        directory.chmod(0o700)
    home = Path(os.environ.get("HOME", "/nonexistent"))
    for path in directory.parents:
        info = path.stat()
        if info.st_mode & stat.S_ISVTX:
            break  # in a sticky directory (/tmp) only its owner can replace the one below
        if info.st_mode & 0o002:
            raise ValueError(f"{path}: a directory above the kernel cache is writable by everyone")
        if path == home:
            break
    return directory


def _digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cpu_identity() -> str:
    """The CPU's model and instruction-set flags (Linux), else what the platform module says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")  # x86 and ARM spellings
    return " ".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def build(compiler: str, target: Path) -> None:
    """Compile the sources into ``target`` through temporary names, so a reader never sees half a library;
    its sha256 goes beside it (``TARGET.sha256``) and is checked before every load."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    objects = [target.with_name(f"{source.stem}.{os.getpid()}.o") for source in SOURCES]
    try:
        for (source, flags), obj in zip(SOURCES.items(), objects, strict=True):
            run([compiler, *flags, "-c", str(source), "-o", str(obj)])
        run([compiler, *map(str, objects), *LINK, "-o", str(partial)])
        digest = target.with_name(f"{target.name}.sha256")
        partial_digest = digest.with_name(f"{digest.name}.{os.getpid()}.tmp")
        partial_digest.write_text(_digest_file(partial) + "\n")
        os.replace(partial_digest, digest)
        os.replace(partial, target)
    finally:
        for path in (partial, *objects):
            path.unlink(missing_ok=True)


def run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (and a warning, once) when they cannot be built here."""
    if os.environ.get("NVKG_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        warnings.warn("nvkg: no C compiler (cc) found; torch ops are used instead of the kernels", stacklevel=2)
        return None
    # Built for this CPU (-march=native): a cache shared by other machines keeps one build per CPU.
    digest = hashlib.sha256(" ".join((compiler, *LINK, cpu_identity())).encode())
    for source, flags in SOURCES.items():
        digest.update(source.read_bytes() + " ".join(flags).encode())
    for header in HEADERS:
        digest.update(header.read_bytes())
    try:
        target = private_cache() / f"kernels-{digest.hexdigest()[:16]}.so"
        recorded = target.with_name(f"{target.name}.sha256")
        if not target.exists() or not recorded.is_file():
            build(compiler, target)
        if recorded.read_text().strip() != _digest_file(target):
            raise ValueError(f"{target}: does not match the sha256 recorded when it was built (replaced?)")
        lib = ctypes.CDLL(str(target))
        for name, (argtypes, restype) in _SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
    except subprocess.CalledProcessError as err:
        warnings.warn(f"nvkg: building {HERE}/*.c failed, torch ops are used instead:\n{err.stderr}", stacklevel=2)
        return None
    except (OSError, ValueError, AttributeError, RuntimeError) as err:  # RuntimeError: no home directory
        warnings.warn(f"nvkg: the compiled kernels cannot be used ({err}); torch ops are used instead", stacklevel=2)
        return None
    return lib


def loaded() -> ctypes.CDLL:
    """The kernels, for callers that checked ``library()`` first."""
    lib = library()
    if lib is None:
        raise RuntimeError("nvkg: the compiled kernels are not available")
    return lib


def check_sources(compiler: str | None = None) -> None:
    """Compile every source with its flags plus ``WARNINGS`` (no output kept); raise on any warning."""
    compiler = compiler or os.environ.get("CC", "cc")
    for source, flags in SOURCES.items():
        run([compiler, *flags, *WARNINGS, "-c", str(source), "-o", os.devnull])


def applicable(ids: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors as they are: contiguous float32 (int64 ids) on the CPU."""
    return ids.device.type == "cpu" and ids.dtype == torch.int64 and ids.is_contiguous() and floats_applicable(*tensors)


def floats_applicable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def check(status: int, name: str, rows: int) -> None:
    if status:
        raise IndexError(f"{name}: a row id is outside the table's {rows} rows")


def normal_into(out: torch.Tensor, seed: int, first: int) -> bool:
    """Fill ``out`` with values [first, first + out.numel()) of the noise stream ``seed`` (see noise.c);
    False, leaving ``out`` alone, where the kernel cannot take it (then the caller draws with torch)."""
    lib = library()
    if lib is None or not floats_applicable(out):
        return False
    if first < 0:  # the kernel's chunk arithmetic assumes a position in the stream
        raise ValueError(f"normal_into: first value {first} of a noise stream is negative")
    lib.normal_range(out.data_ptr(), seed, first, out.numel())
    return True


def normal_rows_into(out: torch.Tensor, seed: int, rows: torch.Tensor) -> bool:
    """Fill ``out`` [n, dim] with rows ``rows`` of the stream ``seed`` seen as [.., dim]; False where the
    kernel cannot take it."""
    lib = library()
    if lib is None or not floats_applicable(out) or rows.device.type != "cpu":
        return False
    rows = rows.to(torch.int64).contiguous()
    if out.dim() != 2 or len(out) != len(rows):
        raise ValueError(f"normal_rows_into: out {list(out.shape)} is not one row of each of {len(rows)} rows")
    if len(rows) and int(rows.min()) < 0:
        raise ValueError("normal_rows_into: a row of the noise stream is negative")
    lib.normal_rows(out.data_ptr(), seed, rows.data_ptr(), len(rows), out.shape[1])
    return True


def merge_rows(runs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ascending distinct ids of ``runs`` [(strictly ascending ids [n], their gradient rows [n, width])]
    and the sum of each id's rows, added in run order (see rows.c); None where the kernel cannot take them
    (then the caller sums with torch)."""
    lib = library()
    if lib is None or not runs or len(runs) > MERGE_MAX_RUNS or not all(applicable(i, g) for i, g in runs):
        return None
    width = runs[0][1].shape[1]
    if any(g.dim() != 2 or g.shape != (len(i), width) for i, g in runs):
        return None
    table = torch.tensor([[i.data_ptr(), g.data_ptr(), len(i)] for i, g in runs], dtype=torch.int64)
    total = sum(len(i) for i, _ in runs)
    out_ids, out_grad = torch.empty(total, dtype=torch.int64), runs[0][1].new_empty(total, width)
    distinct = lib.merge_rows(table.data_ptr(), len(runs), width, out_ids.data_ptr(), out_grad.data_ptr())
    return None if distinct < 0 else (out_ids[:distinct], out_grad[:distinct])


ROW_UPDATES = {"adagrad": 0, "adam": 1}
"""The row optimisers ``sample_kl_update`` applies (noise.c's UPDATE_*)."""


def sample_kl_update(
    table: torch.Tensor,
    runs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    kind: str,
    state: tuple[torch.Tensor, ...],
    hyper: tuple[float, ...],
    parts: int = 1,
) -> torch.Tensor | None:
    """The row update ``kind`` (row-wise Adagrad: ``state`` its accumulators [rows, parts], ``hyper`` (lr, eps);
    Adam: ``state`` its moments [rows, width] twice, ``hyper`` as ``row_adam`` takes them) of rows of
    ``table`` [rows, 2 * dim] with the gradient ``runs`` [(local ids [n], their noise [n, dim], their
    [sample | KL]'s gradient [n, dim + 1])] give them through ``sample_kl_forward`` (see noise.c): one run's
    ids distinct, several runs' each strictly ascending. The distinct ids updated, or None, with nothing
    written, where the kernel cannot take them; an id outside the table raises ``IndexError``."""
    lib = library()
    if lib is None or not runs or table.dim() != 2 or table.shape[1] % 2:
        return None
    dim, rows = table.shape[1] // 2, len(table)
    shapes = [(rows, parts)] if kind == "adagrad" else [(rows, 2 * dim)] * 2
    fits = [tuple(s.shape) for s in state] == shapes and all(
        applicable(ids, table, *state, noise, grad) and noise.shape == (len(ids), dim)
        and grad.shape == (len(ids), dim + 1)
        for ids, noise, grad in runs
    )  # fmt: skip
    if not fits:
        return None
    addresses = torch.tensor(
        [[ids.data_ptr(), noise.data_ptr(), grad.data_ptr(), len(ids)] for ids, noise, grad in runs], dtype=torch.int64
    )
    hyper_values = torch.tensor(hyper, dtype=torch.float32)
    out_ids = torch.empty(sum(len(ids) for ids, _, _ in runs), dtype=torch.int64)
    state_ptrs = [x.data_ptr() for x in state] + [0] * (2 - len(state))
    status = lib.sample_kl_update(
        table.data_ptr(), rows, addresses.data_ptr(), len(runs), dim, ROW_UPDATES[kind], *state_ptrs, parts,
        hyper_values.data_ptr(), out_ids.data_ptr(),
    )  # fmt: skip
    if status == -3:
        raise IndexError(f"sample_kl_update: a row id is outside the table's {rows} rows")
    if status < 0:
        return None
    # Counted as torch counts an in-place op: a graph that saved the table refuses a backward now.
    torch.autograd.graph.increment_version(table)
    return out_ids[:status]


def unique_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``torch.unique(ids, return_inverse=True)`` of a 1-d int64 CPU tensor of ids ≥ 0 (see rows.c); None where
    the kernel cannot take them (then the caller uses torch)."""
    lib = library()
    if lib is None or ids.dim() != 1 or not applicable(ids):
        return None
    out, inverse = torch.empty_like(ids), torch.empty_like(ids)
    distinct = lib.unique_ids(ids.data_ptr(), len(ids), out.data_ptr(), inverse.data_ptr())
    return None if distinct < 0 else (out[:distinct], inverse)


def occurrence_weights(
    inverse: torch.Tensor, counted: int, ids: torch.Tensor, divisor: torch.Tensor
) -> torch.Tensor | None:
    """rows.c's ``occurrence_weights``: [len(ids)] float32, the count of each id's position among the first
    ``counted`` of ``inverse`` over ``divisor[ids]`` (float64 integers); None where the kernel cannot take them."""
    lib = library()
    if lib is None or not (applicable(inverse) and applicable(ids)) or divisor.dim() != 1:
        return None
    if divisor.device.type != "cpu" or divisor.dtype != torch.float64 or not divisor.is_contiguous():
        return None
    if not 0 <= counted <= len(inverse):
        raise ValueError(f"occurrence_weights: {counted} counted positions of {len(inverse)}")
    weights = torch.empty(len(ids), dtype=torch.float32)
    status = lib.occurrence_weights(
        inverse.data_ptr(), counted, ids.data_ptr(), len(ids), divisor.data_ptr(), len(divisor), weights.data_ptr()
    )
    if status == 1:
        raise IndexError("occurrence_weights: a position or an id is outside its range")
    return weights if status == 0 else None


def row_sum_exp(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """sum_c exp(logits[..., c] - shift[...]) over the last dimension."""
    lib = library()
    if lib is None or logits.dim() == 0 or shift.shape != logits.shape[:-1] or not floats_applicable(logits, shift):
        return torch.exp(logits - shift.unsqueeze(-1)).sum(-1)
    out = shift.new_empty(shift.shape)
    lib.row_sum_exp(logits.data_ptr(), shift.data_ptr(), out.data_ptr(), shift.numel(), logits.shape[-1])
    return out


def softmax_scale(logits: torch.Tensor, log_z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """exp(logits - log_z[..., None]) * scale[..., None]: the softmax of each row times its gradient."""
    lib = library()
    rows = logits.shape[:-1]
    fits = log_z.shape == rows and scale.shape == rows and floats_applicable(logits, log_z, scale)
    if lib is None or logits.dim() == 0 or not fits:
        return torch.exp(logits - log_z.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
    out = torch.empty_like(logits)
    lib.softmax_scale(*(x.data_ptr() for x in (logits, log_z, scale, out)), log_z.numel(), logits.shape[-1])
    return out


@dataclass(frozen=True)
class BernoulliRows:
    """Where a batch's rows are for the Bernoulli kernel (bilinear.c): the entity rows ``entities`` [U, D],
    with s, o and each chunk's negatives at ``index`` [2B + C*K] in that order, and the relation rows
    ``relations`` [R, D] at ``relation_ids`` [B]; ``bias`` [B] or None. B facts in chunks of ``chunk``
    sharing ``num_neg`` negatives (C = ceil(B / chunk)), ``complex_valued`` for ComplEx."""

    entities: torch.Tensor
    index: torch.Tensor
    relations: torch.Tensor
    relation_ids: torch.Tensor
    bias: torch.Tensor | None
    chunk: int
    num_neg: int
    complex_valued: bool

    @property
    def num_pos(self) -> int:
        return len(self.relation_ids)

    @property
    def dim(self) -> int:
        return self.relations.shape[-1]

    def fits(self) -> bool:
        """Whether the kernel can take them: the kernels built; entity and relation rows of one width D (even
        for ComplEx) in float32 on the CPU, each row's elements adjacent; contiguous int64 positions of the
        right lengths; a contiguous float32 bias."""
        num_pos, chunk, num_neg, dim = self.num_pos, self.chunk, self.num_neg, self.dim
        if chunk < 1 or num_pos < 1 or num_neg < 1 or library() is None or self.relations.dim() != 2:
            return False
        bias, positions = self.bias, 2 * num_pos + -(-num_pos // chunk) * num_neg
        return (
            _rows_fit(self.entities, dim) and _rows_fit(self.relations, dim)
            and not (self.complex_valued and dim % 2) and applicable(self.index)
            and self.index.shape == (positions,) and applicable(self.relation_ids)
            and self.relation_ids.dim() == 1
            and (bias is None or (floats_applicable(bias) and bias.shape == (num_pos,)))
        )  # fmt: skip

    def describe(self) -> str:
        return (
            f"entities {tuple(self.entities.shape)}, index {tuple(self.index.shape)}, relations "
            f"{tuple(self.relations.shape)} for {self.num_pos} facts, chunks of {self.chunk}, k={self.num_neg}"
        )

    def _pointers(self) -> tuple:
        """The arguments both kernels start with: the entity rows, their count, stride and positions; the
        relation rows, theirs."""
        entities, relations = self.entities, self.relations
        return (
            entities.data_ptr(), len(entities), entities.stride(0), self.index.data_ptr(), relations.data_ptr(),
            len(relations), relations.stride(0), self.relation_ids.data_ptr(),
        )  # fmt: skip


def _rows_fit(rows: torch.Tensor, dim: int) -> bool:
    """float32 CPU rows [n, dim] whose elements are adjacent (rows may be a column range of a wider table)."""
    return (
        rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.dim() == 2 and rows.shape[1] == dim
        and (rows.stride(1) == 1 or dim == 1) and rows.stride(0) >= dim
    )  # fmt: skip


def bernoulli_forward(rows: BernoulliRows, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Bernoulli NLL of chunked facts under DistMult or ComplEx (see bilinear.c), for rows that ``fits``:
    (each chunk's NLL [C] in float64, the derivatives of its terms in their scores [B, 1 + K] that its
    backward needs)."""
    chunk_nll, probs = _forward_outputs(rows, "bernoulli_forward")
    num_pos, num_neg, bias = rows.num_pos, rows.num_neg, rows.bias
    status = loaded().bernoulli_forward(
        *rows._pointers(), None if bias is None else bias.data_ptr(), num_pos, rows.chunk, num_neg, rows.dim,
        int(rows.complex_valued), weight, probs.data_ptr(), chunk_nll.data_ptr(),
    )  # fmt: skip
    _bernoulli_status(status, "bernoulli_forward")
    return chunk_nll, probs


def bernoulli_backward(
    rows: BernoulliRows, probs: torch.Tensor, weight: float, grad: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradients of the entity rows [U, D], of the relation rows [R, D] and of the bias (or None) from
    ``bernoulli_forward``'s ``probs`` and the gradient ``grad`` of the summed NLL: each position's gradient
    summed into its row. With ``out`` [U, >= D] (float32 rows whose elements are adjacent), the entity rows'
    gradient is written into its first D columns (the rest left as they are) and ``out`` returned."""
    return _backward(rows, probs, weight, grad, out, None)


def bernoulli_forward_backward(
    rows: BernoulliRows, weight: float, out: torch.Tensor | None = None, check: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``bernoulli_forward`` and then ``bernoulli_backward`` with ``grad`` 1 in one call, each chunk's backward
    right after its forward (its rows still in the caches): (each chunk's NLL [C] in float64, the gradients as
    ``bernoulli_backward`` returns them). The same numbers as the two calls, bit for bit. ``check``, a float32
    element on the CPU, receives 0 when every gradient written (entity and relation rows) is finite, else NaN."""
    if check is not None and not (floats_applicable(check) and check.numel() == 1):
        raise ValueError(f"bernoulli_forward_backward: check must be one float32 element, not {tuple(check.shape)}")
    chunk_nll, probs = _forward_outputs(rows, "bernoulli_forward_backward")
    return chunk_nll, *_backward(rows, probs, weight, 1.0, out, chunk_nll, check)


def _forward_outputs(rows: BernoulliRows, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the forward writes, once ``rows`` are checked: each chunk's NLL [C] (float64) and ``probs``
    [B, 1 + K]."""
    if not rows.fits():
        raise ValueError(f"{name}: the kernel cannot take {rows.describe()}")
    chunk_nll = torch.empty(-(-rows.num_pos // rows.chunk), dtype=torch.float64)
    return chunk_nll, rows.entities.new_empty(rows.num_pos, 1 + rows.num_neg)


def _backward(
    rows: BernoulliRows,
    probs: torch.Tensor,
    weight: float,
    grad: float,
    out: torch.Tensor | None,
    chunk_nll: torch.Tensor | None,
    check: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernel's backward, after its forward when ``chunk_nll`` is given (it then writes it and ``probs``)."""
    dim, num_pos, entities = rows.dim, rows.num_pos, rows.entities
    if out is not None and not (out.dim() == 2 and len(out) == len(entities) and _rows_fit(out[:, :dim], dim)):
        raise ValueError(f"bernoulli_backward: out {tuple(out.shape)} cannot take {len(entities)} rows of {dim}")
    g_entities = entities.new_empty(len(entities), dim) if out is None else out
    g_relations = entities.new_empty(len(rows.relations), dim)
    work, r_work = entities.new_empty(len(rows.index), dim), entities.new_empty(num_pos, dim)
    gbias = entities.new_empty(num_pos) if rows.bias is not None else None
    bias = rows.bias.data_ptr() if rows.bias is not None and chunk_nll is not None else None
    status = loaded().bernoulli_backward(
        *rows._pointers(), bias, None if chunk_nll is None else chunk_nll.data_ptr(), probs.data_ptr(), num_pos,
        rows.chunk, rows.num_neg, dim, int(rows.complex_valued), weight, grad, work.data_ptr(), r_work.data_ptr(),
        None if gbias is None else gbias.data_ptr(), g_entities.data_ptr(), g_entities.stride(0),
        g_relations.data_ptr(), None if check is None else check.data_ptr(),
    )  # fmt: skip
    _bernoulli_status(status, "bernoulli_backward")
    return g_entities, g_relations, gbias


def _bernoulli_status(status: int, name: str) -> None:
    if status == 1:
        raise IndexError(f"{name}: a position is outside its table")
    if status:
        raise MemoryError(f"{name}: no memory for a work buffer")


def hash_strings(strings: pa.Array, seed: int = 0) -> np.ndarray | None:
    """A uint64 hash of each string of an Arrow string array (see strings.c), or None where the kernels
    cannot be built."""
    lib = library()
    if lib is None:
        return None
    if strings.null_count:
        raise ValueError("hash_strings: the array holds nulls")
    strings = _as_string(strings)
    out = np.empty(len(strings), np.uint64)
    if len(strings):
        lib.hash_strings(*_string_pointers(strings), len(strings), seed, out.ctypes.data)
    return out


def _as_string(strings: pa.Array) -> pa.Array:
    return strings if strings.type == pa.string() else strings.cast(pa.string())


def _string_pointers(strings: pa.Array) -> tuple[int, int]:
    """Addresses of a string array's first offset (its slice's) and of its character data (0: none)."""
    _, offsets, values = strings.buffers()
    return offsets.address + 4 * strings.offset, values.address if values is not None else 0


def distinct_strings(strings: pa.Array) -> pa.Array | None:
    """The distinct strings of an Arrow string array, in the order they first occur (as pyarrow's
    ``unique``), or None where the kernels cannot be built."""
    hashes = hash_strings(strings)
    if hashes is None:
        return None
    strings = _as_string(strings)
    if len(strings) == 0:
        return strings
    bits = max(4, (2 * len(strings) - 1).bit_length())
    table, out = np.empty(1 << bits, np.int32), np.empty(len(strings), np.int32)
    count = loaded().distinct_strings(
        *_string_pointers(strings), hashes.ctypes.data, len(strings), table.ctypes.data, bits, out.ctypes.data
    )
    return strings.take(pa.array(out[:count]))


def probe_hashes(
    hashes: np.ndarray, starts: np.ndarray, positions: np.ndarray, shift: int, wanted: np.ndarray
) -> tuple[np.ndarray, int]:
    """(the position of each of ``wanted`` among bucketed sorted ``hashes``, -1 where absent; how many are
    absent): the converter's name lookup (``storage.convert.NameIndex``), for callers that checked
    ``library()`` first."""
    arrays = ((hashes, np.uint64), (starts, np.int64), (positions, np.int32), (wanted, np.uint64))
    hashes, starts, positions, wanted = (np.ascontiguousarray(a, dtype) for a, dtype in arrays)
    out = np.empty(len(wanted), np.int32)
    missing = loaded().probe_hashes(
        hashes.ctypes.data, starts.ctypes.data, positions.ctypes.data, shift, wanted.ctypes.data, len(wanted),
        out.ctypes.data,
    )  # fmt: skip
    return out, int(missing)


NT_LITERAL_LINE = 2
"""``nt_scan``'s reason for a line whose object is a literal (its lines follow the IRI-object lines)."""


@dataclass
class NTriplesScan:
    """What ``ntriples.c`` made of a block: the triples' terms without brackets, the literal objects (each
    line's [start, end) in ``literal_lines``) and the lines left to the grammar, [start, end, reason]."""

    heads: pa.Array
    relations: pa.Array
    tails: pa.Array
    literals: pa.Array
    literal_lines: np.ndarray
    other: np.ndarray


def scan_ntriples(block: bytes, delimiter: str) -> NTriplesScan | None:
    """The fast path of a block of whole N-Triples lines (see ntriples.c), or None where the kernels cannot
    be built or the block is past the 2 GiB its 32-bit offsets reach; UnicodeError when the block is not
    valid UTF-8."""
    lib = library()
    if lib is None or len(block) >= 1 << 31:
        return None
    n, cap = len(block), block.count(b"\n") + 1
    columns = [(np.empty(cap + 1, np.int32), np.empty(n, np.uint8)) for _ in range(4)]
    literal_lines, other, counts = np.empty((cap, 2), np.int64), np.empty((cap, 3), np.int64), np.zeros(3, np.int64)
    status = lib.nt_scan(
        block, n, ord(delimiter), *(a.ctypes.data for column in columns for a in column),
        literal_lines.ctypes.data, other.ctypes.data, counts.ctypes.data,
    )  # fmt: skip
    if status:
        raise UnicodeError("the block is not valid UTF-8")
    triples, literals, others = (int(c) for c in counts)
    strings = [
        pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(values))
        for (offsets, values), rows in zip(columns, (triples, triples, triples, literals), strict=True)
    ]
    heads, relations, tails, literal_terms = strings
    return NTriplesScan(heads, relations, tails, literal_terms, literal_lines[:literals], other[:others])


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--check"]:
        sys.exit("usage: python -m sharding.kernels.native --check")
    try:
        check_sources()
    except subprocess.CalledProcessError as err:
        sys.exit(f"kernel sources do not compile cleanly with {' '.join(WARNINGS)}:\n{err.stderr}")
    print(f"kernels: {', '.join(s.name for s in SOURCES)} compile cleanly with {' '.join(WARNINGS)}")
