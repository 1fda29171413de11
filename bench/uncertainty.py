"""Uncertainty quality: does sampling the embeddings give better confidence than the probability's magnitude?

For nations, umls, kinships and wn18rr, V-DistMult and V-ComplEx (LIM) are trained (the tuned small-graph
configs; wn18rr under a shorter budget than its quality run), then `python -m trainer report`'s
analyses run on test facts plus as many sampled negatives, with 100 samples of the embeddings:
area under precision-coverage for each confidence measure (ranking true facts, paper Figure 2), area under
selective-prediction accuracy, ECE and Brier score.

    make bench-uncertainty          # or: python -m bench.uncertainty --wn18rr-budget 600
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import RESULTS, machine, markdown_table, write_results
from storage.dataset import load_data
from trainer.config import load_config
from trainer.loop import train
from trainer.report import write_report
from trainer.runs import load_run

CONFIGS = Path(__file__).parents[1] / "configs"
MODELS = {"V-DistMult (LIM)": ["model.scorer=distmult"], "V-ComplEx (LIM)": ["model.scorer=complex"]}
TRUTH = ("magnitude", "mc_mean", "mc_lower_bound")
SELECTIVE = ("magnitude", "mc_mean", "mc_std", "entropy", "mutual_information")


def config_for(dataset: str, model: str, budget: float) -> tuple[Path, list[str]]:
    if dataset == "wn18rr":
        return CONFIGS / "wn18rr-vcomplex-lim.yaml", [f"train.time_budget_s={budget}", *MODELS[model]]
    return CONFIGS / f"small-{dataset}.yaml", MODELS[model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["nations", "umls", "kinships", "wn18rr"])
    parser.add_argument("--wn18rr-budget", type=float, default=600.0, help="training seconds per wn18rr model")
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        for model in MODELS:
            path, overrides = config_for(dataset, model, args.wn18rr_budget)
            config = load_config(path, [f"data.dataset={dataset}", "train.progress=false", *overrides])
            out = RESULTS / "runs" / f"uncertainty-{dataset}-{model.split()[0].lower()}"
            metrics = train(config, out, load_data(config.data))
            summary = write_report(load_run(out), out / "report", samples=args.samples, seed=0)
            truth, selective = summary["precision_coverage_area"], summary["selective_prediction_area"]
            row = {"dataset": dataset, "model": model, "test_mrr": metrics["test"]["filtered"]["mrr"]}
            row.update({f"pc_{k}": truth[k] for k in TRUTH})
            row.update({f"sel_{k}": selective[k] for k in SELECTIVE})
            for kind in ("magnitude", "mc_mean"):
                row[f"ece_{kind}"] = summary["calibration"][kind]["ece"]
                row[f"brier_{kind}"] = summary["calibration"][kind]["brier"]
            best_sampling = max((truth[k], k) for k in TRUTH[1:])
            row["sampling_beats_magnitude"] = f"{best_sampling[1]}" if best_sampling[0] > truth["magnitude"] else "no"
            rows.append(row)
            print(row, flush=True)
    wins = {r["dataset"] for r in rows if r["sampling_beats_magnitude"] != "no"}
    columns = [
        "dataset", "model", "test_mrr", *(f"pc_{k}" for k in TRUTH), *(f"sel_{k}" for k in SELECTIVE),
        "ece_magnitude", "ece_mc_mean", "brier_magnitude", "brier_mc_mean", "sampling_beats_magnitude",
    ]  # fmt: skip
    markdown = (
        "# Uncertainty: area under precision-coverage (pc_*), selective accuracy (sel_*), calibration\n\n"
        + markdown_table(rows, columns)
        + f"\nA sampling-based measure beats the magnitude's precision-coverage area on {len(wins)} of "
        f"{len(args.datasets)} datasets (for at least one model): {', '.join(sorted(wins)) or 'none'}.\n"
    )
    write_results("uncertainty", {"machine": machine(), "rows": rows, "samples": args.samples}, markdown)


if __name__ == "__main__":
    main()
