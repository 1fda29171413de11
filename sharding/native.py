"""The compiled row kernel of ``rows.c``: built on first use with the machine's C compiler into a cache
keyed by the source and flags, loaded with ctypes.

Where it cannot be had (no compiler, ``NVKG_NATIVE=0``, or tensors that are not contiguous float32 on
the CPU) RowAdam falls back to torch ops that compute the same update, so the kernel changes speed, not
results. A failed build is said once, with the compiler's message.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("rows.c")
FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC")
"""-fno-math-errno lets sqrtf vectorise (with errno it was a scalar call: 3x slower than torch's update)."""

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "row_adam": [_P, _P, _P, _P, _P, _I, _I, _I, _F, _F, _F, _F, _F, _F],
}


def cache_dir() -> Path:
    return Path(os.environ.get("NVKG_NATIVE_CACHE", "~/.cache/nvkg/native")).expanduser()


def build(compiler: str, target: Path) -> None:
    """Compile ``rows.c`` to ``target`` through a temporary name, so a reader never sees half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (and a warning, once) when they cannot be built here."""
    if os.environ.get("NVKG_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        warnings.warn("nvkg: no C compiler (cc) found; row updates use torch ops", stacklevel=2)
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"rows-{key}.so"
    try:
        if not target.exists():
            build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as err:
        warnings.warn(f"nvkg: building {SOURCE} failed, row updates use torch ops:\n{err.stderr}", stacklevel=2)
        return None
    except OSError as err:
        warnings.warn(f"nvkg: loading {target} failed ({err}), row updates use torch ops", stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return lib


def applicable(ids: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors as they are: contiguous float32 (int64 ids) on the CPU."""
    return (
        ids.device.type == "cpu"
        and ids.dtype == torch.int64
        and ids.is_contiguous()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    )


def check(status: int, name: str, rows: int) -> None:
    if status:
        raise IndexError(f"{name}: a row id is outside the table's {rows} rows")
