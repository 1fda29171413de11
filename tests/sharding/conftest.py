"""Helpers that launch real worker processes: torchrun over gloo on CPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    # Two ranks share two cores: one thread each.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_trainer(
    *args: str, workers: int = 1, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m trainer ARGS`` in one process, or under torchrun with ``workers`` ranks (``env`` added to
    the environment)."""
    if workers == 1:
        command = [sys.executable, "-m", "trainer", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(workers),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "trainer", *args,
        ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**worker_env(), **(env or {})}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
