"""``python -m trainer train|evaluate|ray-train|submit|tune|config|...`` (``nvkg ...``): parse, build, run, report.

python -m trainer train --config configs/default.yaml                     # one process
torchrun --standalone --nproc-per-node 2 -m trainer train --config ... --out runs/x   # 2 workers
python -m trainer ray-train --config ... --set launch.workers=2 --out runs/x   # Ray Train, on this Ray cluster
python -m trainer submit --address http://127.0.0.1:8265 --config ... --set launch.workers=2 --out /shared/runs/x
python -m trainer tune --config ... --space space.yaml --trials 16 --out runs/search   # Ray Tune + ASHA
python -m trainer config --show --config ... --set model.dim=64                        # every key, value, default
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

from sharding.launch import choose_device, process_group
from storage.cli import HelpFormatter, add_command, version_text
from trainer import calibration, classify
from trainer.config import RunConfig, describe, load_config
from trainer.evaluate import evaluate_run, rank_filters
from trainer.loop import train
from trainer.report import LINK_MAX_FACTS

RUNS_DIR = Path("runs")
ROOT = Path(__file__).parents[1]


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _run_dir(path: Path | None) -> Path | None:
    """Refuse an output directory that is an existing file."""
    if path is not None and path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: is a file, not a directory")
    return path


def _config_args(cmd: argparse.ArgumentParser, out: str | None = "run directory (resumes if it holds a checkpoint)"):
    cmd.add_argument("--config", type=Path, help="YAML run config (configs/; `nvkg configs` prints where they are)")
    cmd.add_argument("--dataset", help="bundled dataset name or directory; overrides data.dataset")
    cmd.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. optim.lr=0.003 (repeatable; `config --show` lists them)",
    )
    if out is not None:
        cmd.add_argument("--out", type=Path, help=out)


def _parser(prog: str = "python -m trainer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Variational knowledge-graph embeddings", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="COMMAND --help: its options"
    )
    _config_args(
        add_command(commands, "train", "train a model and evaluate it (plain or under torchrun)"),
        out="run directory, resumed if it holds a checkpoint (default: runs/DATASET-LATENT-SCORER-TIME)",
    )
    eval_cmd = add_command(commands, "evaluate", "evaluate a run directory's best checkpoint")
    eval_cmd.add_argument("run_dir", type=Path, help="a run directory written by train")
    eval_cmd.add_argument(
        "--samples",
        type=_count(0),
        help="average the predictive probability over S samples (default: the run's eval.num_samples)",
    )
    ray_cmd = add_command(
        commands, "ray-train", "train with Ray Train (workers, CPUs, GPUs from the config's launch section)"
    )
    _config_args(
        ray_cmd, out="run directory on storage every worker reaches (default: runs/DATASET-LATENT-SCORER-TIME)"
    )
    predict_cmd = add_command(commands, "predict", "top-k completions of a query, with their uncertainty")
    predict_cmd.add_argument("run_dir", type=Path, help="a run directory written by train")
    predict_cmd.add_argument("--head", help="known head: predict tails")
    predict_cmd.add_argument("--tail", help="known tail: predict heads")
    predict_cmd.add_argument("--relation", required=True, help="the query's relation, by name")
    predict_cmd.add_argument("--top-k", type=_count(1), default=10, help="completions to list")
    predict_cmd.add_argument("--samples", type=_count(1), default=100, help="Monte-Carlo draws of the embeddings")
    predict_cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report_cmd = add_command(commands, "report", "uncertainty figures (PNG) and report.json")
    report_cmd.add_argument("run_dir", type=Path, help="a run directory written by train")
    report_cmd.add_argument(
        "--out", type=Path, help="directory for the figures and report.json (default: RUN_DIR/report)"
    )
    report_cmd.add_argument("--samples", type=_count(1), default=100, help="Monte-Carlo draws of the embeddings")
    report_cmd.add_argument("--fact", type=_count(0), default=0, help="index of the test fact drawn in fact.png")
    report_cmd.add_argument(
        "--link-samples", type=_count(1), help="draws for the link-prediction confidence study (default: --samples)"
    )
    report_cmd.add_argument(
        "--link-facts",
        type=_count(1),
        default=LINK_MAX_FACTS,
        help="test facts of the link-prediction confidence study, a seeded sample beyond (default: %(default)s); "
        "its cost is facts x entities x (1 + draws)",
    )
    calibrate_cmd = add_command(commands, "calibrate", "fit fact probabilities on valid: RUN_DIR/calibration.json")
    calibrate_cmd.add_argument("run_dir", type=Path, help="a run directory written by train")
    calibrate_cmd.add_argument(
        "--method",
        choices=calibration.CHOICES,
        default=calibration.DEFAULT_METHOD,
        help="auto (default): per measure, the method below with the lowest out-of-fold ECE on validation; "
        "platt-isotonic: Platt per relation, then a monotone map of its output; platt: a logistic map of the "
        "score; isotonic: a monotone map",
    )
    scope = calibrate_cmd.add_mutually_exclusive_group()
    scope.add_argument(
        "--per-relation",
        dest="per_relation",
        action="store_true",
        default=None,
        help="Platt scaling per relation, shrunk toward the global fit (the default but for isotonic)",
    )
    scope.add_argument("--global", dest="per_relation", action="store_false", help="one map for every relation")
    calibrate_cmd.add_argument("--seed", type=_count(0), help="negatives and draws (default: the run's train.seed)")
    calibrate_cmd.add_argument("--samples", type=_count(1), default=100, help="Monte-Carlo draws of the embeddings")
    classify_cmd = add_command(commands, "classify", "triple classification: thresholds on valid, accuracy on test")
    classify_cmd.add_argument("run_dir", type=Path, help="a run directory written by train")
    classify_cmd.add_argument("--seed", type=_count(0), help="sampled negatives (default: the run's train.seed)")
    classify_cmd.add_argument(
        "--measure", choices=(classify.AUTO, *classify.MEASURES), default=classify.AUTO,
        help="what a fact's probability is: sigmoid(score) (magnitude), the 1-vs-all model's own probabilities of "
        "its two answers (likelihood), Platt scaling per relation of both and the reciprocal fact's magnitude "
        "(combined), or the one more accurate on validation facts its thresholds were not chosen on (auto)",
    )  # fmt: skip
    export_cmd = add_command(commands, "export", "means and variances with names, to Parquet or TSV")
    export_cmd.add_argument("run_dir", type=Path, help="a run directory written by train")
    export_cmd.add_argument("--out", type=Path, required=True, help="the file to write")
    export_cmd.add_argument("--format", choices=("parquet", "tsv"), default="parquet", help="file format")
    submit_cmd = add_command(commands, "submit", "submit a ray-train run to a Ray cluster as a job")
    submit_cmd.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="the cluster's job server (dashboard) URL; the default is $RAY_ADDRESS if set",
    )
    submit_cmd.add_argument("--wait", action="store_true", help="wait for the job and fail if it fails")
    submit_cmd.add_argument("--timeout", type=_seconds, default=3600.0, help="seconds to wait with --wait")
    submit_cmd.add_argument("--grafana", default="http://127.0.0.1:3000/d/nvkg", help="dashboard URL to print")
    _config_args(submit_cmd, out="run directory on storage the cluster's workers reach (required)")
    config_cmd = add_command(commands, "config", "check a config (YAML and --set overrides); --show prints every key")
    config_cmd.add_argument("--show", action="store_true", help="print every key: its value, default and meaning")
    _config_args(config_cmd, out=None)
    tune_cmd = add_command(commands, "tune", "search config values with Ray Tune and ASHA (trainer/tune.py)")
    _config_args(tune_cmd, out="where trials, best.yaml, best.json and trials.json go (default: runs/tune-TIME)")
    tune_cmd.add_argument(
        "--space",
        type=Path,
        required=True,
        help="YAML search space: section.key: {loguniform|uniform|choice|grid|...: [...]} or a value",
    )
    tune_cmd.add_argument("--trials", type=_count(1), default=8, help="samples of the space (each grid combination)")
    tune_cmd.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster (auto, local, HOST:PORT, ray://HOST:10001); none: the Ray last started on this machine "
        "if one runs, else a new local one (ray.init)",
    )
    return parser


def _default_out(dataset: str, latent: str, scorer: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return RUNS_DIR / f"{Path(dataset).name}-{latent}-{scorer}-{stamp}"


def _summary(metrics: dict) -> str:
    test = metrics["test"]
    rows = [f"{kind:9s} " + "  ".join(f"{k}={v:.4f}" for k, v in test[kind].items()) for kind in ("filtered", "raw")]
    return "\n".join(["test metrics:", *rows, f"dropped facts (unseen entities): {metrics['dropped_facts']}"])


def _load(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    if args.dataset is not None:
        # A name or path as written: quoted, so YAML reads neither "#" as a comment nor "2024" as a number.
        overrides.append(f"data.dataset={json.dumps(args.dataset)}")
    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> None:
    config = _load(args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and args.out is None:
        raise ValueError(f"WORLD_SIZE={world_size}: pass --out, a run directory every worker can reach")
    out_dir = _run_dir(args.out) or _default_out(config.data.dataset, config.model.latent, config.model.scorer)
    device = choose_device(config.train.device)
    with process_group(
        config.sharding.backend, device, config.sharding.timeout_minutes, config.sharding.shared_memory
    ) as exchange:
        lead = exchange.rank == 0
        if lead:
            print(f"run directory: {out_dir} ({exchange.world_size} worker(s))", flush=True)
        metrics = train(config, out_dir, exchange=exchange, device=device)
        if lead:
            print(f"run directory: {out_dir}")
            print(_summary(metrics))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from trainer.runs import load_run, load_run_config

    overrides = [] if args.samples is None else [f"eval.num_samples={args.samples}"]
    config = load_run_config(args.run_dir, overrides)
    device = choose_device(config.train.device)
    with process_group(
        config.sharding.backend, device, config.sharding.timeout_minutes, config.sharding.shared_memory
    ) as exchange:
        run = load_run(args.run_dir, config=config, exchange=exchange, device=device)
        filters = rank_filters(run.dataset, (run.model.entities.lo, run.model.entities.hi))
        metrics = evaluate_run(
            config.eval, config.train.seed, run.model, run.dataset, filters, progress=config.train.progress
        )
        if exchange.rank == 0:
            print(json.dumps(metrics, indent=2))


def cmd_ray_train(args: argparse.Namespace) -> None:
    import ray

    from trainer.ray_launch import fit

    config = _load(args)
    out_dir = _run_dir(args.out) or _default_out(config.data.dataset, config.model.latent, config.model.scorer)
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    print(f"run directory: {out_dir} ({config.launch.workers} Ray Train worker(s))", flush=True)
    fit(config, out_dir)
    print(_summary(json.loads((Path(out_dir) / "metrics.json").read_text())))


def _job_sources(scratch: Path) -> Path:
    """The job's working_dir (Ray uploads it on submit): a checkout's root, or for an installed package a copy
    of its three packages in ``scratch``, since the directory they are installed in holds every other
    installed library too."""
    if (ROOT / "pyproject.toml").is_file():
        return ROOT
    for package in ("trainer", "sharding", "storage"):
        shutil.copytree(ROOT / package, scratch / package, ignore=shutil.ignore_patterns("__pycache__"))
    return scratch


def cmd_submit(args: argparse.Namespace) -> None:
    from trainer.ray_launch import submit, wait_for

    if args.out is None:
        raise ValueError("submit: pass --out, a run directory on storage the cluster's workers reach")
    forwarded = [
        *(["--config", str(args.config)] if args.config else []),
        *(["--dataset", args.dataset] if args.dataset else []),
        *[item for override in args.overrides for item in ("--set", override)],
        *["--out", str(args.out)],
    ]
    config = _load(args)  # refuse a bad config here, not on the cluster
    with tempfile.TemporaryDirectory(prefix="nvkg-job-") as scratch:
        job_id = submit(args.address, forwarded, working_dir=_job_sources(Path(scratch)))
    print(f"submitted job {job_id} to {args.address}", flush=True)
    print(f"grafana: {args.grafana}?var-run={config.metrics.run or Path(args.out).name}", flush=True)
    if args.wait:
        wait_for(args.address, job_id, args.timeout)
        print(f"job {job_id} succeeded")


def cmd_predict(args: argparse.Namespace) -> None:
    from trainer.report import format_predictions, predict
    from trainer.runs import load_run

    result = predict(load_run(args.run_dir), head=args.head, relation=args.relation, tail=args.tail,
                     top_k=args.top_k, samples=args.samples)  # fmt: skip
    print(json.dumps(result, indent=2) if args.json else format_predictions(result))


def cmd_report(args: argparse.Namespace) -> None:
    from trainer.report import format_calibration, write_report
    from trainer.runs import load_run

    run = load_run(args.run_dir)
    out = _run_dir(args.out) or args.run_dir / "report"
    summary = write_report(
        run, out, samples=args.samples, seed=run.config.train.seed, fact_index=args.fact,
        link_samples=args.link_samples, link_facts=args.link_facts,
    )  # fmt: skip
    print(f"wrote {out}: {', '.join(summary['figures'].values())}, report.json")
    for key in ("precision_coverage_area", "selective_prediction_area"):
        print(f"{key}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary[key].items()))
    print(format_calibration(summary))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from trainer.calibration import calibrate, format_calibrated
    from trainer.runs import load_run

    run = load_run(args.run_dir)
    seed = run.config.train.seed if args.seed is None else args.seed
    path, stored = calibrate(run, method=args.method, per_relation=args.per_relation, seed=seed, samples=args.samples)
    print(format_calibrated(path, stored))


def cmd_classify(args: argparse.Namespace) -> None:
    from trainer.classify import format_classification, write_classification
    from trainer.runs import load_run

    run = load_run(args.run_dir)
    out = args.run_dir / "classification.json"
    seed = run.config.train.seed if args.seed is None else args.seed
    print(format_classification(write_classification(run, out, seed=seed, measure=args.measure)))
    print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from trainer.report import export
    from trainer.runs import load_run

    if args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a directory; name the file to write")
    print(f"wrote {export(load_run(args.run_dir), args.out, args.format)}")


def _scalar(value) -> str:
    """A config value as YAML writes it (null, true, 0.001, a string unquoted)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def cmd_config(args: argparse.Namespace) -> None:
    config = _load(args)
    keys = describe(config)
    changed = [k for k in keys if k.value != k.default]
    if args.show:
        for k in keys:
            print(f"{k.key} = {_scalar(k.value)}  (default: {_scalar(k.default)})")
            print(textwrap.fill(k.doc, width=100, initial_indent="    ", subsequent_indent="    "))
        return
    print(f"{args.config or 'the defaults'}: valid; {len(changed)} of {len(keys)} keys differ from the defaults")
    for k in changed:
        print(f"  {k.key} = {_scalar(k.value)}  (default: {_scalar(k.default)})")


def cmd_tune(args: argparse.Namespace) -> None:
    import ray

    from trainer.tune import load_space, search

    config = _load(args)
    space = load_space(args.space, config)  # refuse a bad space before Ray starts
    out = _run_dir(args.out) or RUNS_DIR / f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    ray.init(address=args.address, log_to_driver=True)
    print(f"tune: {args.trials} trial(s) of {', '.join(space)} into {out}", flush=True)
    best = search(config, space, out, trials=args.trials)
    values = ", ".join(f"{key}={_scalar(value)}" for key, value in best["params"].items())
    print(f"best: valid MRR {best['valid_mrr']:.4f} with {values}")
    print(f"best run directory: {best['run_dir']}")
    print(f"best config: {Path(out).resolve() / 'best.yaml'}")


def main(argv: list[str] | None = None, prog: str = "python -m trainer") -> int:
    args = _parser(prog).parse_args(argv)
    commands = {
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "ray-train": cmd_ray_train,
        "submit": cmd_submit,
        "predict": cmd_predict,
        "report": cmd_report,
        "calibrate": cmd_calibrate,
        "export": cmd_export,
        "classify": cmd_classify,
        "config": cmd_config,
        "tune": cmd_tune,
    }
    try:
        commands[args.command](args)
    except (ValueError, OSError) as err:  # OSError names its file: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
