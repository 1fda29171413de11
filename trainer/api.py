"""The Python API, for notebooks and scripts: the ``nvkg`` commands as functions, one code path with them.

    from trainer import api

    result = api.train(api.configs_dir() / "small-nations.yaml", "runs/nations", overrides={"train.epochs": 20})
    run = api.load_run(result.run_dir)
    api.calibrate(run)                                    # RUN/calibration.json
    answers = api.predict(run, head="usa", relation="embassy", top_k=5)
    print(api.format_predictions(answers))
    api.export(run, "embeddings.parquet")

Each function wraps what its command runs (trainer/cli.py): ``train`` is ``nvkg train``, ``predict`` is
``nvkg predict --json`` and so on, with the same defaults; results are the dicts the commands print as
JSON or write to the run directory. A runnable walk-through is examples/notebook.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sharding.launch import choose_device, process_group
from trainer import calibration, loop, runs
from trainer import classify as classification
from trainer import report as reporting
from trainer.config import RunConfig, _set_path, config_from_dict, load_config, to_dict
from trainer.entry import configs_dir
from trainer.report import format_predictions
from trainer.runs import Run

__all__ = [
    "Run",
    "RunConfig",
    "Trained",
    "calibrate",
    "classify",
    "configs_dir",
    "export",
    "format_predictions",
    "load_run",
    "make_config",
    "predict",
    "report",
    "train",
]

RunLike = Run | str | Path
"""A loaded run, or its directory (loaded on the CPU for the call)."""


def make_config(
    config: RunConfig | str | Path | None = None,
    *,
    dataset: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """A validated run config: ``config`` (a ``RunConfig``, a YAML file, or None for the defaults), its
    dataset replaced by ``dataset`` (a bundled name such as ``"nations"`` or a directory) and its keys by
    ``overrides`` (``{"section.key": value}``, as ``--set``). ``config`` itself is left unchanged.

    >>> cfg = make_config(dataset="nations", overrides={"model.dim": 32, "train.epochs": 5})
    >>> cfg.model.dim, cfg.data.dataset
    (32, 'nations')

    Unknown keys and wrong types are refused with a ``ValueError`` naming the key.
    """
    base = config if isinstance(config, RunConfig) else load_config(None if config is None else Path(config))
    tree = to_dict(base)  # a deep copy
    changes = dict(overrides or {})
    if dataset is not None:
        changes["data.dataset"] = dataset
    for key, value in changes.items():
        _set_path(tree, key, str(value) if isinstance(value, Path) else value)
    return config_from_dict(tree)


@dataclass(frozen=True)
class Trained:
    """What ``train`` returns."""

    run_dir: Path
    """The run directory: config.yaml, log.jsonl, metrics.json and the checkpoints."""
    metrics: dict[str, Any]
    """metrics.json: valid and test MRR, MR, Hits@k (``metrics["test"]["filtered"]["mrr"]``), raw and
    filtered, with train_seconds, best_epoch, epochs_trained and the resolved config."""


def train(
    config: RunConfig | str | Path | None,
    out_dir: str | Path,
    *,
    dataset: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Trained:
    """``nvkg train``: train the config (as ``make_config`` builds it from the same arguments), evaluate
    its best checkpoint on valid and test, and return the metrics and run directory. A directory that
    already holds a checkpoint of the same run is resumed. Under torchrun every worker calls this.

    Example: ``train(configs_dir() / "small-nations.yaml", "runs/nations", overrides={"train.epochs": 20})``
    """
    resolved = make_config(config, dataset=dataset, overrides=overrides)
    out = Path(out_dir)
    device = choose_device(resolved.train.device)
    with process_group(
        resolved.sharding.backend, device, resolved.sharding.timeout_minutes, resolved.sharding.shared_memory
    ) as exchange:
        metrics = loop.train(resolved, out, exchange=exchange, device=device)
    return Trained(out, metrics)


def load_run(run_dir: str | Path) -> Run:
    """A trained run on the CPU: ``run.config``, ``run.dataset`` (``run.dataset.test``: [N, 3] ids of
    (head, relation, tail); ``run.dataset.names("entities")["name"]``: their names) and ``run.model``,
    from the best checkpoint (else the latest). The functions below take a run or its directory; pass
    the run to load it once.

    Example: ``run = load_run("runs/nations")``
    """
    return runs.load_run(Path(run_dir))


def _run(run: RunLike) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def predict(
    run: RunLike,
    *,
    relation: str,
    head: str | None = None,
    tail: str | None = None,
    top_k: int = 10,
    samples: int = 100,
) -> dict[str, Any]:
    """``nvkg predict``: the ``top_k`` completions of (head, relation, ?) or (?, relation, tail) (give
    exactly one of ``head`` and ``tail``), by name. Each row of ``result["predictions"]`` has the answer
    (``"tail"`` or ``"head"``), ``probability`` (sigmoid of the means' score), ``mc_mean`` and ``mc_std``
    over ``samples`` draws, ``known``; ``calibrated_probability`` and ``calibrated_mc_mean`` when the run
    is calibrated (``calibrate``); ``softmax_probability`` for a 1-vs-all model. ``result["query"]`` says
    whether the probabilities are calibrated. ``format_predictions(result)`` is the command's table.

    Example: ``predict(run, head="usa", relation="embassy", top_k=3)["predictions"][0]["tail"]``
    """
    if top_k < 1 or samples < 1:
        raise ValueError(f"top_k={top_k}, samples={samples}: both must be at least 1")
    return reporting.predict(_run(run), head=head, relation=relation, tail=tail, top_k=top_k, samples=samples)


def calibrate(
    run: RunLike,
    *,
    method: Literal["auto", "platt-isotonic", "platt", "isotonic"] = "auto",
    per_relation: bool | None = None,
    seed: int | None = None,
    samples: int = 100,
) -> dict[str, Any]:
    """``nvkg calibrate``: fit a map from score to the probability that a fact is true on validation
    (by default, per measure, the method with the lowest out-of-fold ECE on validation: Platt scaling per
    relation then isotonic regression, ``"platt"`` alone, where ``per_relation=False`` makes it one map,
    or ``"isotonic"``, one map), judge it on
    test, and store it as RUN/calibration.json, which ``predict``, ``classify`` and ``report`` then use.
    Returns that file's contents: ``result["test"]["magnitude"]["after"]["ece"]`` and so on. ``seed``
    (default: the run's train.seed) draws the negatives and samples.

    Example: ``calibrate(run)["test"]["magnitude"]["after"]["ece"]``
    """
    loaded = _run(run)
    chosen = loaded.config.train.seed if seed is None else seed
    _, stored = calibration.calibrate(loaded, method=method, per_relation=per_relation, seed=chosen, samples=samples)
    return stored


def classify(
    run: RunLike, *, seed: int | None = None, out: str | Path | None = None, measure: str = "auto"
) -> dict[str, Any]:
    """``nvkg classify``: triple classification with per-relation thresholds chosen on validation, accuracy
    and F1 on test (``result["test"]["accuracy"]``), and at 0.5 of the calibrated probability when the
    run is calibrated (``result["calibrated"]``). Written to ``out`` (default RUN/classification.json).
    ``measure``: ``magnitude`` (sigmoid(score)), ``likelihood`` (a 1-vs-all model's own probabilities of the
    fact's two answers), ``combined`` (Platt scaling per relation of both and the reciprocal fact's
    magnitude, fitted on validation) or ``auto``, the one more accurate on validation facts its thresholds
    were not chosen on (``result["measure"]``).

    Example: ``classify(run)["test"]["f1"]``
    """
    loaded = _run(run)
    assert loaded.directory is not None  # load_run sets it
    chosen = loaded.config.train.seed if seed is None else seed
    target = Path(out) if out is not None else loaded.directory / "classification.json"
    return classification.write_classification(loaded, target, seed=chosen, measure=measure)


def export(run: RunLike, out: str | Path, *, fmt: Literal["parquet", "tsv"] | None = None) -> Path:
    """``nvkg export``: every entity's and relation's kind, id, name, train frequency, mean and variance
    to ``out``, as Parquet or TSV (``fmt``; default: TSV when ``out`` ends in ``.tsv``, else Parquet). Returns
    ``out``; ``pandas.read_parquet(out)`` reads it back.

    Example: ``export(run, "embeddings.tsv")``
    """
    target = Path(out)
    if target.is_dir():
        raise ValueError(f"export: {target} is a directory; name the file to write")
    chosen = fmt or ("tsv" if target.suffix == ".tsv" else "parquet")
    return reporting.export(_run(run), target, chosen)


def report(
    run: RunLike,
    out_dir: str | Path | None = None,
    *,
    samples: int = 100,
    seed: int | None = None,
    fact: int = 0,
    link_samples: int | None = None,
    link_facts: int = reporting.LINK_MAX_FACTS,
) -> dict[str, Any]:
    """``nvkg report``: the uncertainty report (docs/uncertainty.md), PNG figures and report.json in
    ``out_dir`` (default RUN/report): variance against frequency, precision against coverage, the
    reliability diagram before and after calibration, the confidence study (``link_samples`` draws, default
    ``samples``, of at most ``link_facts`` test facts), and test fact ``fact`` drawn.
    Returns report.json's summary (``result["figures"]`` names the PNG files).

    Example: ``report(run)["precision_coverage_area"]``
    """
    loaded = _run(run)
    assert loaded.directory is not None  # load_run sets it
    target = Path(out_dir) if out_dir is not None else loaded.directory / "report"
    chosen = loaded.config.train.seed if seed is None else seed
    return reporting.write_report(
        loaded, target, samples=samples, seed=chosen, fact_index=fact, link_samples=link_samples,
        link_facts=link_facts,
    )  # fmt: skip
