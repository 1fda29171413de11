"""Training at scale on a graph with known answers: a planted graph (bench/planted.py), 2 gloo workers.

Generates the planted graph once under ``--data`` (regenerated when its parameters change), computes the
planted model's own test MRR (the ceiling) and popularity's, trains V-ComplEx (LIM) with the objective
that scales (sampled softmax, per-occurrence KL, row-wise Adagrad) and reports entities, triples, peak RSS
per worker, positives/s, seconds per epoch and the trained model's test MRR against the ceiling.

    make bench-scale                                   # 10M entities, 130M draws (about 102M distinct facts)
    make bench-scale ARGS="--entities 200000 --triples 2000000 --set optim.lr=0.05"
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import machine, markdown_table, write_results
from bench.planted import PlantedModel, PlantedSpec, ceiling, write_planted
from bench.sharding import run
from storage.convert import ConvertOptions
from storage.layout import Manifest
from storage.reader import TripleStore

ROOT = Path(__file__).parents[1]
DEFAULT_ENTITIES = 10_000_000
EVAL_ELEMENTS = 2**26
"""Queries x local candidates per evaluation batch: ~10 bytes each across the evaluation's score and masks."""


def prepare(data: Path, spec: PlantedSpec, chunk_rows: int) -> dict:
    """The planted graph of ``spec`` under ``data``/graph and its description (graph.json), made once."""
    graph, described = data / "graph", data / "graph.json"
    if described.is_file() and (graph / "manifest.json").is_file():
        info = json.loads(described.read_text())
        if info["spec"] == asdict(spec):
            print(f"reusing {graph}", flush=True)
            return info
    print(f"generating {graph}: {spec}", flush=True)
    described.unlink(missing_ok=True)
    started = time.perf_counter()
    manifest, held_out = write_planted(
        graph, spec, chunk_rows=chunk_rows, options=ConvertOptions(row_group_rows=131_072)
    )
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    metrics = ceiling(PlantedModel(spec), TripleStore(graph, verify=False))
    info = {
        "spec": asdict(spec),
        "splits": {split: asdict(counts) for split, counts in manifest.splits.items()},
        "train_draws_held_out": held_out,
        "generate_seconds": seconds,
        "ceiling_seconds": time.perf_counter() - started,
        "generate_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "test": metrics,
    }
    described.write_text(json.dumps(info, indent=2) + "\n")
    return info


def settings(args: argparse.Namespace) -> list[str]:
    """The trainer's overrides. Chunks of 64 positives: the in-batch negatives add 2 x chunk candidates per
    query, and chunks of 256 made an epoch several times slower. Measured on 200k entities, 2M draws, 2
    workers: without in-batch negatives 84,770 positives/s and MRR 0.133; with chunks of 256, MRR 0.163 at
    a fraction of the speed; with chunks of 64 and 128 uniform negatives 89,260/s and MRR 0.155."""
    eval_batch = max(1, min(512, EVAL_ELEMENTS * args.workers // args.entities))
    return [
        "model.scorer=complex", "model.latent=lim", f"model.dim={args.dim}", "model.init_logvar=-8.0",
        "objective.likelihood=sampled_softmax", "objective.kl_estimator=per_occurrence",
        f"objective.num_negatives={args.negatives}", "objective.negative_chunk=64",
        "optim.optimizer=rowwise_adagrad", f"optim.lr={args.lr}",
        f"train.batch_size={args.batch}", f"train.epochs={args.epochs}", "train.eval_every=0",
        f"train.checkpoint_every={args.epochs}", "train.num_threads=1", "train.progress=false",
        "data.verify_checksums=false", f"eval.batch_size={eval_batch}", *args.set,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=DEFAULT_ENTITIES)
    parser.add_argument("--triples", type=int, default=130_000_000, help="train draws (duplicates are dropped)")
    parser.add_argument("--relations", type=int, default=1000)
    parser.add_argument("--eval-facts", type=int, default=1000, help="valid and test draws each")
    parser.add_argument("--clusters", type=int, default=PlantedSpec.num_clusters)
    parser.add_argument("--rank", type=int, default=PlantedSpec.rank, help="complex rank of the planted model")
    parser.add_argument("--beta", type=float, default=PlantedSpec.beta)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-rows", type=int, default=1_000_000, help="facts generated at a time")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64, help="real numbers per mean (ComplEx: dim/2 complex)")
    parser.add_argument("--batch", type=int, default=16384, help="global batch (positives per step)")
    parser.add_argument("--negatives", type=int, default=128, help="uniform negatives per chunk")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer config override")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "scale", help="where the graph is kept")
    args = parser.parse_args()
    spec = PlantedSpec(
        num_entities=args.entities, num_triples=args.triples, num_relations=args.relations, num_eval=args.eval_facts,
        num_clusters=args.clusters, rank=args.rank, beta=args.beta, seed=args.seed,
    )  # fmt: skip
    args.data.mkdir(parents=True, exist_ok=True)
    info = prepare(args.data, spec, args.chunk_rows)
    overrides = settings(args)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.data))  # checkpoints: GBs, beside the graph
    try:
        result = run(args.data / "graph", scratch / "run", args.workers, overrides, keep=True)
        epochs = [json.loads(line) for line in (scratch / "run" / "log.jsonl").read_text().splitlines()]
        metrics = json.loads((scratch / "run" / "metrics.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    manifest = Manifest.read(args.data / "graph")
    row = {
        "entities": manifest.num_train_entities,
        "train triples": manifest.splits["train"].triples,
        "test facts": manifest.splits["test"].triples,
        "workers": args.workers,
        "peak RSS per worker (MiB)": result["peak_rss_mib"],
        "positives/s": result["positives_per_s"],
        "s per epoch": sum(e["seconds"] for e in epochs) / len(epochs),
        "test MRR": metrics["test"]["filtered"]["mrr"],
        "ceiling MRR": info["test"]["planted"]["filtered"]["mrr"],
        "popularity MRR": info["test"]["popularity"]["filtered"]["mrr"],
    }
    row["MRR / ceiling"] = row["test MRR"] / row["ceiling MRR"]
    markdown = (
        f"## V-ComplEx (LIM), sampled softmax, on a planted graph ({args.epochs} epoch, dim {args.dim}, "
        f"filtered test MRR)\n\n"
        + markdown_table([row], list(row))
        + f"\nPlanted model: {spec}. Generated in {info['generate_seconds']:.0f} s "
        f"(peak RSS of generation and ceiling {info['generate_peak_rss_mib']:.0f} MiB); "
        f"{info['train_draws_held_out']:,} train draws left "
        "out as valid/test facts. Popularity MRR: ranking by popularity alone.\n"
    )
    payload = {"result": row, "graph": info, "epochs": epochs, "metrics": metrics, "settings": overrides}
    # Runs of other sizes or lengths keep their own results beside the default's.
    name = "scale" + (f"-{args.entities}" if args.entities != DEFAULT_ENTITIES else "")
    name += f"-{args.epochs}epochs" if args.epochs != 1 else ""
    write_results(name, {**payload, "machine": machine()}, markdown)


if __name__ == "__main__":
    main()
