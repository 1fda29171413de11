"""Sharded training on a synthetic graph with millions of entities: 1 worker against 2 (torchrun, gloo),
whose all-to-alls go through shared memory (the default on one host) or over gloo's TCP.

Each worker runs one intra-op thread. Two workers are pinned to a core each (``sharding.pin_cpus``); one
worker runs twice, unpinned (its data reader's and the OS's threads may use the second core) and pinned to
one core, so the ratio of 2 workers to the pinned one is what a second core adds. A last setup is the
machine's ceiling for two workers: two independent single workers at once, each pinned to its own core
with half the batch and the whole table, exchanging nothing (their positives/s summed): what two
processes get out of two cores when sharding costs nothing. V-ComplEx
(LIM), Bernoulli likelihood with per-occurrence KL (every update touches only the batch's rows),
global negatives. Reported per run: positives/s over the second epoch, the entity shard's bytes per
worker (rows and optimiser state, from the table) and each worker's peak RSS (VmHWM).

    make bench-sharding          # or: python -m bench.sharding --entities 2000000 --triples 4000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
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
CEILING = "2 independent single workers, half the batch each (no sharding: the ceiling)"

# Runs the trainer, then records this worker's peak RSS and the cores it kept busy (CPU seconds of all its
# threads over its wall time) beside the run. BENCH_PIN_CPU pins the process to one CPU first.
_WORKER = """
import json, os, re, resource, sys, time
from pathlib import Path
if os.environ.get("BENCH_PIN_CPU"):
    os.sched_setaffinity(0, {int(os.environ["BENCH_PIN_CPU"])})
started = time.perf_counter()
from trainer.cli import main
code = main(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_SELF)
out = Path(sys.argv[sys.argv.index("--out") + 1])
peak = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
rank = os.environ.get("RANK", "0")
(out / f"peak-rss-rank{rank}.txt").write_text(peak)
cores = (usage.ru_utime + usage.ru_stime) / (time.perf_counter() - started)
(out / f"cores-rank{rank}.json").write_text(json.dumps(cores))
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


def run(dataset: Path, out: Path, workers: int, settings: list[str], pin: bool = False, keep: bool = False) -> dict:
    """Train on ``dataset`` into ``out`` with ``workers`` ranks; what ``measured`` reads. ``out`` is deleted
    after unless ``keep`` (its checkpoint holds the whole table)."""
    args = [*train_args(dataset, settings), "--out", str(out)]
    if workers == 1:
        command = [sys.executable, "-c", _WORKER, *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(workers),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--no-python", sys.executable,
            "-c", _WORKER, *args,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"BENCH_PIN_CPU": "0"} if pin else {})}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])
    rate, peak, cores = measured(dataset, out, workers)
    if not keep:
        shutil.rmtree(out)  # 3 GB a run at the default size
    return {"positives_per_s": rate, "peak_rss_mib": peak, "cores_per_worker": cores}


def run_independent(dataset: Path, out: Path, settings: list[str]) -> dict:
    """Two single workers at once, pinned to cores 0 and 1, each over the whole training set; their
    positives/s summed."""
    outs = [out / f"worker{i}" for i in range(2)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, *train_args(dataset, settings), "--out", str(path)], cwd=ROOT,
            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1", "BENCH_PIN_CPU": str(i)},
        )
        for i, path in enumerate(outs)
    ]  # fmt: skip
    failures = [err[-4000:] for child in children for _, err in [child.communicate()] if child.returncode]
    if failures:
        raise RuntimeError("\n".join(failures))
    rates, peaks, cores = zip(*(measured(dataset, path, 1) for path in outs), strict=True)
    shutil.rmtree(out)
    return {"positives_per_s": sum(rates), "peak_rss_mib": max(peaks), "cores_per_worker": max(cores)}


def train_args(dataset: Path, settings: list[str]) -> list[str]:
    return ["train", "--dataset", str(dataset), *(arg for item in settings for arg in ("--set", item))]


def measured(dataset: Path, out: Path, workers: int) -> tuple[float, float, float]:
    """(positives/s over the last epoch, the largest peak RSS of its workers in MiB, the most cores one
    of them kept busy) of a finished run in ``out``."""
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    positives = json.loads((dataset / "manifest.json").read_text())["splits"]["train"]["triples"]
    peaks = [int((out / f"peak-rss-rank{r}.txt").read_text()) / 1024 for r in range(workers)]
    cores = [json.loads((out / f"cores-rank{r}.json").read_text()) for r in range(workers)]
    return positives / epochs[-1]["seconds"], max(peaks), max(cores)


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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = [
        "model.scorer=complex", "model.latent=lim", f"model.dim={args.dim}", "objective.likelihood=bernoulli",
        "objective.kl_estimator=per_occurrence", "objective.num_negatives=32", f"optim.optimizer={args.optimizer}",
        f"train.batch_size={args.batch}", "train.epochs=2", "train.eval_every=0", "train.checkpoint_every=2",
        "train.num_threads=1", "train.progress=false", "data.verify_checksums=false",
    ]  # fmt: skip
    runs = []
    # Each setup in turn, ``--repeats`` times over: a slow stretch of the machine hits every setup alike.
    # (name, workers, pinned, extra settings); the ratios are of the default 2-worker setup (setups[2]).
    setups: list[tuple[str, int, bool, list[str]]] = [
        ("1", 1, False, []),
        ("1 (pinned to one core)", 1, True, []),
        ("2 (torchrun, shared-memory all-to-all)", 2, False, []),
        ("2 (torchrun, gloo all-to-all over TCP)", 2, False, ["sharding.shared_memory=false"]),
        (CEILING, 2, True, []),
    ]
    with tempfile.TemporaryDirectory() as scratch:
        dataset = Path(scratch) / "graph"
        make_dataset(dataset, args.entities, args.triples)
        for repeat in range(args.repeats):
            for index, (name, workers, pin, extra) in enumerate(setups):
                out = Path(scratch) / f"run-{repeat}-{index}"
                if name == CEILING:
                    result = run_independent(dataset, out, [*settings, f"train.batch_size={args.batch // 2}"])
                else:
                    result = run(dataset, out, workers, [*settings, *extra], pin)
                runs.append({"workers": name, "repeat": repeat + 1, **result})
                print(runs[-1], flush=True)
    rows = []
    for name, workers, _, _ in setups:
        mine = [r for r in runs if r["workers"] == name]
        owners = 1 if name == CEILING else workers  # the ceiling's workers hold the whole table each
        shard = table_bytes(args.entities, args.dim, variational=True, optimizer=args.optimizer, world_size=owners)
        rates = [r["positives_per_s"] for r in mine]
        rows.append({
            "workers": name, "positives_per_s": statistics.median(rates),
            "range": f"{min(rates):,.0f}-{max(rates):,.0f}",
            "cores_per_worker": statistics.median(r["cores_per_worker"] for r in mine),
            "entity_shard_mib": shard / 2**20, "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
        })  # fmt: skip
    # In the ceiling's row, "2 workers / this" is the share of the ceiling that sharded training reaches.
    columns = [("2 workers / this", setups[2], [0, 1, 4]), ("2 workers over gloo / this", setups[3], [0, 1, 4]),
               ("ceiling / this", setups[4], [0, 1])]  # fmt: skip
    for column, setup, below in columns:
        two = [r["positives_per_s"] for r in runs if r["workers"] == setup[0]]
        for row in (rows[i] for i in below):
            one = [r["positives_per_s"] for r in runs if r["workers"] == row["workers"]]
            ratios = [b / a for a, b in zip(one, two, strict=True)]  # per repeat: runs next to each other
            row[column] = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    memory = [
        {"dim (real)": dim, "workers": w, "optimizer": opt, "GiB per worker": freebase_gib(dim, opt, w)}
        for dim in (200, 400)
        for opt in ("adam", "rowwise_adagrad")
        for w in (1, 8, 16)
    ]
    markdown = (
        f"## Sharded V-ComplEx, {args.entities:,} entities, {args.triples:,} triples, dim {args.dim}\n\n"
        + f"Median of {args.repeats} repeats (range); cores per worker: CPU seconds of all its threads over its wall "
        "time. The ceiling: two independent single workers at once, pinned to a core each, half the batch each, "
        'exchanging nothing (positives/s summed); in its row, "2 workers / this" is the share of the ceiling '
        "that sharded training reaches.\n\n"
        + markdown_table(
            rows,
            [
                "workers",
                "positives_per_s",
                "range",
                "2 workers / this",
                "2 workers over gloo / this",
                "ceiling / this",
                "cores_per_worker",
                "entity_shard_mib",
                "peak_rss_mib",
            ],
        )
        + "\n## Freebase86m entity table per worker (means + log-variances + optimiser state, fp32)\n\n"
        + markdown_table(memory, ["dim (real)", "optimizer", "workers", "GiB per worker"])
    )
    payload = {"rows": rows, "runs": runs, "freebase_memory": memory, "settings": settings}
    write_results("sharding", payload, markdown)


if __name__ == "__main__":
    main()
