"""Training throughput and peak memory on one GPU: V-ComplEx (LIM, 100 complex dimensions, row-wise Adagrad)
on a synthetic graph of 10M entities, with the Bernoulli and the sampled-softmax objectives.

Reported per objective: positives/s over the last epoch (the first carries allocation and warm-up costs),
peak GPU memory allocated by torch, and the filtered MRR of the final (sampled) evaluation, which on a
uniform random graph only says the run finished. Run by ``bench/gpu.sh``; needs CUDA.

    python -m bench.gpu [--entities 10000000] [--triples 20000000] [--matmul-precision highest high]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine, markdown_table, write_results
from bench.sharding import make_dataset
from storage.dataset import load_data
from trainer.config import load_config
from trainer.loop import train

COMMON = [
    "model.scorer=complex", "model.latent=lim", "model.dim=200", "model.init_logvar=-8.0",
    "optim.optimizer=rowwise_adagrad", "optim.lr=0.1", "objective.kl_estimator=per_occurrence",
    "train.batch_size=65536", "train.epochs=2", "train.eval_every=0", "train.checkpoint_every=2",
    "train.progress=false", "data.verify_checksums=false",
    "eval.final_protocol=sampled", "eval.uniform_candidates=1000",
    "train.time_budget_s=45",  # a slow path still finishes inside bench/gpu.sh's limit (then 1 epoch is timed)
]  # fmt: skip
OBJECTIVES = {
    "bernoulli": ["objective.likelihood=bernoulli", "objective.num_negatives=64", "objective.negative_chunk=64"],
    "sampled_softmax": [  # configs/freebase.yaml's objective
        "objective.likelihood=sampled_softmax",
        "objective.num_negatives=256",
        "objective.negative_chunk=64",
        "objective.in_batch_negatives=true",
    ],
}


def run(dataset: Path, out: Path, settings: list[str], cuda: bool) -> dict:
    config = load_config(None, [f"data.dataset={dataset}", *settings])
    data = load_data(config.data)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    metrics = train(config, out, data)
    wall = time.perf_counter() - started
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {
        "positives_per_s": len(data.train) / epochs[-1]["seconds"],
        "epoch_seconds": [round(e["seconds"], 2) for e in epochs],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "wall_seconds": wall,
        "test_mrr_sampled": metrics["test"]["filtered"]["mrr"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=10_000_000)
    parser.add_argument("--triples", type=int, default=20_000_000)
    parser.add_argument(
        "--matmul-precision", nargs="+", default=["highest", "high"], choices=["highest", "high", "medium"]
    )
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device (--device cpu for a dry run)")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        dataset = Path(scratch) / "graph"
        started = time.perf_counter()
        make_dataset(dataset, args.entities, args.triples)
        print(f"dataset written in {time.perf_counter() - started:.1f}s", flush=True)
        for precision in args.matmul_precision:
            for name in args.objectives:
                settings = [*COMMON, *OBJECTIVES[name], f"train.matmul_precision={precision}"]
                out = Path(scratch) / f"{name}-{precision}"
                result = run(dataset, out, [*settings, f"train.device={args.device}"], cuda)
                rows.append({"objective": name, "matmul_precision": precision, **result})
                print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if cuda else "CPU dry run"
    header = (
        f"## {device}: V-ComplEx LIM, 100 complex dims, {args.entities:,} entities, {args.triples:,} "
        "triples, batch 65,536 (highest: fp32 products; high: TF32)\n\n"
    )
    columns = ["objective", "matmul_precision", "positives_per_s", "peak_gpu_gib", "epoch_seconds", "test_mrr_sampled"]
    payload = {"machine": {**machine(), "gpu": device}, "settings": COMMON, "objectives": OBJECTIVES, "rows": rows}
    write_results("gpu" if cuda else "gpu-dry-run", payload, header + markdown_table(rows, columns))


if __name__ == "__main__":
    main()
