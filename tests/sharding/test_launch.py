"""Choosing CPUs for workers that share a host (in child processes: pinning is per process)."""

import json
import os
import subprocess
import sys

import pytest

from tests.sharding.conftest import ROOT

_PROBE = """
import json, os, threading, time
from sharding.launch import pin_local_cpus
started = threading.Event()
threading.Thread(target=lambda: (started.set(), time.sleep(5)), daemon=True).start()  # a thread that exists first
started.wait()
mine = pin_local_cpus()
threads = {t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
print(json.dumps({"mine": mine, "threads": threads}))
"""


def _probe(local_rank: int, local_world: int) -> dict:
    env = {**os.environ, "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world)}
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_workers_on_one_host_get_disjoint_equal_cpu_slices_for_every_thread():
    cpus = sorted(os.sched_getaffinity(0))
    first, second = _probe(0, 2), _probe(1, 2)
    half = len(cpus) // 2
    assert first["mine"] == cpus[:half] and second["mine"] == cpus[half : 2 * half]
    for probe in (first, second):
        assert len(probe["threads"]) >= 2 and all(t == probe["mine"] for t in probe["threads"].values())


def test_a_lone_worker_or_more_workers_than_cpus_is_left_alone():
    assert _probe(0, 1)["mine"] is None
    assert _probe(0, len(os.sched_getaffinity(0)) + 1)["mine"] is None


PAGE_FAULTS = """
import resource, sys
import torch
from sharding.launch import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)  # 64 MB, above malloc's largest mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_block()
print(min(faults_of_a_fresh_block() for _ in range(3)))
"""


def test_reused_memory_spares_a_steps_large_blocks_their_page_faults():
    """In a fresh process each (16,384 pages): a 64 MB block freed and allocated again faults its pages
    in anew by default, and not once freed memory is kept."""
    faults = {}
    for mode in ("default", "reuse"):
        result = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS, mode], cwd=ROOT, capture_output=True, text=True, check=True
        )
        faults[mode] = int(result.stdout.strip())
    assert faults["default"] > 10_000, faults
    assert faults["reuse"] < 1_000, faults
