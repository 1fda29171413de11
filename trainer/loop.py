"""The training function. A plain run is world size 1 of the distributed path: the loop only gathers
rows from tables and hands gradients back, and the tables do the routing, so torchrun, Ray Train and
a plain process all run ``train``.

A global step takes one batch from each of ``sharding.streams`` data streams; a rank handles the
streams ``rank, rank + W, ...``. Randomness is keyed by (seed, epoch, step, stream) and per-row noise
blocks, never by rank, so a run's numbers depend on the streams, not on how many workers share them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sharding.exchange import Exchange, LocalExchange, all_gather_rows, sharded_log_partition
from sharding.launch import choose_device, pin_local_cpus
from sharding.table import Encoded, Encoder, Segment, identity, row_normal, seed_of
from storage.dataset import KGDataset, open_dataset, resolve_store
from trainer import checkpoint
from trainer.config import OptimConfig, RunConfig, save_config, to_dict
from trainer.evaluate import build_filters, evaluate
from trainer.gaussian import sample_and_kl, stream_sample_and_kl
from trainer.io import atomic_write_json
from trainer.logger import RunLogger
from trainer.metrics import MetricsExporter, job_name
from trainer.model import KGModel, build_model
from trainer.objective import (
    bernoulli_negative_weight,
    bernoulli_nll,
    chunk_negatives,
    kl_share,
    local_log_z,
    n3_penalty,
    per_occurrence_kl,
    softmax_nll,
)
from trainer.scorers import Scorer

RELATION_STREAM = -1
NOISE = 0x401E
NOISE_BLOCK = 256
"""Rows per generator of a stream's per-row noise: an owner draws only the blocks its rows fall in."""


@dataclass
class StepTerms:
    """A step's share of the negative ELBO (KL before warm-up and kl_weight) and of the loss minimised,
    on one rank or (``totals``) summed over all ranks."""

    nll: float
    kl: float
    loss: float

    def totals(self, exchange: Exchange, device: torch.device) -> StepTerms:
        local = torch.tensor([self.nll, self.kl, self.loss], dtype=torch.float64, device=device)
        return StepTerms(*exchange.all_reduce(local).tolist())


def load_data(config: RunConfig, exchange: Exchange | None = None) -> KGDataset:
    """Open the configured dataset; rank 0 converts triple files first, so ranks never race on the cache."""
    exchange = exchange or LocalExchange()
    data = config.data
    root = resolve_store(data.dataset, data.cache_dir) if exchange.rank == 0 else None
    exchange.barrier()
    # Resolving hashes triple files to find their cached conversion: once per rank, not twice.
    root = root or resolve_store(data.dataset, data.cache_dir)
    return open_dataset(root, cache_dir=data.cache_dir, engine=data.engine, verify=data.verify_checksums)


def step_generator(key: tuple[int, ...], stream: int, device: torch.device | None = None) -> torch.Generator:
    """Negatives and sparse noise of one stream in one step: a function of (seed, epoch, step, stream)."""
    return torch.Generator(device=device or torch.device("cpu")).manual_seed(seed_of(*key, stream))


class Step:
    """Computes and applies one global step's update on this rank; holds what is fixed for a run."""

    def __init__(self, config: RunConfig, model: KGModel, frequency: torch.Tensor):
        self.config, self.model, self.frequency = config, model, frequency.to(model.device)
        self.device = model.device
        self.exchange: Exchange = model.exchange
        obj = config.objective
        num_entities = model.entities.num_rows
        self.negative_weight = (
            bernoulli_negative_weight(num_entities, obj.num_negatives)
            if obj.negative_weight is None
            else obj.negative_weight
        )
        # The softmax and the full LIM KL touch every entity row: each rank takes its own rows whole.
        self.dense = obj.likelihood == "softmax" or (model.latent == "lim" and obj.kl_estimator == "full")
        self.log_z = local_log_z if self.exchange.world_size == 1 else self._sharded_log_z
        self.n3 = obj.reg == "n3" and obj.reg_weight > 0

    def __call__(
        self, batches: list[tuple[int, torch.Tensor]], share: float, kl_multiplier: float, key: tuple[int, ...]
    ) -> StepTerms:
        """``batches``: (stream, positives [B, 3]) of this rank's streams; ``key``: (seed, epoch, step)."""
        model, obj = self.model, self.config.objective
        ents, rels = model.entities, model.relations
        rel_leaf = rels.local()
        rel_eps = self._noise(rels.num_rows, rels.dim, step_generator(key, RELATION_STREAM, self.device))
        rel, rel_kl = sample_and_kl(rel_leaf, rels.dim, rel_eps)
        ent_leaf = dense_eps = candidates = dense_kl = None
        if self.dense:
            ent_leaf = ents.local()
            dense_eps = ents.dense_noise(key) if model.variational else None
            candidates, dense_kl = sample_and_kl(ent_leaf, ents.dim, dense_eps)

        encoder = self._encoder(key, dense_eps)
        encoded: list[Encoded] = []
        nll = kl = reg = rel_leaf.new_zeros(())
        for stream, positives in batches:
            positives = positives.to(self.device, non_blocking=True)
            negatives = None
            if obj.likelihood == "bernoulli":
                negatives = self._negatives(len(positives), step_generator(key, stream, self.device))
            ids, local = self._rows_needed(positives, negatives)
            item = ents.encode(ids, encoder, tag=stream)
            encoded.append(item)
            ent, ent_kl, ent_mean = self._split(item.values)
            nll = nll + self._nll(ent, rel, candidates, local, positives[:, 1])
            kl = kl + self._stream_kl(ent_kl, rel_kl, local, positives, ids)
            if self.n3:
                reg = reg + obj.reg_weight * self._n3(ent_mean, rel_leaf, local, positives[:, 1])
        kl = kl + self._step_kl(dense_kl, rel_kl, share)
        loss = nll + kl_multiplier * kl + reg
        loss.backward()

        rel_grad, rel_pending = rels.collect(rel_leaf)
        ent_ids, ent_grad = ents.collect(encoded, ent_leaf)
        if self.config.optim.grad_clip is not None:
            rel_pending.wait()
            self._clip(ent_grad, rel_grad)
        ents.step(ent_ids, ent_grad)
        rel_pending.wait()
        rels.step(rel_grad)
        return StepTerms(*torch.stack([nll, kl, loss]).detach().tolist())

    def _encoder(self, key: tuple[int, ...], dense_eps: torch.Tensor | None) -> Encoder:
        """What an owner sends for its rows: the sample and its KL (and the mean for N3), drawn with the
        row's dense noise, or with noise keyed by (step, stream) and the row's position in the stream's ids
        (``Segment``), so a draw does not depend on which rank owns the row."""
        if not self.model.variational:
            return identity
        dim, device, keep_mean = self.model.entities.dim, self.device, self.n3

        def encode(rows: torch.Tensor, local: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
            means = [rows[:, :dim]] if keep_mean else []
            if dense_eps is not None:
                eps = dense_eps.index_select(0, local)
            else:
                spans = [(s.count, seed_of(*key, s.tag, NOISE), s.offset * dim) for s in segments]
                packed = stream_sample_and_kl(rows, dim, spans)
                if packed is not None:
                    return torch.cat([packed, *means], dim=1) if means else packed
                eps, start = rows.new_empty(len(rows), dim), 0
                for s in segments:
                    span = (s.offset, s.offset + s.count)
                    row_normal(span, dim, (*key, s.tag, NOISE), NOISE_BLOCK, device, eps[start : start + s.count])
                    start += s.count
            sample, row_kl = sample_and_kl(rows, dim, eps)
            return torch.cat([sample, row_kl.unsqueeze(1), *means], dim=1)

        return encode

    def _split(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample, KL per row, mean) from what the owners sent; a point estimate is its own sample."""
        if not self.model.variational:
            return values, values.new_zeros(len(values)), values
        dim = self.model.entities.dim
        sample, kl, mean = values.split([dim, 1, values.shape[1] - dim - 1], dim=1)
        return sample, kl.squeeze(1), mean

    def _noise(self, rows: int, dim: int, generator: torch.Generator) -> torch.Tensor | None:
        if not self.model.variational:
            return None
        return torch.randn(rows, dim, generator=generator, device=self.device)

    def _negatives(self, num_positives: int, generator: torch.Generator) -> torch.Tensor:
        obj, ents = self.config.objective, self.model.entities
        # A shard can be empty when the table has fewer than world_size * block_rows rows: draw globally then.
        if self.config.sharding.negatives == "local" and ents.hi > ents.lo:
            lo, hi = ents.lo, ents.hi
            return lo + chunk_negatives(num_positives, obj.negative_chunk, obj.num_negatives, hi - lo, generator)
        return chunk_negatives(num_positives, obj.negative_chunk, obj.num_negatives, ents.num_rows, generator)

    def _rows_needed(
        self, positives: torch.Tensor, negatives: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Ascending unique entity ids to gather, and the batch's positions within them: per part (s, o,
        neg) and all parts in that order ("flat"), so the scorer's inputs are one gather."""
        parts = {"s": positives[:, 0], "o": positives[:, 2]}
        if negatives is not None:
            parts["neg"] = negatives
        flat = torch.cat([p.reshape(-1) for p in parts.values()])
        ids, inverse = torch.unique(flat, return_inverse=True)
        local, offset = {"flat": inverse}, 0
        for name, p in parts.items():
            local[name] = inverse[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        return ids, local

    def _nll(
        self,
        ent: torch.Tensor,
        rel: torch.Tensor,
        candidates: torch.Tensor | None,
        local: dict[str, torch.Tensor],
        r: torch.Tensor,
    ) -> torch.Tensor:
        obj, model = self.config.objective, self.model
        batch = len(r)
        rows = ent.index_select(0, local["flat"])
        # split, not slices: its backward is one concatenation (a slice's fills a zero tensor per slice).
        s_emb, o_emb, neg = rows.split([batch, batch, len(rows) - 2 * batch])
        r_emb = rel.index_select(0, r)
        if obj.likelihood == "bernoulli":
            neg = neg.view(*local["neg"].shape, -1)
            return bernoulli_nll(model.scorer, s_emb, r_emb, o_emb, neg, obj.negative_chunk, self.negative_weight)
        queries = torch.cat([s_emb, o_emb])
        query_rel = torch.cat([r_emb, rel.index_select(0, r + model.num_relations)])
        return softmax_nll(model.scorer, queries, query_rel, torch.cat([o_emb, s_emb]), candidates, self.log_z)

    def _sharded_log_z(
        self, scorer: Scorer, s_BD: torch.Tensor, r_BD: torch.Tensor, candidates_ND: torch.Tensor
    ) -> torch.Tensor:
        """log Z of this rank's queries when candidates are split across ranks: every rank scores every
        rank's queries against its own candidates and log Z is assembled (vocabulary-parallel softmax)."""
        all_queries, offset = all_gather_rows(s_BD, self.exchange)
        all_rel, _ = all_gather_rows(r_BD, self.exchange)
        log_z = sharded_log_partition(scorer.score_tails(all_queries, all_rel, candidates_ND), self.exchange)
        return log_z[offset : offset + len(s_BD)]

    def _stream_kl(
        self,
        ent_kl: torch.Tensor,
        rel_kl: torch.Tensor,
        local: dict[str, torch.Tensor],
        positives: torch.Tensor,
        ids: torch.Tensor,
    ) -> torch.Tensor:
        """The KL that belongs to a stream's facts (LFM; LIM per occurrence)."""
        model = self.model
        if not model.variational:
            return ent_kl.new_zeros(())
        if model.latent == "lfm":
            # One latent set per fact: the KL of the embeddings of the batch's facts, each positive fact
            # once per epoch, plus every distinct corrupted entity of the batch once.
            r = positives[:, 1]
            total = ent_kl[local["s"]].sum() + ent_kl[local["o"]].sum() + rel_kl[r].sum()
            if model.reciprocal:
                total = total + rel_kl[r + model.num_relations].sum()
            if "neg" in local:
                total = total + ent_kl[torch.unique(local["neg"])].sum()
            return total
        if self.config.objective.kl_estimator == "per_occurrence":
            occurrences = torch.bincount(torch.cat([local["s"], local["o"]]), minlength=len(ids))
            return per_occurrence_kl(ent_kl, occurrences, self.frequency[ids])
        return ent_kl.new_zeros(())

    def _step_kl(self, dense_kl: torch.Tensor | None, rel_kl: torch.Tensor, share: float) -> torch.Tensor:
        """The LIM KL of whole tables, scheduled per step: each rank its entity rows, rank 0 the relations."""
        model = self.model
        if not model.variational or model.latent != "lim":
            return rel_kl.new_zeros(())
        total = rel_kl.sum() if self.exchange.rank == 0 else rel_kl.new_zeros(())
        if self.config.objective.kl_estimator == "full":
            total = total + dense_kl.sum()
        return share * total

    def _n3(
        self, ent_mean: torch.Tensor, rel_leaf: torch.Tensor, local: dict[str, torch.Tensor], r: torch.Tensor
    ) -> torch.Tensor:
        rel_mean = rel_leaf[:, : self.model.relations.dim]
        means = (
            ent_mean.index_select(0, local["s"]),
            rel_mean.index_select(0, r),
            ent_mean.index_select(0, local["o"]),
        )
        return n3_penalty(*means, complex_valued=self.model.scorer.name == "complex")

    def _clip(self, ent_grad: torch.Tensor, rel_grad: torch.Tensor) -> None:
        """Clip the norm of the whole gradient: entity rows summed over ranks, relations counted once."""
        max_norm = self.config.optim.grad_clip
        if max_norm is None:
            return
        squared = self.exchange.all_reduce(ent_grad.square().sum().reshape(1))[0] + rel_grad.square().sum()
        total = squared.sqrt()
        if total > max_norm:
            for g in (ent_grad, rel_grad):
                g.mul_(max_norm / (total + 1e-6))


class Schedule:
    """Which batches this rank feeds each global step of an epoch."""

    def __init__(self, config: RunConfig, dataset: KGDataset, exchange: Exchange):
        world = exchange.world_size
        self.num_streams = config.sharding.streams or world
        if self.num_streams % world:
            raise ValueError(f"sharding.streams={self.num_streams} is not a multiple of the world size {world}")
        self.streams = list(range(exchange.rank, self.num_streams, world))
        self.batch_size = config.train.batch_size // self.num_streams
        if self.batch_size == 0:
            raise ValueError(f"train.batch_size={config.train.batch_size} is smaller than {self.num_streams} streams")
        self.config, self.dataset = config, dataset
        self.num_steps = max(dataset.num_batches(self.batch_size, s, self.num_streams) for s in range(self.num_streams))

    def epoch(self, epoch: int):
        """Per step, [(stream, positives)] for this rank; a stream that ran out gives an empty batch."""
        readers = [
            self.dataset.batches(
                batch_size=self.batch_size,
                epoch=epoch,
                seed=self.config.train.seed,
                rank=stream,
                world_size=self.num_streams,
                prefetch=self.config.data.prefetch,
            )
            for stream in self.streams
        ]
        empty = torch.empty(0, 3, dtype=torch.int64)
        for _ in range(self.num_steps):
            yield [(stream, next(reader, empty)) for stream, reader in zip(self.streams, readers, strict=True)]


def train(
    config: RunConfig,
    out_dir: Path,
    dataset: KGDataset | None = None,
    exchange: Exchange | None = None,
    reporter: checkpoint.Reporter | None = None,
) -> dict:
    """Train (resuming from the latest checkpoint when there is one), evaluate, write metrics.json.

    Every rank calls this; rank 0 writes the logs and metrics. ``reporter`` hands checkpoints to a
    launcher (Ray Train) instead of only to ``out_dir``.
    """
    exchange = exchange or LocalExchange()
    out_dir = Path(out_dir)
    lead = exchange.rank == 0
    pinned = pin_local_cpus() if config.sharding.pin_cpus else None
    if config.train.num_threads or pinned:
        torch.set_num_threads(config.train.num_threads or len(pinned))
    dataset = dataset or load_data(config, exchange)
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    device = choose_device(config.train.device)
    model = build_model(config, dataset.num_entities, dataset.num_relations, exchange, device)
    filters = build_filters(dataset.all_known(), dataset.num_relations)
    reporter = reporter or checkpoint.Reporter(out_dir, exchange)
    latest = reporter.latest()
    state = checkpoint.resume(latest, config, model)
    if latest is not None and lead:
        print(f"resumed from {latest} at epoch {state.epoch}", flush=True)

    train_cfg, obj = config.train, config.objective
    schedule = Schedule(config, dataset, exchange)
    num_steps = schedule.num_steps
    warmup_epochs = round(obj.kl_warmup * train_cfg.epochs)
    step = Step(config, model, dataset.entity_frequency)
    state.lr = state.lr or config.optim.lr
    model.set_lr(state.lr)
    logger = RunLogger(
        out_dir,
        total_steps=train_cfg.epochs * num_steps,
        progress=train_cfg.progress,
        enabled=lead,
        log_steps=train_cfg.log_steps,
        exporter=start_exporter(config, out_dir, exchange.rank),
        variance_every=config.metrics.variance_every,
        lr=state.lr,
    )
    logger.start(state.epoch * num_steps, state.epoch, resumed=latest is not None)

    for epoch in range(state.epoch, train_cfg.epochs):
        started = time.perf_counter()
        kl_multiplier = obj.kl_weight if epoch >= warmup_epochs else 0.0
        nll_sum = kl_sum = 0.0
        for i, batches in enumerate(schedule.epoch(epoch)):
            step_started = time.perf_counter()
            terms = step(batches, kl_share(i, num_steps, obj.kl_schedule), kl_multiplier, (train_cfg.seed, epoch, i))
            nll_sum += terms.nll
            kl_sum += terms.kl
            # Summing a step's terms over ranks is a collective per step: only for the per-step log.
            totals = terms.totals(exchange, device) if train_cfg.log_steps and exchange.world_size > 1 else terms
            logger.step(
                terms,
                totals,
                epoch=epoch + 1,
                step=i,
                global_step=epoch * num_steps + i,
                positives=sum(len(b) for _, b in batches),
                seconds=time.perf_counter() - step_started,
                kl_weight=kl_multiplier,
                model=model,
            )
        # Every rank must take the same decision about the time budget: rank 0's clock decides.
        seconds = time.perf_counter() - started if lead else 0.0
        summed = torch.tensor([seconds, nll_sum, kl_sum], dtype=torch.float64, device=device)
        seconds, nll_sum, kl_sum = exchange.all_reduce(summed).tolist()
        record = {
            "epoch": epoch + 1,
            "elbo": -(nll_sum + kl_sum),
            "kl": kl_sum,
            "nll": nll_sum,
            "kl_multiplier": kl_multiplier,
            "seconds": seconds,
        }
        state.train_seconds += record["seconds"]
        state.epoch = epoch + 1
        budget = train_cfg.time_budget_s
        # Stop when another epoch of the same length would end past the budget.
        out_of_time = budget is not None and state.train_seconds + record["seconds"] > budget
        last = state.epoch == train_cfg.epochs or out_of_time
        valid = None
        if train_cfg.eval_every and (state.epoch % train_cfg.eval_every == 0 or last):
            valid = evaluate(model, dataset.valid, filters, batch_size=config.eval.batch_size)
            record["valid_mrr"] = valid["filtered"]["mrr"]
            record["lr"] = state.lr
            improved = valid["filtered"]["mrr"] > state.best_mrr
            if improved:
                state.best_mrr, state.best_epoch = valid["filtered"]["mrr"], state.epoch
                reporter.save(checkpoint.BEST, model, state, config)
            if reduce_on_plateau(state, improved, config.optim):
                model.set_lr(state.lr)
                logger.lr = state.lr
        logger.epoch(record, valid)
        if state.epoch % train_cfg.checkpoint_every == 0 or last:
            reporter.save(checkpoint.LATEST, model, state, config, metrics=record)
        if out_of_time and lead:
            print(f"time budget {budget:.0f}s: stopping after epoch {state.epoch}", flush=True)
        if out_of_time:
            break
    logger.close()

    if reporter.has(checkpoint.BEST):
        checkpoint.load_into(reporter.path(checkpoint.BEST), model)
    metrics = evaluate_run(config, model, dataset, filters)
    metrics.update(
        train_seconds=state.train_seconds,
        best_epoch=state.best_epoch or state.epoch,
        world_size=exchange.world_size,
        config=to_dict(config),
    )
    if lead:
        atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def reduce_on_plateau(state: checkpoint.RunState, improved: bool, optim: OptimConfig) -> bool:
    """Count evaluations without a better validation MRR; after ``lr_patience`` of them, multiply the
    learning rate by ``lr_decay``. Returns whether it changed."""
    state.stale_evals = 0 if improved else state.stale_evals + 1
    if optim.lr_decay == 1.0 or state.stale_evals < optim.lr_patience:
        return False
    state.lr *= optim.lr_decay
    state.stale_evals = 0
    return True


def start_exporter(config: RunConfig, out_dir: Path, rank: int) -> MetricsExporter | None:
    metrics = config.metrics
    if metrics.port is None:
        return None
    try:
        return MetricsExporter(
            job=job_name(out_dir, metrics.job),
            rank=rank,
            host=metrics.host,
            port=metrics.port,
            discovery_dir=metrics.discovery_dir,
        )
    except OSError as err:
        raise ValueError(
            f"metrics.port={metrics.port}: cannot serve {metrics.host}:{metrics.port + rank} ({err})"
        ) from None


def evaluate_run(config: RunConfig, model: KGModel, dataset: KGDataset, filters: dict) -> dict:
    kwargs = dict(batch_size=config.eval.batch_size, num_samples=config.eval.num_samples, seed=config.train.seed)
    return {
        "dataset": dataset.name,
        "valid": evaluate(model, dataset.valid, filters, **kwargs),
        "test": evaluate(model, dataset.test, filters, **kwargs),
        "dropped_facts": sum(dataset.dropped.values()),
        "dropped_by_split": dataset.dropped,
    }
