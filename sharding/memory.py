"""Tables whose rows a step reads at random, on 2 MiB pages where the operating system allows it.

A training step reads a few thousand rows scattered over the entity table and its optimiser state: tens of
MB on WN18RR, GBs on a Freebase shard. With 4 KiB pages nearly every row read is a miss of the address
translation cache (TLB) as well as of the data caches, and the page walk adds to each row's wait. Linux
backs a range with transparent huge pages when the process asks (``madvise(MADV_HUGEPAGE)``) and
/sys/kernel/mm/transparent_hugepage/enabled is ``madvise`` (the usual default) or ``always``; where it is
``never``, or on another system, the request is refused at no cost and the table is an ordinary one.
Measured on this project's 2-core machine (docs/benchmarks.md): the owner's sample pass over 3,800 rows,
0.63 -> 0.52 ms on a 41 MB table and 1.00 -> 0.70 ms on a 2 GB one.

The advice marks the range; pages already there stay as they are until the kernel's khugepaged merges
them. A table of 32 MiB or more is always fresh memory (glibc maps it on its own), so it faults in huge
pages as it is first written; a smaller one may reuse heap pages freed earlier and get huge pages later.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

HUGE_PAGE = 1 << 21
"""The x86-64 and arm64 (4 KiB base page) size of a transparent huge page."""


def empty(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """``torch.empty(shape)`` whose memory, on the CPU and when it spans at least two huge pages, is asked to
    be backed by huge pages before anything touches it (the first write then faults in 2 MiB at a time)."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if tensor.device.type == "cpu" and tensor.numel() * tensor.element_size() >= 2 * HUGE_PAGE:
        advise_huge_pages(tensor)
    return tensor


def zeros_like(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.zeros_like`` of a contiguous tensor, through ``empty``."""
    return empty(tuple(tensor.shape), tensor.dtype, tensor.device).zero_()


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask the kernel to back the whole huge pages inside ``tensor``'s memory with huge pages: whether the
    request was made and taken (False on systems without ``MADV_HUGEPAGE``; a kernel whose transparent huge
    pages are ``never`` takes it and ignores it)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not sys.platform.startswith("linux") or not tensor.is_contiguous():
        return False  # a view that is not contiguous does not own the span from its first to its last element
    start = tensor.data_ptr()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return False
    return _madvise(first, last - first, advice) == 0


def _madvise(address: int, length: int, advice: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    return libc.madvise(address, length, advice)
