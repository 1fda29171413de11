"""Atomic output: a reader never sees a half-written file or directory, and a writer killed at any
instant leaves a state the next start recovers from.

Files are written under a temporary name and renamed. A directory is replaced by ``swap_dir``:

  1. the complete new directory is renamed to ``.NAME.new`` (from then on it is the version to keep);
  2. the current ``NAME``, if any, is renamed to ``.NAME.old``;
  3. ``.NAME.new`` is renamed to ``NAME``;
  4. ``.NAME.old`` is deleted.

``recover_swap`` finishes whatever a killed swap left (``.new`` present: steps 2-4; ``.old`` alone:
step 4, or back into place when ``NAME`` is missing), so it is called before a directory is read.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from storage.faults import fault_point


def _atomic(path: Path, write: Any, mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda h: h.write(text), "w")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic(path, lambda h: torch.save(obj, h), "wb")


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}"


def swap_dir(new: Path, target: Path) -> None:
    """Replace ``target`` by the complete directory ``new`` (see the module's docstring)."""
    target = Path(target)
    recover_swap(target)
    staged, old = _sibling(target, "new"), _sibling(target, "old")
    os.replace(new, staged)
    fault_point("swap.staged")
    if target.exists():
        os.replace(target, old)
    fault_point("swap.moved_old")
    os.replace(staged, target)
    fault_point("swap.installed")
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(target: Path) -> None:
    """Finish a ``swap_dir`` of ``target`` that was killed part-way; nothing to do after a complete one."""
    target = Path(target)
    staged, old = _sibling(target, "new"), _sibling(target, "old")
    if staged.exists():
        if target.exists() and not old.exists():
            os.replace(target, old)
        elif target.exists():  # killed while deleting a previous .old: this target is the older one
            shutil.rmtree(target)
        os.replace(staged, target)
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)


def temp_dir_beside(target: Path) -> Path:
    """A new temporary directory next to ``target`` (same filesystem, so it can be renamed into place),
    named after this host and process so that ``remove_stale_temps`` can tell when its writer is gone."""
    prefix = f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temporary directories of ``target`` whose writer, a process of this host, has died."""
    removed = []
    prefix = f".{target.name}.tmp-{socket.gethostname()}-"
    for path in Path(target).parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
