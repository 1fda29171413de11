"""The training function. A plain run is world size 1 of the distributed path: the loop only hands
batches to the step, and the model's tables do the routing, so torchrun, Ray Train and a plain process
all run ``train``.

A global step takes one batch from each of ``sharding.streams`` data streams; a rank handles the
streams ``rank, rank + W, ...``. Randomness is keyed by (seed, epoch, step, stream) and per-row noise
blocks, never by rank (sharding/rng.py), so a run's numbers depend on the streams, not on how many
workers share them.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sharding.exchange import Exchange, LocalExchange
from sharding.launch import choose_device, pin_local_cpus
from storage.atomic import atomic_write_json
from storage.dataset import KGDataset, load_data
from storage.faults import fault_point
from trainer import checkpoint, provenance
from trainer.config import OptimConfig, RunConfig, save_config, to_dict
from trainer.evaluate import FilterIndex, evaluate_run, evaluate_split, rank_filters
from trainer.logger import RunLogger
from trainer.metrics import start_exporter
from trainer.model import COLLAPSED_LOGVAR, KGModel, build_model
from trainer.objective import kl_share
from trainer.step import Divergence, Step


def train(
    config: RunConfig,
    out_dir: Path,
    dataset: KGDataset | None = None,
    exchange: Exchange | None = None,
    reporter: checkpoint.Reporter | None = None,
    device: torch.device | None = None,
) -> dict:
    """Train (resuming from the latest checkpoint when there is one), evaluate, write metrics.json.

    Every rank calls this; rank 0 writes the logs and metrics. ``reporter`` hands checkpoints to a
    launcher (Ray Train) instead of only to ``out_dir``; ``device`` is the one a launcher assigned
    (default: ``choose_device(config.train.device)``).
    """
    run = Training.set_up(config, Path(out_dir), dataset, exchange or LocalExchange(), reporter, device)
    try:
        while run.state.epoch < config.train.epochs and not run.patience_spent:
            try:
                record = run.train_epoch(run.state.epoch)
            except Divergence as err:
                run.roll_back(err)
                continue
            if run.end_epoch(record):
                break
    except BaseException:
        run.logger.close()  # the endpoint and its discovery file go with the run that failed
        raise
    return run.close()


@contextmanager
def young_objects_collected() -> Iterator[None]:
    """Inside, the cyclic garbage collector passes over the objects made inside only: each step makes a few
    hundred (tensors, tuples, closures), so collections run every few steps, and a full one walked every
    object of the process (~200k after set-up: modules, configs, the data's tables) for 1-3% of a step at
    PBG's sampling on WN18RR. The young generations are collected first, so the garbage made since the last steps
    (evaluation, checkpoints) is not carried through them; the rest is frozen (``gc.freeze``, which like
    ``gc.unfreeze`` moves a list whole) and left to the collector as usual once the block is left (with any
    objects a caller froze)."""
    gc.collect(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Schedule:
    """Which batches this rank feeds each global step of an epoch."""

    def __init__(
        self, dataset: KGDataset, exchange: Exchange, *, streams: int | None, batch_size: int, seed: int, prefetch: int
    ):
        world = exchange.world_size
        self.num_streams = streams or world
        if self.num_streams % world:
            raise ValueError(f"sharding.streams={self.num_streams} is not a multiple of the world size {world}")
        self.streams = list(range(exchange.rank, self.num_streams, world))
        self.batch_size = batch_size // self.num_streams
        if self.batch_size == 0:
            raise ValueError(f"train.batch_size={batch_size} is smaller than {self.num_streams} streams")
        self.dataset, self.seed, self.prefetch = dataset, seed, prefetch
        self.num_steps = max(dataset.num_batches(self.batch_size, s, self.num_streams) for s in range(self.num_streams))

    def epoch(self, epoch: int) -> Iterator[list[tuple[int, torch.Tensor]]]:
        """Per step, [(stream, positives)] for this rank; a stream that ran out gives an empty batch."""
        readers = [
            self.dataset.batches(
                batch_size=self.batch_size,
                epoch=epoch,
                seed=self.seed,
                rank=stream,
                world_size=self.num_streams,
                prefetch=self.prefetch,
            )
            for stream in self.streams
        ]
        empty = torch.empty(0, 3, dtype=torch.int64)
        for _ in range(self.num_steps):
            yield [(stream, next(reader, empty)) for stream, reader in zip(self.streams, readers, strict=True)]


@dataclass
class Training:
    """What one run holds between set-up and close, on this rank."""

    config: RunConfig
    out_dir: Path
    exchange: Exchange
    dataset: KGDataset
    model: KGModel
    filters: dict[str, FilterIndex]
    reporter: checkpoint.Reporter
    state: checkpoint.RunState
    schedule: Schedule
    step: Step
    logger: RunLogger
    rollbacks: int = 0
    rollbacks_to_latest: int = 0
    """Rollbacks in a row to the same checkpoint (reset when a newer checkpoint is rolled back to)."""
    latest_rolled_back_to: int | None = None

    @property
    def lead(self) -> bool:
        return self.exchange.rank == 0

    @property
    def patience_spent(self) -> bool:
        """Early stopping: ``train.early_stopping_patience`` evaluations in a row without a better MRR."""
        patience = self.config.train.early_stopping_patience
        return patience is not None and self.state.evals_since_best >= patience

    @property
    def lr(self) -> float:
        return self.config.optim.lr if self.state.lr is None else self.state.lr

    @classmethod
    def set_up(
        cls,
        config: RunConfig,
        out_dir: Path,
        dataset: KGDataset | None,
        exchange: Exchange,
        reporter: checkpoint.Reporter | None,
        device: torch.device | None = None,
    ) -> Training:
        lead = exchange.rank == 0
        pinned = pin_local_cpus() if config.sharding.pin_cpus else None
        if config.train.num_threads or pinned:
            torch.set_num_threads(config.train.num_threads or len(pinned or ()))
        torch.set_float32_matmul_precision(config.train.matmul_precision)
        dataset = dataset or load_data(config.data, lead=lead, barrier=exchange.barrier)
        if lead:
            out_dir.mkdir(parents=True, exist_ok=True)
        device = device or choose_device(config.train.device)
        model = build_model(
            config, dataset.num_entities, dataset.num_relations, exchange, device, dataset.entity_frequency
        )
        reporter = reporter or checkpoint.Reporter(out_dir, exchange)
        latest = reporter.latest()
        state = checkpoint.resume(latest, config, model)
        if latest is not None:
            state.restarts = max(state.restarts, checkpoint.read_restarts(out_dir)) + 1
            exchange.barrier()  # every rank has read the count before rank 0 writes the new one
        state.lr = state.lr or config.optim.lr
        if state.warmup_epochs is None:
            state.warmup_epochs = round(config.objective.kl_warmup * config.train.epochs)
        model.set_lr(state.lr)
        schedule = Schedule(
            dataset, exchange, streams=config.sharding.streams, batch_size=config.train.batch_size,
            seed=config.train.seed, prefetch=config.data.prefetch,
        )  # fmt: skip
        record = provenance.training_record(config, device, dataset, schedule.num_streams)
        state.code = provenance.merged(state.code, record, resumed=latest is not None)
        logger = RunLogger(
            out_dir,
            total_steps=config.train.epochs * schedule.num_steps,
            progress=config.train.progress,
            enabled=lead,
            log_steps=config.train.log_steps,
            exporter=start_exporter(config.metrics, out_dir, exchange.rank, restarts=state.restarts),
            variance_every=config.metrics.variance_every,
            lr=state.lr,
            tensorboard=config.metrics.tensorboard,
        )
        # Written once nothing more can refuse the run: a refused resume leaves the run's config as it was.
        if lead:
            save_config(config, out_dir / "config.yaml")
            if latest is not None:
                # Counted on disk at once: a process that dies before its next checkpoint still counts.
                checkpoint.write_restarts(out_dir, state.restarts)
                print(f"resumed from {latest} at epoch {state.epoch}", flush=True)
        logger.start(state.epoch * schedule.num_steps, state.epoch)
        filters = rank_filters(dataset, (model.entities.lo, model.entities.hi))
        step = Step(model, config.optim.grad_clip)
        return cls(config, out_dir, exchange, dataset, model, filters, reporter, state, schedule, step, logger)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training facts; the epoch's record (ELBO terms summed over ranks)."""
        obj = self.config.objective
        kl_multiplier = obj.kl_weight if epoch >= (self.state.warmup_epochs or 0) else 0.0
        started = time.perf_counter()
        with young_objects_collected():
            nll_sum, kl_sum = self._steps(epoch, kl_multiplier)
        # Every rank must take the same decision about the time budget: rank 0's clock decides.
        seconds = time.perf_counter() - started if self.lead else 0.0
        return self._epoch_record(epoch, seconds, nll_sum, kl_sum, kl_multiplier)

    def _steps(self, epoch: int, kl_multiplier: float) -> tuple[float, float]:
        """The epoch's steps: the sums of their NLL and KL on this rank."""
        train_cfg, obj, num_steps = self.config.train, self.config.objective, self.schedule.num_steps
        nll_sum = kl_sum = 0.0
        for i, batches in enumerate(self.schedule.epoch(epoch)):
            step_started = time.perf_counter()
            terms = self.step(
                batches, kl_share(i, num_steps, obj.kl_schedule), kl_multiplier, (train_cfg.seed, epoch, i)
            )
            nll_sum += terms.nll
            kl_sum += terms.kl
            fault_point("train.step")
            # Summing a step's terms over ranks is a collective per step: only for the per-step log.
            many = train_cfg.log_steps and self.exchange.world_size > 1
            totals = terms.totals(self.exchange, self.model.device) if many else terms
            self.logger.step(
                terms,
                totals,
                epoch=epoch + 1,
                step=i,
                global_step=epoch * num_steps + i,
                positives=sum(len(b) for _, b in batches),
                seconds=time.perf_counter() - step_started,
                kl_weight=kl_multiplier,
                model=self.model,
            )
        return nll_sum, kl_sum

    def _epoch_record(self, epoch: int, seconds: float, nll: float, kl: float, kl_multiplier: float) -> dict:
        """The epoch's terms summed over ranks, with the model's health (in the same all-reduce)."""
        health = self.model.health()
        summed = torch.tensor([seconds, nll, kl, *health], dtype=torch.float64, device=self.model.device)
        seconds, nll, kl, non_finite, collapsed, rows = self.exchange.all_reduce(summed).tolist()
        if non_finite:
            raise Divergence(epoch + 1, self.schedule.num_steps - 1, "parameters")
        record = {"epoch": epoch + 1, "elbo": -(nll + kl), "kl": kl, "nll": nll, "kl_multiplier": kl_multiplier}
        record["seconds"] = seconds
        if self.model.variational:
            record["collapsed_fraction"] = collapsed / max(rows, 1)
            if record["collapsed_fraction"] > 0.5 and self.lead:
                warnings.warn(
                    f"epoch {epoch + 1}: the variance of {record['collapsed_fraction']:.0%} of the entities has "
                    f"collapsed (log-variance below {COLLAPSED_LOGVAR}); their uncertainty means nothing",
                    stacklevel=3,
                )
        return record

    def end_epoch(self, record: dict) -> bool:
        """Evaluate, keep the best, checkpoint and log after an epoch; whether to stop (the time budget, or
        early stopping)."""
        train_cfg, state = self.config.train, self.state
        state.train_seconds += record["seconds"]
        state.epoch = record["epoch"]
        budget = train_cfg.time_budget_s
        # Stop when another epoch of the same length would end past the budget.
        out_of_time = budget is not None and state.train_seconds + record["seconds"] > budget
        last = state.epoch == train_cfg.epochs or out_of_time
        valid = None
        if train_cfg.eval_every and (state.epoch % train_cfg.eval_every == 0 or last):
            with self.logger.timed("evaluation"):
                valid = evaluate_split(
                    self.config.eval, train_cfg.seed, self.model, self.dataset, self.dataset.valid, self.filters,
                    final=False, progress="evaluating valid" if train_cfg.progress else None,
                )  # fmt: skip
            record["valid_mrr"] = valid["filtered"]["mrr"]
            # Sampled MRRs run higher than exact ones: the log says which this is.
            record["valid_protocol"] = self.config.eval.protocol
            record["lr"] = state.lr
            # A NaN MRR compares false either way; a non-finite evaluation is never the best.
            improved = math.isfinite(record["valid_mrr"]) and record["valid_mrr"] > state.best_mrr
            state.evals_since_best = 0 if improved else state.evals_since_best + 1
            if improved:
                state.best_mrr, state.best_epoch = valid["filtered"]["mrr"], state.epoch
                with self.logger.timed("checkpoint"):
                    self.reporter.save(checkpoint.BEST, self.model, state, self.config)
            if reduce_on_plateau(state, improved, self.config.optim):
                self.model.set_lr(self.lr)
                self.logger.lr = self.lr
        stop_early = self.patience_spent and not last
        if stop_early:
            record["early_stopped"] = True
        self.logger.epoch(record, valid)
        if state.epoch % train_cfg.checkpoint_every == 0 or last or stop_early:
            with self.logger.timed("checkpoint"):
                self.reporter.save(checkpoint.LATEST, self.model, state, self.config, metrics=record)
        if valid is not None:
            self.reporter.evaluated(record)
        if out_of_time and self.lead:
            print(f"time budget {budget:.0f}s: stopping after epoch {state.epoch}", flush=True)
        if stop_early and self.lead:
            print(
                f"early stopping: no better validation MRR in {state.evals_since_best} evaluations; stopping after "
                f"epoch {state.epoch} (best: epoch {state.best_epoch}, MRR {state.best_mrr:.4f})",
                flush=True,
            )
        return out_of_time or stop_early

    def roll_back(self, err: Divergence) -> None:
        """After a divergence: stop with a clear error, or (``train.on_divergence=rollback``) start again from
        the latest checkpoint (from the initial values when there is none, or when two rollbacks in a row
        to that checkpoint diverged again) with half the learning rate."""
        train_cfg = self.config.train
        if train_cfg.on_divergence == "stop":
            raise ValueError(f"{err} (lower optim.lr, or set train.on_divergence=rollback)") from None
        if self.rollbacks >= train_cfg.max_rollbacks:
            raise ValueError(f"{err}, after {self.rollbacks} rollback(s) (train.max_rollbacks)") from None
        lr = self.lr / 2
        self.rollbacks += 1
        latest = self._rollback_checkpoint()
        self.model = build_model(
            self.config, self.dataset.num_entities, self.dataset.num_relations, self.exchange, self.model.device,
            self.dataset.entity_frequency,
        )  # fmt: skip
        state = checkpoint.load_into(latest, self.model) if latest is not None else checkpoint.RunState()
        # best/ on disk may be newer than the checkpoint: keep its MRR, so a worse model never replaces it.
        if self.state.best_mrr > state.best_mrr:
            state.best_mrr, state.best_epoch = self.state.best_mrr, self.state.best_epoch
            state.evals_since_best = self.state.evals_since_best  # early stopping counts from that best
        state.lr, state.train_seconds, state.restarts = lr, self.state.train_seconds, self.state.restarts
        state.code = self.state.code  # the checkpoint may predate this process joining the run
        state.warmup_epochs = self.state.warmup_epochs
        self.state = state
        self.model.set_lr(lr)
        self.step = Step(self.model, self.config.optim.grad_clip)
        self.logger.rewind(state.epoch * self.schedule.num_steps, state.epoch, lr)
        if self.lead:
            since = f"the checkpoint of epoch {state.epoch}" if latest is not None else "the initial values"
            print(f"{err}: rolled back to {since}, learning rate {lr:g}", flush=True)

    def _rollback_checkpoint(self) -> Path | None:
        """The run directory's own latest checkpoint to roll back to (a launcher's reporter may hand an older,
        restored one), or None for the initial values: when there is none, or when two rollbacks in a row to
        it, at ever smaller learning rates, diverged again: then its values themselves are the trouble
        (finite but exploded by an epoch at too high a rate), so the run starts over."""
        if not checkpoint.Reporter.has(self.reporter, checkpoint.LATEST):
            return None
        latest = self.reporter.path(checkpoint.LATEST)
        epoch = checkpoint.read_index(latest)["state"].get("epoch", 0)
        same = epoch == self.latest_rolled_back_to
        self.rollbacks_to_latest = self.rollbacks_to_latest + 1 if same else 1
        self.latest_rolled_back_to = epoch
        if self.rollbacks_to_latest > 2:
            self.rollbacks_to_latest, self.latest_rolled_back_to = 0, None
            return None
        return latest

    def close(self) -> dict:
        """Evaluate the best checkpoint (else the last state) on valid and test; rank 0 writes metrics.json."""
        self.logger.close()
        if self.reporter.has(checkpoint.BEST):
            checkpoint.load_into(self.reporter.path(checkpoint.BEST), self.model)
        metrics = evaluate_run(
            self.config.eval, self.config.train.seed, self.model, self.dataset, self.filters,
            progress=self.config.train.progress,
        )  # fmt: skip
        metrics.update(
            train_seconds=self.state.train_seconds,
            best_epoch=self.state.best_epoch or self.state.epoch,
            epochs_trained=self.state.epoch,
            stopped_early=self.patience_spent and self.state.epoch < self.config.train.epochs,
            world_size=self.exchange.world_size,
            config=to_dict(self.config),
            code=self.state.code,
        )
        if self.lead:
            atomic_write_json(self.out_dir / "metrics.json", metrics)
        return metrics


def reduce_on_plateau(state: checkpoint.RunState, improved: bool, optim: OptimConfig) -> bool:
    """Count evaluations without a better validation MRR; after ``lr_patience`` of them, multiply the
    learning rate by ``lr_decay``. Returns whether it changed."""
    state.stale_evals = 0 if improved else state.stale_evals + 1
    if optim.lr_decay == 1.0 or state.stale_evals < optim.lr_patience or state.lr is None:
        return False
    state.lr *= optim.lr_decay
    state.stale_evals = 0
    return True
