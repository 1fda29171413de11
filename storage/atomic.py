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

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from storage.faults import fault_point


def _umask() -> int:
    """The process's umask, read without setting it where Linux allows (``os.umask`` sets it, a race with
    any thread creating a file meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A new temporary file beside ``path`` for the block to write (by name, e.g. for a library's own
    writer), flushed to disk and renamed over ``path`` when the block ends; removed if it fails. Its name is
    unique (``mkstemp``), so two writers of one ``path`` never write into the same temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        # mkstemp makes the file 0600, and the rename keeps that: give it a new file's usual mode. Best
        # effort: a filesystem without Unix modes (vfat, some FUSE mounts) refuses, and the write goes on.
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic(path: Path, write: Any, mode: str) -> None:
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        write(handle)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda h: h.write(text), "w")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic(path, lambda h: torch.save(obj, h), "wb")


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on ``directory`` (the parent of what is swapped): one swap or recovery at a time
    among processes, released by the kernel when a holder dies."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def swap_dir(new: Path, target: Path) -> None:
    """Replace ``target`` by the complete directory ``new`` (see the module's docstring)."""
    target = Path(target)
    with _locked(target.parent):
        _recover(target)
        staged, old = _sibling(target, "new"), _sibling(target, "old")
        os.replace(new, staged)
        fault_point("swap.staged")
        if target.exists():
            os.replace(target, old)
        fault_point("swap.moved_old")
        os.replace(staged, target)
        fault_point("swap.installed")
        _discard(old)


def recover_swap(target: Path) -> None:
    """Finish a ``swap_dir`` of ``target`` that was killed part-way; nothing to do after a complete one."""
    target = Path(target).expanduser()
    if not target.parent.is_dir() or not any(_sibling(target, k).exists() for k in ("new", "old")):
        return
    with _locked(target.parent):
        _recover(target)


def _recover(target: Path) -> None:
    staged, old = _sibling(target, "new"), _sibling(target, "old")
    if staged.exists():
        if target.exists() and not old.exists():
            os.replace(target, old)
        elif target.exists():  # a previous .old was left: this target is older than .new
            _discard(target)
        os.replace(staged, target)
    if old.exists():
        if target.exists():
            _discard(old)
        else:
            os.replace(old, target)


def _discard(path: Path) -> None:
    """Delete a directory; first move it to a unique name, so that its name is free at once even when the
    delete fails part-way (NFS keeps .nfsXXXX files of readers that still have files open)."""
    if not path.exists():
        return
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}-{time.time_ns()}")
    os.replace(path, trash)
    _remove(trash)


def _remove(path: Path) -> None:
    """Delete a directory tree, or a plain file or link (what ``--overwrite`` may replace), which rmtree
    refuses and would leave behind."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def temp_dir_beside(target: Path) -> Iterator[Path]:
    """A new temporary directory next to ``target`` (same filesystem, so it can be swapped into place),
    flock-ed while the block runs, so that ``remove_stale_temps`` can tell when its writer is gone."""
    prefix = f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-"
    path = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    # mkdtemp makes it 0700, and the swap keeps that: give it a new directory's usual mode, as files get.
    with contextlib.suppress(OSError):
        path.chmod(0o777 & ~_umask())
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temporary directories of ``target`` that no live writer holds (its flock went with it),
    and trash left by an interrupted delete."""
    removed = []
    for path in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.*.trash-*")]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer
        finally:
            os.close(fd)
        _remove(path)
        removed.append(path)
    return removed
