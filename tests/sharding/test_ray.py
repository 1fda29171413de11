"""Ray Train on a real local Ray instance: 2 workers, a killed worker, and a job submitted to `ray start --head`.

Ray keeps its auth token under $HOME/.ray: every test gets its own HOME. Every wait is bounded.
"""

import io
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import psutil
import pytest

from tests.sharding.conftest import ROOT, free_port, read_jsonl
from trainer.checkpoint import INDEX
from trainer.ray_launch import POINTER, follow_pointer, write_pointer

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
    # Ray Train's storage holds pointers to the run directory's checkpoint, never a copy of it.
    pointers = list((tmp_path / "run" / "ray").rglob(POINTER))
    assert pointers, "no checkpoint reported to Ray Train"
    for pointer in pointers:
        assert json.loads(pointer.read_text())["checkpoint"] == str((tmp_path / "run" / "checkpoint").resolve())
    copies = [p.name for p in (tmp_path / "run" / "ray").rglob("*") if p.name.endswith(".pt") or p.name == INDEX]
    assert copies == [], f"checkpoint files copied into Ray's storage: {copies}"


def test_a_pointer_is_followed_in_place_and_a_dangling_one_is_refused(tmp_path):
    from ray.train import Checkpoint

    run_checkpoint = tmp_path / "run" / "checkpoint"
    run_checkpoint.mkdir(parents=True)
    (run_checkpoint / INDEX).write_text("{}")
    reported = tmp_path / "reported"
    reported.mkdir()
    write_pointer(reported, run_checkpoint, epoch=3)
    assert [p.name for p in reported.iterdir()] == [POINTER]
    assert follow_pointer(Checkpoint.from_directory(str(reported))) == run_checkpoint.resolve()
    (run_checkpoint / INDEX).unlink()
    with pytest.raises(ValueError, match="holds no checkpoint on this machine"):
        follow_pointer(Checkpoint.from_directory(str(reported)))


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
    # The restarted workers read the run directory's checkpoint where it is, not a copy of it.
    assert f"resumed from {(out / 'checkpoint').resolve()} at epoch" in output, output[-4000:]
    assert [r["epoch"] for r in read_jsonl(out / "log.jsonl")] == list(range(1, 26))
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2


def _start_head(env) -> int:
    """`ray start --head` on 127.0.0.1 with this HOME's auth token; returns the dashboard port.

    Ports are picked free and then bound by another process, so a start that lost such a race (seen once
    in a full suite run, right after the previous test's Ray had stopped) is retried on fresh ports.
    """
    # Token auth stays on: make this HOME's token, which the head and the job client both read.
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    errors = []
    for _ in range(3):
        dashboard = free_port()
        head = [
            "ray", "start", "--head", "--num-cpus", "2", "--port", str(free_port()), "--node-ip-address",
            "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--include-dashboard", "true", "--disable-usage-stats",
        ]  # fmt: skip
        result = subprocess.run(head, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            return dashboard
        errors.append(result.stdout[-1500:] + result.stderr[-1500:])
        print("ray start failed, retrying on other ports:\n" + errors[-1], file=sys.stderr)
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    raise RuntimeError("ray start --head failed 3 times:\n" + "\n---\n".join(errors))


def test_job_submitted_to_a_ray_head_on_localhost(tmp_path):
    env = _env(tmp_path)
    dashboard = _start_head(env)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "trainer", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--wait",
             "--timeout", "240", *_args(tmp_path / "run", 2)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted job" in result.stdout and "grafana: http://127.0.0.1:3000/d/nvkg?var-run=run" in result.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


def test_make_train_freebase_end_to_end(tmp_path):
    """A small file in Freebase86m's DGL-KE layout, served over HTTP: download, convert, submit, train."""
    from tests.storage.test_download import _Server

    rng = np.random.default_rng(0)
    num_entities, num_relations = 300, 7
    triples = np.stack([rng.integers(num_entities, size=3000), rng.integers(num_entities, size=3000),
                        rng.integers(num_relations, size=3000)], 1)  # fmt: skip
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("Freebase/entity2id.txt", f"{num_entities}\n" + "".join(f"/m/{i}\t{i}\n" for i in range(300)))
        archive.writestr("Freebase/relation2id.txt", f"{num_relations}\n" + "".join(f"/r/{i}\t{i}\n" for i in range(7)))
        for split, rows in (("train", triples[:2800]), ("valid", triples[2800:2900]), ("test", triples[2900:])):
            archive.writestr(f"Freebase/{split}.txt", "".join(f"{h}\t{t}\t{r}\n" for h, t, r in rows))
    server = _Server({"/Freebase.zip": buffer.getvalue()})
    env = _env(tmp_path)
    dashboard = _start_head(env)
    overrides = [*SETTINGS, "train.epochs=2", "launch.workers=2", "launch.cpus_per_worker=0.5",
                 "launch.memory_per_worker_gb=null", "launch.max_failures=0", "metrics.port=null",
                 "data.verify_checksums=true"]  # fmt: skip
    make_args = [
        f"FREEBASE_URL={server.url}/Freebase.zip", f"FREEBASE_DIR={tmp_path / 'fb'}",
        f"FREEBASE_DOWNLOADS={tmp_path / 'dl'}", "FREEBASE_DOWNLOAD_ARGS=--skip-count-check", "FREEBASE_CHECK=",
        f"FREEBASE_RUN={tmp_path / 'run'}", f"RAY_ADDRESS=http://127.0.0.1:{dashboard}",
        "FREEBASE_ARGS=--wait --timeout 240 " + " ".join(f"--set {o}" for o in overrides),
    ]  # fmt: skip
    try:
        result = subprocess.run(["make", "train-freebase", *make_args], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=400)  # fmt: skip
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        server.close()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted job" in result.stdout and "grafana: http://127.0.0.1:3000/d/nvkg?var-run=run" in result.stdout
    assert json.loads((tmp_path / "fb" / "manifest.json").read_text())["num_entities"] == 300
    assert (tmp_path / "dl" / "Freebase.zip").is_file()  # the archive stays under the test's directory
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2
