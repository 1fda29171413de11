"""Sharded training on a synthetic graph with millions of entities: 1 worker against 2 (torchrun, gloo).

Each worker runs one intra-op thread, so 1 worker uses one core and 2 workers the machine's two. V-ComplEx
(LIM), Bernoulli likelihood with per-occurrence KL (every update touches only the batch's rows),
global negatives. Reported per run: positives/s over the second epoch, the entity shard's bytes per
worker (rows and optimiser state, from the table) and each worker's peak RSS (VmHWM).

    make bench-sharding          # or: python -m bench.sharding --entities 2000000 --triples 4000000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import markdown_table, write_results
from bench.synthetic import triple_ids
from sharding.plan import table_bytes
from storage.convert import ConvertOptions, write_id_dataset

ROOT = Path(__file__).parents[1]
FREEBASE_ENTITIES = 86_054_151

# Runs the trainer, then records this worker's peak RSS beside the run.
_WORKER = """
import os, re, sys
from pathlib import Path
from trainer.cli import main
code = main(sys.argv[1:])
out = Path(sys.argv[sys.argv.index("--out") + 1])
peak = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
(out / f"peak-rss-rank{os.environ.get('RANK', '0')}.txt").write_text(peak)
sys.exit(code)
"""


def make_dataset(root: Path, num_entities: int, num_triples: int) -> None:
    train = triple_ids(num_triples, num_entities, 1000, seed=0)
    evaluation = train[np.random.default_rng(1).choice(len(train), 20, replace=False)]
    write_id_dataset(
        root,
        entity_names=[f"e{i}" for i in range(num_entities)],
        relation_names=[f"r{i}" for i in range(1000)],
        splits={"train": train, "valid": evaluation[:10], "test": evaluation[10:]},
        options=ConvertOptions(row_group_rows=131_072),
    )


def run(dataset: Path, out: Path, workers: int, settings: list[str]) -> dict:
    args = ["train", "--dataset", str(dataset), "--out", str(out)]
    for item in settings:
        args += ["--set", item]
    if workers == 1:
        command = [sys.executable, "-c", _WORKER, *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(workers),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--no-python", sys.executable,
            "-c", _WORKER, *args,
        ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if result.returncode:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    positives = json.loads((dataset / "manifest.json").read_text())["splits"]["train"]["triples"]
    peaks = [int((out / f"peak-rss-rank{r}.txt").read_text()) / 1024 for r in range(workers)]
    return {"positives_per_s": positives / epochs[-1]["seconds"], "peak_rss_mib": max(peaks)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def freebase_gib(dim: int, optimizer: str, workers: int) -> float:
    return table_bytes(FREEBASE_ENTITIES, dim, variational=True, optimizer=optimizer, world_size=workers) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=2_000_000)
    parser.add_argument("--triples", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=64, help="real numbers per mean (ComplEx: dim/2 complex)")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--batch", type=int, default=16384, help="global batch (positives per step)")
    args = parser.parse_args()
    settings = [
        "model.scorer=complex", "model.latent=lim", f"model.dim={args.dim}", "objective.likelihood=bernoulli",
        "objective.kl_estimator=per_occurrence", "objective.num_negatives=32", f"optim.optimizer={args.optimizer}",
        f"train.batch_size={args.batch}", "train.epochs=2", "train.eval_every=0", "train.checkpoint_every=2",
        "train.num_threads=1", "train.progress=false", "data.verify_checksums=false",
    ]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        dataset = Path(scratch) / "graph"
        make_dataset(dataset, args.entities, args.triples)
        for workers in (1, 2):
            result = run(dataset, Path(scratch) / f"run-{workers}", workers, settings)
            shard = table_bytes(args.entities, args.dim, variational=True, optimizer=args.optimizer, world_size=workers)
            rows.append({"workers": workers, "entity_shard_mib": shard / 2**20, **result})
            print(rows[-1], flush=True)
    rows[1]["speedup"] = rows[1]["positives_per_s"] / rows[0]["positives_per_s"]
    memory = [
        {"dim (real)": dim, "workers": w, "optimizer": opt, "GiB per worker": freebase_gib(dim, opt, w)}
        for dim in (200, 400)
        for opt in ("adam", "rowwise_adagrad")
        for w in (1, 8, 16)
    ]
    markdown = (
        f"## Sharded V-ComplEx, {args.entities:,} entities, {args.triples:,} triples, dim {args.dim}\n\n"
        + markdown_table(rows, ["workers", "positives_per_s", "speedup", "entity_shard_mib", "peak_rss_mib"])
        + "\n## Freebase86m entity table per worker (means + log-variances + optimiser state, fp32)\n\n"
        + markdown_table(memory, ["dim (real)", "optimizer", "workers", "GiB per worker"])
    )
    write_results("sharding", {"runs": rows, "freebase_memory": memory, "settings": settings}, markdown)


if __name__ == "__main__":
    main()
