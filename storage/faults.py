"""Injected crashes for the fault suite (``make test-faults``): with ``NVKG_FAULT=POINT[@N]`` a process
kills itself with SIGKILL the N-th time (default: the first) it reaches ``fault_point(POINT)``; with
``NVKG_FAULT_RANK=R`` only the worker whose ``RANK`` is R does. Several points: comma-separated.
Without the variable a fault point does nothing. The points are named where they are placed
(``grep -rn fault_point``)."""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("NVKG_FAULT")
    if not spec:
        return
    rank = os.environ.get("NVKG_FAULT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    for item in spec.split(","):
        point, _, nth = item.strip().partition("@")
        if point != name:
            continue
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
