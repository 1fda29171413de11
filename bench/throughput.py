"""Training throughput against PyTorch-BigGraph and PyKEEN, in one run on the same machine.

ComplEx with 64 complex dimensions, 32 uniform negatives per positive, batch 1024, on kinships and
wn18rr: positives/s of PyTorch-BigGraph 1.0.0 (2 HOGWILD workers, row-wise Adagrad, logistic loss, chunks
of 32 positives sharing 32 head and 32 tail negatives: bench/pbg_peer.py), PyKEEN's sLCWA loop, our
point ComplEx and our V-ComplEx (LIM, with lazy Adam and with row-wise Adagrad; 32 negatives per
positive, shared by chunks of 256 positives (``objective.negative_chunk``'s default) and by chunks of 32;
and PBG's exact sampling, chunks of 32 sharing 32 head and 32 tail negatives, i.e. 64 corruptions per
positive where the other rows score 32), with the sparse per-occurrence KL. Ours runs the real training
function; its time comes from the per-epoch log (evaluation excluded, as the peers' loops have none). The
peers live in their own environments (bench/.venv-pbg, bench/.venv-pykeen); one that cannot be installed
gets rows that say so.

Time to quality (wn18rr): PBG trains ``--quality-epochs`` epochs, then both systems' filtered test MRR
after the same wall time (PBG's, start-up included), ours with the Bernoulli objective
of the same task (negative weight 1, a bias per relation: the variant validation chose) and with the
sampled softmax.

This machine's speed drifts by tens of percent within minutes, for PyKEEN and for us alike, so the
systems run in rounds (PBG, PyKEEN, then ours, per dataset) and each round gives its own ratio; the table
reports the median rate and the median ratio over the rounds, and the JSON every round.

    make bench-throughput            # or: python -m bench.throughput [--rounds N] [--datasets ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import machine, markdown_table, write_results
from storage.dataset import BUNDLED_DIR, load_data
from trainer.config import load_config
from trainer.loop import train

PYKEEN_VENV = Path(__file__).parent / ".venv-pykeen"
PBG_VENV = Path(__file__).parent / ".venv-pbg"
COMPLEX_DIM, NEGATIVES, BATCH = 64, 32, 1024
# Epochs per system and dataset: several seconds of steady-state training each (5 wn18rr epochs, 2.4-3.9 s,
# had let one slow stretch of the machine decide a round).
EPOCHS = {"kinships": {"ours": 100, "pykeen": 3, "pbg": 100}, "wn18rr": {"ours": 12, "pykeen": 1, "pbg": 12}}
PBG_WORKERS = 2


def ensure_venv(name: str, venv: Path, probe: str, packages: list[str]) -> str | None:
    """Create a peer's environment ``venv`` if needed (until ``python -c probe`` succeeds, install
    ``packages`` into it); return an error message if it cannot be had."""
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
            install = [str(python), "-m", "pip", "install", "--quiet", *packages]
            subprocess.run(install, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        return f"{name} could not be installed: {(err.stderr or '').strip()[-300:]}"
    return None


def ensure_pykeen() -> str | None:
    return ensure_venv("PyKEEN", PYKEEN_VENV, "import pykeen", ["torch==2.13.0", "pykeen"])


def ensure_pbg() -> str | None:
    # PBG 1.0.0 imports pkg_resources, which setuptools 81 removes; h5py comes in as its dependency.
    packages = ["torch==2.13.0", "setuptools<81", "torchbiggraph==1.0.0", "h5py"]
    return ensure_venv("PyTorch-BigGraph", PBG_VENV, "import h5py, torchbiggraph.train", packages)


def run_peer(venv: Path, script: str, args: list[str]) -> dict:
    """``script`` (beside this file) in the peer's environment ``venv``: the JSON of its last stdout line."""
    command = [str(venv / "bin" / "python"), str(Path(__file__).parent / script), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-300:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_pykeen(dataset: str, epochs: int, threads: int) -> dict:
    train_path = BUNDLED_DIR / dataset / "train.txt"
    args = [str(train_path), str(COMPLEX_DIM), str(NEGATIVES), str(BATCH), str(epochs), str(threads)]
    return run_peer(PYKEEN_VENV, "pykeen_peer.py", args)


def run_pbg(dataset_dir: Path, epochs: int, workers: int, evaluate: bool = False) -> dict:
    """PBG's positives/s over epochs 2..N with ``workers`` HOGWILD processes (and test metrics with ``evaluate``)."""
    args = [str(dataset_dir), f"--epochs={epochs}", f"--workers={workers}", f"--complex-dim={COMPLEX_DIM}"]
    args += [f"--negatives={NEGATIVES}", f"--batch={BATCH}", *(["--eval"] if evaluate else [])]
    return run_peer(PBG_VENV, "pbg_peer.py", args)


def task_overrides(
    dataset: str, latent: str, optimizer: str, chunk: int | None = None, negatives: int = NEGATIVES
) -> list[str]:
    """The config overrides of nvkg on this bench's task (bench/step_profile.py profiles the same one)."""
    return [
        *([f"objective.negative_chunk={chunk}"] if chunk else []),
        f"data.dataset={dataset}",
        "model.scorer=complex",
        f"model.dim={2 * COMPLEX_DIM}",
        f"model.latent={latent}",
        f"optim.optimizer={optimizer}",
        "objective.likelihood=bernoulli",
        f"objective.num_negatives={negatives}",
        "objective.kl_estimator=per_occurrence",
        f"train.batch_size={BATCH}",
        "train.eval_every=0",
        "train.progress=false",
    ]


def run_ours(
    dataset: str,
    latent: str,
    optimizer: str,
    epochs: int,
    threads: int,
    chunk: int | None = None,
    negatives: int = NEGATIVES,
) -> dict:
    config = load_config(
        None,
        [
            *task_overrides(dataset, latent, optimizer, chunk, negatives),
            f"train.epochs={epochs}",
            f"train.checkpoint_every={epochs}",
            f"train.num_threads={threads}",
        ],
    )
    data = load_data(config.data)
    with tempfile.TemporaryDirectory() as out:
        train(config, Path(out), data)
        records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    steady = records[1:] or records  # the first epoch carries one-off allocation costs
    seconds = sum(r["seconds"] for r in steady)
    return {"positives_per_s": len(steady) * len(data.train) / seconds, "seconds": seconds, "epochs": len(steady)}


# (latent, optimizer, negative_chunk (None: the default), negatives per positive over both sides)
SYSTEMS: dict[str, tuple[str, str, int | None, int]] = {
    "nvkg ComplEx (point, Adam)": ("point", "adam", None, NEGATIVES),
    "nvkg V-ComplEx (LIM, Adam)": ("lim", "adam", None, NEGATIVES),
    "nvkg V-ComplEx (LIM, row-wise Adagrad)": ("lim", "rowwise_adagrad", None, NEGATIVES),
    "nvkg V-ComplEx (LIM, row-wise Adagrad, chunks of 32)": ("lim", "rowwise_adagrad", 32, NEGATIVES),
    # PBG's exact sampling: nvkg's k counts a positive's corruptions on both sides (k/2 heads, k/2 tails),
    # PBG's num_uniform_negs those of each side, so PBG's 32 are nvkg's 64.
    "nvkg V-ComplEx (LIM, row-wise Adagrad, chunks of 32, 32 head + 32 tail)": ("lim", "rowwise_adagrad", 32, 64),
}
PEER = "PyKEEN sLCWA ComplEx"
PBG = "PyTorch-BigGraph ComplEx (2 HOGWILD workers)"


def run_round(dataset: str, threads: int, errors: dict[str, str | None]) -> dict[str, dict]:
    """One measurement of every system on ``dataset``, back to back; ratios to this round's peers."""
    epochs = EPOCHS[dataset]
    results = {
        PBG: {"error": errors[PBG]} if errors[PBG] else run_pbg(BUNDLED_DIR / dataset, epochs["pbg"], PBG_WORKERS),
        PEER: {"error": errors[PEER]} if errors[PEER] else run_pykeen(dataset, epochs["pykeen"], threads),
    }
    for system, (latent, optimizer, chunk, negatives) in SYSTEMS.items():
        results[system] = run_ours(dataset, latent, optimizer, epochs["ours"], threads, chunk, negatives)
    for peer, key in ((PEER, "speedup_vs_pykeen"), (PBG, "speedup_vs_pbg")):
        base = results[peer].get("positives_per_s")
        for result in results.values():
            rate = result.get("positives_per_s")
            if isinstance(base, float | int) and base and isinstance(rate, float | int):
                result[key] = rate / base
    return results


def time_to_quality(threads: int, pbg_epochs: int, error: str | None) -> list[dict]:
    """wn18rr: PBG for ``pbg_epochs``, then ours for as long as PBG took (start-up included); test MRR."""
    if error:
        return [{"system": PBG, "error": error}]
    pbg = run_pbg(BUNDLED_DIR / "wn18rr", pbg_epochs, PBG_WORKERS, evaluate=True)
    rows = [{"system": PBG, "epochs": pbg_epochs, "train_seconds": pbg.get("train_seconds"), **pbg}]
    if "error" in pbg:
        return rows
    budget = float(pbg["train_seconds"])
    task = [
        "data.dataset=wn18rr", "model.scorer=complex", f"model.dim={2 * COMPLEX_DIM}", "model.latent=lim",
        "model.init_logvar=-8.0", f"train.batch_size={BATCH}", f"train.time_budget_s={budget}",
        "train.epochs=100000", "train.eval_every=0", "train.checkpoint_every=100000", f"train.num_threads={threads}",
        "train.progress=false", "objective.kl_estimator=per_occurrence", f"objective.num_negatives={NEGATIVES}",
        "optim.optimizer=adam", "optim.lr=0.01",
    ]  # fmt: skip
    variants = {
        "nvkg V-ComplEx (LIM, Bernoulli, weight 1, relation bias, chunks of 32)": [
            "objective.likelihood=bernoulli", "objective.negative_weight=1", "objective.relation_bias=true",
            f"objective.negative_chunk={NEGATIVES}",
        ],
        "nvkg V-ComplEx (LIM, sampled softmax)": ["objective.likelihood=sampled_softmax"],
    }  # fmt: skip
    for system, settings in variants.items():
        config = load_config(None, [*task, *settings])
        data = load_data(config.data)
        with tempfile.TemporaryDirectory() as out:
            metrics = train(config, Path(out), data)
            records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
        test = metrics["test"]["filtered"]
        rows.append({"system": system, "epochs": len(records), "train_seconds": sum(r["seconds"] for r in records),
                     **{k: test[k] for k in ("mrr", "hits@1", "hits@3", "hits@10")}})  # fmt: skip
    return rows


def summarise(dataset: str, system: str, rounds: list[dict]) -> dict:
    """Median rate and median per-round ratio of one system over the rounds."""
    row: dict = {"dataset": dataset, "system": system, "rounds": len(rounds)}
    for key in ("positives_per_s", "speedup_vs_pykeen", "speedup_vs_pbg"):
        values = [r[key] for r in rounds if key in r]
        if values:
            row[key] = statistics.median(values)
            digits = 0 if key == "positives_per_s" else 2
            row[f"{key}_range"] = f"{min(values):,.{digits}f}-{max(values):,.{digits}f}"
    errors = [r["error"] for r in rounds if "error" in r]
    if errors:
        row["error"] = errors[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--datasets", nargs="+", default=list(EPOCHS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality-epochs", type=int, default=60, help="PBG's epochs in the time-to-quality run")
    args = parser.parse_args()
    errors = {PEER: ensure_pykeen(), PBG: ensure_pbg()}
    for system, error in errors.items():
        if error:
            print(f"skipping {system}: {error}", file=sys.stderr)
    rows, per_round = [], []
    for dataset in args.datasets:
        rounds = []
        for index in range(args.rounds):
            results = run_round(dataset, args.threads, errors)
            for system, result in results.items():
                record = {"dataset": dataset, "round": index + 1, "system": system, **result}
                per_round.append(record)
                print(json.dumps(record), flush=True)
            rounds.append(results)
        rows += [summarise(dataset, system, [r[system] for r in rounds]) for system in [PBG, PEER, *SYSTEMS]]
    quality = time_to_quality(args.threads, args.quality_epochs, errors[PBG]) if args.quality_epochs else []
    for row in quality:
        print(json.dumps(row), flush=True)
    settings = {"complex_dim": COMPLEX_DIM, "negatives_per_positive": NEGATIVES, "batch_size": BATCH}
    header = (
        f"# Training throughput (ComplEx {COMPLEX_DIM} complex dims, {NEGATIVES} negatives/positive, "
        f"batch {BATCH}, {args.threads} threads; median of {args.rounds} rounds)\n\n"
    )
    shown = [{**row, **{k: f"{row[k]:.2f}" for k in ("speedup_vs_pykeen", "speedup_vs_pbg") if k in row}}
             for row in rows]  # fmt: skip
    columns = ["dataset", "system", "positives_per_s", "positives_per_s_range", "speedup_vs_pbg"]
    table = markdown_table(shown, [*columns, "speedup_vs_pbg_range", "speedup_vs_pykeen", "rounds", "error"])
    if quality:
        table += "\n## Time to quality: wn18rr, test filtered, after the same wall time\n\n" + markdown_table(
            quality, ["system", "epochs", "train_seconds", "mrr", "hits@1", "hits@10", "error"]
        )
    payload = {"machine": machine(), "settings": settings, "rows": rows, "rounds": per_round, "quality": quality}
    write_results("throughput", payload, header + table)


if __name__ == "__main__":
    main()
