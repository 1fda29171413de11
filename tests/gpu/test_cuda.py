"""The CUDA path, where a GPU exists (skipped elsewhere; bench/gpu.sh runs these on a GPU machine).

On a machine without CUDA every test here is skipped; the torch ops they compare against run in the CPU
suite with the compiled kernels off (tests/sharding/test_noise.py, the ``kernels=off`` cases)."""

import json

import pytest
import torch

from sharding import rng
from sharding.kernels import native
from sharding.launch import resolve_backend, resolve_device
from storage.dataset import load_data
from tests.trainer.test_meta_device import train_with_meta_default
from trainer.config import load_config
from trainer.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def test_counter_noise_on_cuda_is_the_cpu_stream():
    """Same integers (a mismatch there is of order 1), floats to a few ulp, as the compiled kernel draws."""
    seed, first, count = rng.seed_of(3, 1, 4), 10**9 + 7, 1 << 20
    index = torch.arange(first, first + count)
    on_cuda = rng.counter_normal(seed, index.to(CUDA)).cpu()
    torch.testing.assert_close(on_cuda, rng.counter_normal(seed, index), rtol=0, atol=1e-6)
    compiled = torch.empty(count)
    if native.normal_into(compiled, seed, first):
        torch.testing.assert_close(on_cuda, compiled, rtol=0, atol=1e-6)


def test_device_and_backend_follow_the_request():
    assert resolve_device("auto", cuda_devices=torch.cuda.device_count(), local_rank=0).type == "cuda"
    assert resolve_backend("auto", torch.device("cuda")) == "nccl"
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"


def _steps(tmp_path, name, device, likelihood):
    settings = [
        "data.dataset=kinships", "model.dim=16", "train.epochs=2", "train.eval_every=2", "train.progress=false",
        "train.log_steps=true", f"train.device={device}", f"objective.likelihood={likelihood}",
        "objective.kl_estimator=per_occurrence",
    ]  # fmt: skip
    config = load_config(None, settings)
    metrics = train(config, tmp_path / name, load_data(config.data))
    steps = [json.loads(line) for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
    return steps, metrics


@pytest.mark.parametrize("likelihood", ["bernoulli", "sampled_softmax", "softmax"])
def test_a_cuda_run_is_the_cpu_torch_ops_run(tmp_path, monkeypatch, likelihood):
    """One GPU against the CPU with the kernels off (the same torch ops): the same losses step by step to
    float tolerance (CUDA sums in another order), and the same quality."""
    gpu_steps, gpu = _steps(tmp_path, "cuda", "cuda", likelihood)
    native.library.cache_clear()
    monkeypatch.setenv("NVKG_NATIVE", "0")
    try:
        cpu_steps, cpu = _steps(tmp_path, "cpu", "cpu", likelihood)
    finally:
        native.library.cache_clear()
    assert len(gpu_steps) == len(cpu_steps) > 0
    for a, b in zip(gpu_steps, cpu_steps, strict=True):
        for key in ("nll", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (key, a, b)
    assert gpu["test"]["filtered"]["mrr"] == pytest.approx(cpu["test"]["filtered"]["mrr"], abs=0.01)


def test_training_on_cuda_keeps_no_tensor_on_the_cpu_by_accident(tmp_path):
    """Default device meta on a CUDA run: a tensor made without a device fails the first op that uses it."""
    metrics = train_with_meta_default(["train.device=cuda", "eval.num_samples=2"], tmp_path)
    assert 0.0 < metrics["test"]["filtered"]["mrr"] <= 1.0
