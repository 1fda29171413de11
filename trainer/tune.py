"""``tune``: a Ray Tune search over config fields; every trial is an ordinary ``train`` run.

The search space is a YAML file of dotted config keys, each a distribution or a fixed value:

    optim.lr: {loguniform: [1.0e-3, 1.0e-1]}
    model.dim: {choice: [16, 32]}
    objective.kl_weight: {uniform: [0.01, 1.0]}
    train.batch_size: {qrandint: [256, 2048, 256]}
    model.latent: {grid: [lim, lfm]}          # every value, each combination --trials times (Ray Tune's rule)
    train.epochs: 50                           # the same in every trial

Each trial runs ``trainer.loop.train`` at world size 1 in its own Ray actor (``launch.cpus_per_worker`` CPUs,
``launch.gpus_per_worker`` GPUs), writing OUT/trials/TRIAL_ID like any run directory. Its reporter hands
every periodic validation (``train.eval_every``) to Tune, and ASHA stops the trials whose validation MRR
trails at each rung (grace period one evaluation, the top half promoted), so a trial's evaluations are its
time axis. OUT gets ``best.yaml`` (the best trial's config, loadable with ``--config``), ``best.json`` (its
run directory, validation MRR and sampled values), ``trials.json`` (every trial) and ``ray/`` (Tune's own
records). On a cluster OUT must be storage every node reaches, as for ``ray-train``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharding.exchange import LocalExchange
from storage.atomic import atomic_write_json
from storage.dataset import resolve_store
from trainer import checkpoint
from trainer.config import RunConfig, config_from_dict, read_yaml, save_config, to_dict

# name: (number of arguments, whether they must be integers); choice and grid take a list of values.
RANGES = {
    "uniform": (2, False),
    "quniform": (3, False),
    "loguniform": (2, False),
    "qloguniform": (3, False),
    "randint": (2, True),
    "qrandint": (3, True),
    "lograndint": (2, True),
}
LISTS = ("choice", "grid")
METRIC = "valid_mrr"
CHECK_ALL = 1_000
"""Values of one integer range, and combinations of all the keys' values, that ``load_space`` tries each of."""


@dataclass(frozen=True)
class Dimension:
    """One key of the search space: a distribution (``kind`` with its ``args``), or ``fixed`` with one value."""

    kind: str
    args: tuple[Any, ...]

    def edges(self) -> list[Any]:
        """Values that span what the dimension can draw: every listed value, or both ends of a range (as
        floats for the distributions that draw floats, e.g. 2.0 from uniform over [1, 3])."""
        if self.kind in LISTS or self.kind == "fixed":
            return list(self.args)
        lo, hi = self.args[:2]
        if not RANGES[self.kind][1]:
            return [float(lo), float(hi)]
        return [lo, hi - 1 if self.kind in ("randint", "lograndint") else hi]  # randint excludes hi

    def checked(self) -> list[Any]:
        """What ``load_space`` tries: every value an integer range can draw when there are at most
        ``CHECK_ALL`` (an odd model.dim inside [4, 9) is refused for ComplEx), else ``edges``."""
        if self.kind not in ("randint", "qrandint", "lograndint"):
            return self.edges()
        lo, hi = self.args[:2]
        step = self.args[2] if self.kind == "qrandint" else 1
        values = range(lo, hi + (1 if self.kind == "qrandint" else 0), step)
        return list(values) if len(values) <= CHECK_ALL else self.edges()

    def domain(self) -> Any:
        """Ray Tune's object for it."""
        from ray import tune

        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


def _number(value: Any, integer: bool) -> float | int:
    if isinstance(value, str) and not integer:  # YAML 1.1 reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ValueError(f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def _dimension(spec: Any) -> Dimension:
    if not isinstance(spec, dict):
        return Dimension("fixed", (spec,))
    if len(spec) != 1:
        raise ValueError(f"expected one of {', '.join([*RANGES, *LISTS])} with its arguments, got {spec!r}")
    ((kind, args),) = spec.items()
    if kind in LISTS:
        if not isinstance(args, list) or not args:
            raise ValueError(f"{kind}: expected a non-empty list of values, got {args!r}")
        return Dimension(kind, tuple(args))
    if kind not in RANGES:
        raise ValueError(f"unknown distribution {kind!r}: expected one of {', '.join([*RANGES, *LISTS])}")
    count, integer = RANGES[kind]
    if not isinstance(args, list) or len(args) != count:
        raise ValueError(f"{kind}: expected a list of {count} numbers, got {args!r}")
    numbers = tuple(_number(a, integer) for a in args)
    if not numbers[0] < numbers[1]:
        raise ValueError(f"{kind}: the lower bound {numbers[0]} is not below the upper bound {numbers[1]}")
    if kind.startswith("log") and numbers[0] <= 0:
        raise ValueError(f"{kind}: the lower bound must be positive, got {numbers[0]}")
    if count == 3 and numbers[2] <= 0:
        raise ValueError(f"{kind}: the step q must be positive, got {numbers[2]}")
    return Dimension(kind, numbers)


def _with(tree: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping with ``section.field`` values replaced."""
    tree = copy.deepcopy(tree)
    for key, value in params.items():
        section, name = key.split(".")
        tree[section][name] = value
    return tree


def load_space(path: Path, base: RunConfig) -> dict[str, Dimension]:
    """Read and check a search space: every key a config field, every value it can draw valid in ``base``."""
    raw = read_yaml(path, "search space")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a mapping of section.key to a distribution or a value")
    tree, space = to_dict(base), {}
    for key, spec in raw.items():
        section, _, name = str(key).partition(".")
        if not isinstance(tree.get(section), dict) or name not in tree[section]:
            raise ValueError(f"{path}: {key}: not a config key (expected section.key, e.g. optim.lr)")
        try:
            space[key] = _dimension(spec)
            for value in space[key].checked():
                config_from_dict(_with(tree, {key: value}))
        except ValueError as err:
            raise ValueError(f"{path}: {key}: {err}") from None
    # Keys that are valid alone may not be together (model.scorer=complex with an odd model.dim).
    keys = list(space)
    combinations = math.prod(len(space[k].checked()) for k in keys)
    if len(keys) > 1 and combinations <= CHECK_ALL:
        for values in itertools.product(*(space[k].checked() for k in keys)):
            try:
                config_from_dict(_with(tree, dict(zip(keys, values, strict=True))))
            except ValueError as err:
                drawn = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values, strict=True))
                raise ValueError(f"{path}: a trial of {drawn}: {err}") from None
    try:
        most_evaluations(base, space)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return space


class TuneReporter(checkpoint.Reporter):
    """Checkpoints in the trial's run directory, as a plain run; each periodic validation goes to Tune."""

    best: float = -math.inf

    def evaluated(self, record: dict) -> None:
        from ray import tune

        # A NaN evaluation is the worst, as the loop counts it (never the best).
        mrr = record["valid_mrr"] if math.isfinite(record["valid_mrr"]) else 0.0
        self.best = max(self.best, mrr)
        tune.report({METRIC: mrr, "best_valid_mrr": self.best, "epoch": record["epoch"]})


def run_trial(params: dict[str, Any], *, base: dict[str, Any], trials_dir: str) -> None:
    """What each Tune trial runs: ``train`` on the base config with the trial's values."""
    from ray import tune

    from trainer.loop import train

    out_dir = Path(trials_dir) / tune.get_context().get_trial_id()
    train(config_from_dict(_with(base, params)), out_dir, reporter=TuneReporter(out_dir, LocalExchange()))


def most_evaluations(config: RunConfig, space: dict[str, Dimension]) -> int:
    """The most periodic validations a trial can make (every ``eval_every`` epochs and after the last): at
    the most epochs and the most frequent evaluation ``space`` can draw, else ``config``'s. ASHA's rungs
    are laid out up to it."""
    epochs = space["train.epochs"].edges() if "train.epochs" in space else [config.train.epochs]
    every = space["train.eval_every"].edges() if "train.eval_every" in space else [config.train.eval_every]
    if not all(every):
        raise ValueError("tune: train.eval_every=0 evaluates only at the end; ASHA compares trials as they go")
    return max(math.ceil(e / v) for e in epochs for v in every)


def search(config: RunConfig, space: dict[str, Dimension], out: Path, *, trials: int) -> dict[str, Any]:
    """Run ``trials`` samples of ``space`` on the Ray cluster this process is connected to; write OUT's files
    and return best.json's content."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    max_t = most_evaluations(config, space)
    out = Path(out).resolve()
    # Trials run in other processes (and directories): give them the converted dataset's absolute path, and
    # convert it here, once, rather than in every trial at the same time.
    base = to_dict(config)
    base["data"]["dataset"] = str(resolve_store(config.data.dataset, config.data.cache_dir).resolve())
    base["data"]["cache_dir"] = str(Path(config.data.cache_dir).expanduser().resolve())
    # No progress bars in actors' logs; concurrent trials would contend for one metrics port.
    base["train"]["progress"], base["metrics"]["port"] = False, None
    trainable = tune.with_parameters(run_trial, base=base, trials_dir=str(out / "trials"))
    resources = {"cpu": config.launch.cpus_per_worker, "gpu": config.launch.gpus_per_worker}
    # stop_last_trials=False: a trial that reaches max_t runs on to its end (metrics.json), not stopped there.
    scheduler = ASHAScheduler(max_t=max_t, grace_period=1, reduction_factor=2, stop_last_trials=False)
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={key: dimension.domain() for key, dimension in space.items()},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=trials,
            scheduler=scheduler,
        ),
        run_config=tune.RunConfig(name="search", storage_path=str(out / "ray"), verbose=1),
    )
    grid = tuner.fit()
    summary = [_trial_summary(grid[i], out) for i in range(len(grid))]
    atomic_write_json(out / "trials.json", summary)
    ranked = [t for t in summary if "error" not in t and t["valid_mrr"] is not None]
    if not ranked:
        errors = "; ".join(t.get("error", "no evaluation reported")[:500] for t in summary)
        raise ValueError(f"tune: no trial reported a validation MRR ({errors})")
    best = max(ranked, key=lambda t: t["valid_mrr"])
    save_config(config_from_dict(_with(to_dict(config), best["params"])), out / "best.yaml")
    chosen = {key: best[key] for key in ("trial_id", "run_dir", "valid_mrr", "params")}
    atomic_write_json(out / "best.json", {**chosen, "config": str(out / "best.yaml")})
    return chosen


def _trial_summary(result: Any, out: Path) -> dict[str, Any]:
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name
    run_dir = out / "trials" / str(trial_id)
    summary = {
        "trial_id": trial_id,
        "params": dict(result.config or {}),
        "valid_mrr": metrics.get("best_valid_mrr"),
        "evaluations": metrics.get("training_iteration", 0),
        "epoch": metrics.get("epoch"),
        "run_dir": str(run_dir),
        # A trial ASHA stopped leaves a run directory without metrics.json (its checkpoints are there).
        "completed": (run_dir / "metrics.json").is_file(),
    }
    if summary["completed"]:
        summary["test_mrr"] = json.loads((run_dir / "metrics.json").read_text())["test"]["filtered"]["mrr"]
    if result.error is not None:
        summary["error"] = str(result.error)
    return summary
