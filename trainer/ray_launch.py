"""Running ``train`` under Ray Train, and submitting such a run to a Ray cluster as a job.

Ray Train starts one worker process per rank and creates the torch.distributed group itself (gloo on
CPU, NCCL with GPUs), then each worker calls ``train`` exactly as torchrun's workers do. Checkpoints are
written to the run directory (storage every worker reaches: a local path on one machine, a shared
mount on a cluster) and reported with ``ray.train.report``, so a restarted worker group, after a
failure and up to ``max_failures`` times, resumes from the latest one.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

from sharding.launch import process_group
from trainer import checkpoint
from trainer.config import LaunchConfig, RunConfig, config_from_dict, to_dict


class RayReporter(checkpoint.Reporter):
    """Checkpoints in the run directory, also reported to Ray Train (which restores them on restart)."""

    def latest(self) -> Path | None:
        import ray.train

        restored = ray.train.get_checkpoint()
        if restored is None:
            return super().latest()
        target = Path(tempfile.mkdtemp(prefix="nvkg-restore-"))
        return Path(restored.to_directory(str(target)))

    def save(self, name: str, model, state, config, metrics: dict | None = None) -> None:
        import ray.train

        super().save(name, model, state, config, metrics)
        if name != checkpoint.LATEST:
            return
        report = {"epoch": state.epoch, "best_valid_mrr": state.best_mrr, **(metrics or {})}
        lead = self.exchange.rank == 0
        # Every rank must call report (it is a barrier); with one shared directory only rank 0 attaches it.
        reported = ray.train.Checkpoint.from_directory(str(self.path(name))) if lead else None
        ray.train.report(report, checkpoint=reported)


def worker_loop(payload: dict) -> None:
    """The function every Ray Train worker runs."""
    from trainer.loop import train

    config = config_from_dict(payload["config"])
    out_dir = Path(payload["out_dir"])
    with process_group(config.sharding.backend) as exchange:
        train(config, out_dir, exchange=exchange, reporter=RayReporter(out_dir, exchange))


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
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
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
