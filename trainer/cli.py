"""``python -m trainer train|evaluate``: parse, build, run, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from trainer import checkpoint
from trainer.config import load_config
from trainer.evaluate import build_filters
from trainer.loop import evaluate_run, load_data, train
from trainer.model import build_model

RUNS_DIR = Path("runs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Variational knowledge-graph embeddings")
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train a model and evaluate it")
    train_cmd.add_argument("--config", type=Path, help="YAML config (see configs/)")
    train_cmd.add_argument("--dataset", help="bundled dataset name or directory; overrides data.dataset")
    train_cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train_cmd.add_argument("--out", type=Path, help="run directory (resumes if it holds a checkpoint)")
    eval_cmd = commands.add_parser("evaluate", help="evaluate a run directory's best checkpoint")
    eval_cmd.add_argument("run_dir", type=Path)
    eval_cmd.add_argument("--samples", type=int, help="average the predictive probability over S samples")
    return parser


def _default_out(dataset: str, latent: str, scorer: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RUNS_DIR / f"{Path(dataset).name}-{latent}-{scorer}-{stamp}"


def _summary(metrics: dict) -> str:
    test = metrics["test"]
    rows = [f"{kind:9s} " + "  ".join(f"{k}={v:.4f}" for k, v in test[kind].items()) for kind in ("filtered", "raw")]
    return "\n".join(["test metrics:", *rows, f"dropped facts (unseen entities): {metrics['dropped_facts']}"])


def cmd_train(args: argparse.Namespace) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("WORLD_SIZE > 1: multi-worker training needs the sharded entity table (not built yet)")
    overrides = list(args.overrides)
    if args.dataset:
        overrides.append(f"data.dataset={args.dataset}")
    config = load_config(args.config, overrides)
    out_dir = args.out or _default_out(config.data.dataset, config.model.latent, config.model.scorer)
    print(f"run directory: {out_dir}", flush=True)
    metrics = train(config, out_dir)
    print(f"run directory: {out_dir}")
    print(_summary(metrics))


def cmd_evaluate(args: argparse.Namespace) -> None:
    run_dir: Path = args.run_dir
    overrides = [] if args.samples is None else [f"eval.num_samples={args.samples}"]
    config = load_config(run_dir / "config.yaml", overrides)
    best = run_dir / checkpoint.BEST
    path = best if best.exists() else run_dir / checkpoint.LATEST
    if not path.exists():
        raise ValueError(f"{run_dir}: no checkpoint ({checkpoint.BEST} or {checkpoint.LATEST}) to evaluate")
    dataset = load_data(config)
    model = build_model(config, dataset.num_entities, dataset.num_relations)
    checkpoint.load_into(path, model)
    metrics = evaluate_run(config, model, dataset, build_filters(dataset.all_known(), dataset.num_relations))
    print(json.dumps(metrics, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": cmd_train, "evaluate": cmd_evaluate}[args.command](args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
