"""Running ``train`` under Ray Train, and submitting such a run to a Ray cluster as a job.

Ray Train starts one worker process per rank and creates the torch.distributed group itself (gloo on
CPU, NCCL with GPUs), then each worker calls ``train`` exactly as torchrun's workers do. Checkpoints are
written to the run directory (storage every worker reaches: a local path on one machine, a shared
mount on a cluster), each rank its own row range. Ray Train is told of each one by a pointer: a
directory holding only ``pointer.json`` (epoch and the checkpoint's path), never the table itself:
configs/freebase.yaml's is about 140 GB (86M rows of 200 means and 200 log-variances in float32), which
Ray would otherwise copy into its storage on every report and into every restored worker. A restarted
worker group, after a failure and up to ``max_failures`` times, follows the latest pointer, and each
worker maps only the shards of its own rows from the run directory in place.
"""

from __future__ import annotations

import json
import shlex
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sharding.launch import choose_device, process_group, resolve_backend
from trainer import checkpoint
from trainer.config import LaunchConfig, RunConfig, config_from_dict, to_dict

if TYPE_CHECKING:
    from ray.train import Checkpoint


POINTER = "pointer.json"


class RayReporter(checkpoint.Reporter):
    """Checkpoints in the run directory; Ray Train is given a pointer to each, and follows it on restart."""

    def latest(self) -> Path | None:
        import ray.train

        restored = ray.train.get_checkpoint()
        return super().latest() if restored is None else follow_pointer(restored)

    def save(self, name: str, model, state, config, metrics: dict | None = None) -> None:
        import ray.train

        super().save(name, model, state, config, metrics)
        if name != checkpoint.LATEST:
            return
        report = {"epoch": state.epoch, "best_valid_mrr": state.best_mrr, **(metrics or {})}
        # Every rank must call report (it is a barrier); the pointer names the shared directory, so only
        # rank 0 attaches one.
        if self.exchange.rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        # Ray copies what is reported into its storage (the default upload): a pointer of a few bytes.
        # CheckpointUploadMode.NO_UPLOAD would avoid even that, but only for directories inside Ray's own
        # experiment directory, which the run directory's checkpoint/ is not.
        with tempfile.TemporaryDirectory(prefix="nvkg-pointer-") as tmp:
            write_pointer(Path(tmp), self.path(name), state.epoch)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def write_pointer(directory: Path, target: Path, epoch: int) -> None:
    pointer = {"checkpoint": str(Path(target).resolve()), "epoch": epoch}
    (directory / POINTER).write_text(json.dumps(pointer) + "\n")


def follow_pointer(reported: Checkpoint) -> Path:
    """The run directory's checkpoint a reported pointer names, read where it is (nothing is copied).

    The run directory holds the newest complete checkpoint, which may be newer than the pointer's epoch
    (a save that finished after the last report): resuming from it loses less."""
    location = f"{reported.path.rstrip('/')}/{POINTER}"
    assert reported.filesystem is not None  # a Checkpoint resolves its filesystem when it is made
    try:
        with reported.filesystem.open_input_stream(location) as handle:
            pointer = json.loads(handle.read().decode())
        target = Path(pointer["checkpoint"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{location}: not an nvkg checkpoint pointer ({err!r})") from None
    if not (target / checkpoint.INDEX).is_file():
        raise ValueError(
            f"{location}: points to {target}, which holds no checkpoint on this machine; "
            "the run directory must be on storage every worker reaches"
        )
    return target


def worker_loop(payload: dict) -> None:
    """The function every Ray Train worker runs."""
    from trainer.loop import train

    config = config_from_dict(payload["config"])
    out_dir = Path(payload["out_dir"])
    device = worker_device(config)
    with process_group(
        config.sharding.backend, device, config.sharding.timeout_minutes, config.sharding.shared_memory
    ) as exchange:
        train(config, out_dir, exchange=exchange, reporter=RayReporter(out_dir, exchange), device=device)


def worker_device(config: RunConfig) -> torch.device:
    """This Ray Train worker's device: the GPU Ray assigned it (``ray.train.torch.get_device``, which maps
    Ray's GPU ids into what CUDA_VISIBLE_DEVICES shows: a worker may see its neighbours' GPUs too), else
    the CPU."""
    if not config.launch.gpus_per_worker:
        return choose_device("cpu" if config.train.device == "auto" else config.train.device)
    from ray.train.torch import get_device

    assigned = get_device()
    return choose_device(config.train.device, assigned=assigned.index if assigned.type == "cuda" else None)


def worker_resources(launch: LaunchConfig) -> dict[str, float]:
    resources = {"CPU": launch.cpus_per_worker}
    if launch.gpus_per_worker:
        resources["GPU"] = launch.gpus_per_worker
    if launch.memory_per_worker_gb:
        resources["memory"] = launch.memory_per_worker_gb * 2**30
    return resources


def fit(config: RunConfig, out_dir: Path, *, storage_path: Path | None = None, name: str | None = None):
    """Run ``train`` on ``config.launch.workers`` Ray Train workers (Ray must be initialised or reachable)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    launch = config.launch
    out_dir = Path(out_dir).resolve()
    use_gpu = launch.gpus_per_worker > 0
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": to_dict(config), "out_dir": str(out_dir)},
        scaling_config=ScalingConfig(
            num_workers=launch.workers, use_gpu=use_gpu, resources_per_worker=worker_resources(launch)
        ),
        run_config=RayRunConfig(
            name=name or out_dir.name,
            storage_path=str(Path(storage_path or out_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=launch.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        torch_config=TorchConfig(
            backend=resolve_backend(config.sharding.backend, torch.device("cuda" if use_gpu else "cpu")),
            timeout_s=int(config.sharding.timeout_minutes * 60),
        ),
    )
    return trainer.fit()


def entrypoint(args: list[str]) -> str:
    """The shell command a Ray job runs: ``python -m trainer ray-train ...``."""
    return "python -m trainer ray-train " + " ".join(shlex.quote(a) for a in args)


def submit(address: str, args: list[str], *, working_dir: Path) -> str:
    """Submit ``ray-train`` with ``args`` as a Ray job; return the job id."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    return client.submit_job(
        entrypoint=entrypoint(args),
        runtime_env={"working_dir": str(working_dir), "excludes": [".venv", "runs", "data", "bench/results", ".git"]},
    )


def wait_for(address: str, job_id: str, timeout_s: float) -> None:
    """Block until the job ends; raise with the tail of its logs unless it succeeded."""
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in ended:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(1.0)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job_id} {status}:\n{client.get_job_logs(job_id)[-4000:]}")
