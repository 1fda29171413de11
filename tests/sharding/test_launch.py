"""Choosing a worker's device and backend (pure functions: every case without a GPU), and CPUs for workers
that share a host (in child processes: pinning is per process)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sharding.launch import resolve_backend, resolve_device
from tests.sharding.conftest import ROOT
from trainer.config import load_config

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("requested", "cuda_devices", "local_rank", "assigned", "expected"),
    [
        ("auto", 0, 0, None, CPU),  # no GPU: the CPU
        ("cpu", 4, 2, None, CPU),  # asked for the CPU on a GPU host: the CPU, whatever exists
        ("auto", 1, 3, None, torch.device("cuda", 0)),  # a worker shown only its GPU takes it
        ("auto", 4, 2, None, torch.device("cuda", 2)),  # torchrun shows all of a host's: LOCAL_RANK picks
        ("cuda", 4, 0, 3, torch.device("cuda", 3)),  # Ray's assignment over LOCAL_RANK
    ],
)
def test_device_is_a_function_of_the_request_what_exists_and_the_rank(
    requested, cuda_devices, local_rank, assigned, expected
):
    assert resolve_device(requested, cuda_devices, local_rank, assigned) == expected


def test_impossible_devices_are_refused_saying_why():
    with pytest.raises(ValueError, match=r"train\.device=cuda: this worker sees no CUDA device"):
        resolve_device("cuda", 0, 0)
    with pytest.raises(ValueError, match=r"CUDA device 2 \(LOCAL_RANK=2\): this worker sees 2"):
        resolve_device("auto", 2, 2)


def test_backend_follows_the_device_not_the_hardware():
    assert resolve_backend("auto", CPU) == "gloo"  # train.device=cpu on a GPU host: gloo, not NCCL
    assert resolve_backend("auto", torch.device("cuda", 1)) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"
    with pytest.raises(
        ValueError, match=r"sharding\.backend=nccl: NCCL moves CUDA tensors, and this worker trains on cpu"
    ):
        resolve_backend("nccl", CPU)


def test_a_fractional_or_idle_gpu_per_worker_is_refused():
    for value in ("0.5", "2"):
        with pytest.raises(ValueError, match=rf"launch\.gpus_per_worker={float(value)}: a worker trains on one GPU"):
            load_config(None, [f"launch.gpus_per_worker={value}"])
    with pytest.raises(ValueError, match=r"with train\.device=cpu: the GPU would sit idle"):
        load_config(None, ["launch.gpus_per_worker=1", "train.device=cpu"])
    assert load_config(None, ["launch.gpus_per_worker=1"]).sharding.timeout_minutes == 60.0


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
