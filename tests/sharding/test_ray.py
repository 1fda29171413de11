"""Ray Train on a real local Ray instance: 2 workers, a killed worker, and a job submitted to `ray start --head`.

Ray keeps its auth token under $HOME/.ray: every test gets its own HOME. Every wait is bounded.
"""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from tests.sharding.conftest import ROOT, free_port, read_jsonl

pytestmark = pytest.mark.slow

SETTINGS = ["model.dim=16", "train.batch_size=512", "train.progress=false", "train.num_threads=1"]


def _env(home):
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    return env


def _args(out, epochs, extra=(), max_failures=0):
    args = ["--dataset", "kinships", "--out", str(out)]
    launch = ["launch.workers=2", "launch.cpus_per_worker=0.5", f"launch.max_failures={max_failures}"]
    for item in [*SETTINGS, *launch, f"train.epochs={epochs}", *extra]:
        args += ["--set", item]
    return args


def test_ray_train_runs_two_sharded_workers(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "ray-train", *_args(tmp_path / "run", 3)],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and set(metrics["test"]["filtered"]) >= {"mrr", "hits@10"}
    assert len(list((tmp_path / "run" / "checkpoint").glob("entities-*.pt"))) == 2
    assert list((tmp_path / "run" / "ray").rglob("index.json")), "no checkpoint reported to Ray Train"


def _train_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_killed_worker_restarts_from_the_latest_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "trainer", "ray-train", *_args(out, 25, ["train.checkpoint_every=1"], 1)]
    driver = subprocess.Popen(
        command, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ((out / "log.jsonl").exists() and len(read_jsonl(out / "log.jsonl")) >= 3):
            assert driver.poll() is None and time.monotonic() < deadline, "training did not reach epoch 3"
            time.sleep(0.2)
        workers = _train_workers()
        assert len(workers) == 2
        workers[1].kill()
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-4000:]
    assert "resumed from" in output and "at epoch" in output
    assert [r["epoch"] for r in read_jsonl(out / "log.jsonl")] == list(range(1, 26))
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2


def test_job_submitted_to_a_ray_head_on_localhost(tmp_path):
    env = _env(tmp_path)
    dashboard = free_port()
    head = [
        "ray", "start", "--head", "--num-cpus", "2", "--port", str(free_port()), "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--disable-usage-stats",
    ]  # fmt: skip
    # Token auth stays on: make this HOME's token, which the head and the job client both read.
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    subprocess.run(head, cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "trainer", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--wait",
             "--timeout", "240", *_args(tmp_path / "run", 2)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted job" in result.stdout and "grafana: http://127.0.0.1:3000/d/nvkg?var-job=run" in result.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2
