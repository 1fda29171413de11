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
