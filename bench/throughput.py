"""Training throughput against PyKEEN, in one run on the same machine.

ComplEx with 64 complex dimensions, 32 uniform negatives per positive, batch 1024, on kinships and
wn18rr: positives/s of PyKEEN's sLCWA loop, our point ComplEx and our V-ComplEx (LIM, with lazy Adam
and with PyTorch-BigGraph's row-wise Adagrad), with the sparse per-occurrence KL. Ours runs the
real training function; its time comes from the per-epoch log (evaluation excluded, as PyKEEN's loop
has none). PyKEEN lives in its own environment (bench/.venv-pykeen); if it cannot be installed, its
rows say so and the rest still runs.

This machine's speed drifts by tens of percent within minutes, for PyKEEN and for us alike, so the
systems run in rounds (PyKEEN, then ours, per dataset) and each round gives its own ratio; the table
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
COMPLEX_DIM, NEGATIVES, BATCH = 64, 32, 1024
# Epochs per system and dataset: several seconds of steady-state training each (5 wn18rr epochs, 2.4-3.9 s,
# had let one slow stretch of the machine decide a round).
EPOCHS = {"kinships": {"ours": 100, "pykeen": 3}, "wn18rr": {"ours": 12, "pykeen": 1}}


def ensure_pykeen() -> str | None:
    """Create the PyKEEN environment if needed; return an error message if it cannot be had."""
    python = PYKEEN_VENV / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(PYKEEN_VENV)], check=True)
        probe = subprocess.run([str(python), "-c", "import pykeen"], capture_output=True)
        if probe.returncode != 0:
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0", "pykeen"],
                check=True,
                capture_output=True,
                text=True,
            )
    except subprocess.CalledProcessError as err:
        return f"PyKEEN could not be installed: {(err.stderr or '').strip()[-300:]}"
    return None


def run_pykeen(dataset: str, epochs: int, threads: int) -> dict:
    train_path = BUNDLED_DIR / dataset / "train.txt"
    args = [str(train_path), str(COMPLEX_DIM), str(NEGATIVES), str(BATCH), str(epochs), str(threads)]
    result = subprocess.run(
        [str(PYKEEN_VENV / "bin" / "python"), str(Path(__file__).parent / "pykeen_peer.py"), *args],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-300:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_ours(dataset: str, latent: str, optimizer: str, epochs: int, threads: int) -> dict:
    config = load_config(
        None,
        [
            f"data.dataset={dataset}",
            "model.scorer=complex",
            f"model.dim={2 * COMPLEX_DIM}",
            f"model.latent={latent}",
            f"optim.optimizer={optimizer}",
            "objective.likelihood=bernoulli",
            f"objective.num_negatives={NEGATIVES}",
            "objective.kl_estimator=per_occurrence",
            f"train.batch_size={BATCH}",
            f"train.epochs={epochs}",
            "train.eval_every=0",
            f"train.checkpoint_every={epochs}",
            f"train.num_threads={threads}",
            "train.progress=false",
        ],
    )
    data = load_data(config.data)
    with tempfile.TemporaryDirectory() as out:
        train(config, Path(out), data)
        records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    steady = records[1:] or records  # the first epoch carries one-off allocation costs
    seconds = sum(r["seconds"] for r in steady)
    return {"positives_per_s": len(steady) * len(data.train) / seconds, "seconds": seconds, "epochs": len(steady)}


SYSTEMS = {
    "nvkg ComplEx (point, Adam)": ("point", "adam"),
    "nvkg V-ComplEx (LIM, Adam)": ("lim", "adam"),
    "nvkg V-ComplEx (LIM, row-wise Adagrad)": ("lim", "rowwise_adagrad"),
}
PEER = "PyKEEN sLCWA ComplEx"


def run_round(dataset: str, threads: int, pykeen_error: str | None) -> dict[str, dict]:
    """One measurement of every system on ``dataset``, back to back; ratios to this round's PyKEEN."""
    epochs = EPOCHS[dataset]
    results = {PEER: {"error": pykeen_error} if pykeen_error else run_pykeen(dataset, epochs["pykeen"], threads)}
    for system, (latent, optimizer) in SYSTEMS.items():
        results[system] = run_ours(dataset, latent, optimizer, epochs["ours"], threads)
    base = results[PEER].get("positives_per_s")
    for result in results.values():
        rate = result.get("positives_per_s")
        if isinstance(base, float | int) and base and isinstance(rate, float | int):
            result["speedup_vs_pykeen"] = rate / base
    return results


def summarise(dataset: str, system: str, rounds: list[dict]) -> dict:
    """Median rate and median per-round ratio of one system over the rounds."""
    row: dict = {"dataset": dataset, "system": system, "rounds": len(rounds)}
    for key in ("positives_per_s", "speedup_vs_pykeen"):
        values = [r[key] for r in rounds if key in r]
        if values:
            row[key] = statistics.median(values)
            digits = 1 if key == "speedup_vs_pykeen" else 0
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
    args = parser.parse_args()
    pykeen_error = ensure_pykeen()
    if pykeen_error:
        print(f"skipping PyKEEN: {pykeen_error}", file=sys.stderr)
    rows, per_round = [], []
    for dataset in args.datasets:
        rounds = []
        for index in range(args.rounds):
            results = run_round(dataset, args.threads, pykeen_error)
            for system, result in results.items():
                record = {"dataset": dataset, "round": index + 1, "system": system, **result}
                per_round.append(record)
                print(json.dumps(record), flush=True)
            rounds.append(results)
        rows += [summarise(dataset, system, [r[system] for r in rounds]) for system in [PEER, *SYSTEMS]]
    settings = {"complex_dim": COMPLEX_DIM, "negatives_per_positive": NEGATIVES, "batch_size": BATCH}
    header = (
        f"# Training throughput (ComplEx {COMPLEX_DIM} complex dims, {NEGATIVES} negatives/positive, "
        f"batch {BATCH}, {args.threads} threads; median of {args.rounds} rounds)\n\n"
    )
    # One decimal for ratios: the table's default rounding showed a median of 29.6x as "30".
    shown = [{**row, "speedup_vs_pykeen": f"{row['speedup_vs_pykeen']:.1f}"} if "speedup_vs_pykeen" in row else row
             for row in rows]  # fmt: skip
    columns = ["dataset", "system", "positives_per_s", "positives_per_s_range", "speedup_vs_pykeen"]
    table = markdown_table(shown, [*columns, "speedup_vs_pykeen_range", "rounds"])
    payload = {"machine": machine(), "settings": settings, "rows": rows, "rounds": per_round}
    write_results("throughput", payload, header + table)


if __name__ == "__main__":
    main()
