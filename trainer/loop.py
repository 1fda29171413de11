"""The training function. A plain run is world size 1 of the distributed path: the loop only gathers
rows from tables and hands gradients back, so a sharded table drops in without a second trainer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.dataset import KGDataset, open_dataset
from trainer import checkpoint
from trainer.config import RunConfig, save_config, to_dict
from trainer.evaluate import build_filters, evaluate
from trainer.gaussian import sample_and_kl
from trainer.io import atomic_write_json
from trainer.logger import RunLogger
from trainer.model import KGModel, build_model
from trainer.objective import (
    bernoulli_negative_weight,
    bernoulli_nll,
    chunk_negatives,
    kl_share,
    n3_penalty,
    per_occurrence_kl,
    softmax_nll,
)


@dataclass
class StepTerms:
    """One batch's share of the negative ELBO (KL before warm-up and kl_weight) and the loss minimised."""

    nll: float
    kl: float
    loss: float


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling, negatives and noise of an epoch depend only on (seed, epoch): resume is exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def load_data(config: RunConfig) -> KGDataset:
    data = config.data
    return open_dataset(data.dataset, cache_dir=data.cache_dir, engine=data.engine, verify=data.verify_checksums)


class Step:
    """Computes and applies one batch's update; holds what is fixed for a whole run."""

    def __init__(self, config: RunConfig, model: KGModel, frequency: torch.Tensor):
        self.config, self.model, self.frequency = config, model, frequency
        obj = config.objective
        num_entities = model.entities.num_rows
        self.negative_weight = (
            bernoulli_negative_weight(num_entities, obj.num_negatives)
            if obj.negative_weight is None
            else obj.negative_weight
        )
        # The full LIM KL and the softmax touch every entity row; otherwise only the batch's rows move.
        self.gather_all = obj.likelihood == "softmax" or (model.latent == "lim" and obj.kl_estimator == "full")

    def __call__(
        self, pos_B3: torch.Tensor, share: float, kl_multiplier: float, generator: torch.Generator
    ) -> StepTerms:
        obj, model = self.config.objective, self.model
        num_entities = model.entities.num_rows
        negatives = None
        if obj.likelihood == "bernoulli":
            negatives = chunk_negatives(len(pos_B3), obj.negative_chunk, obj.num_negatives, num_entities, generator)
        ids, local = self._rows_needed(pos_B3, negatives)
        ent_leaf, rel_leaf = model.entities.gather(ids), model.relations.gather(None)
        ent, ent_kl = sample_and_kl(ent_leaf, model.entities.dim, generator)
        rel, rel_kl = sample_and_kl(rel_leaf, model.relations.dim, generator)
        s, r, o = local["s"], pos_B3[:, 1], local["o"]
        # One lookup for heads, tails and negatives: one gather forward, one scatter backward.
        lookup = torch.cat([s, o] if negatives is None else [s, o, local["neg"].reshape(-1)])
        emb = ent.index_select(0, lookup)
        s_emb, o_emb, r_emb = emb[: len(s)], emb[len(s) : 2 * len(s)], rel.index_select(0, r)

        if obj.likelihood == "bernoulli":
            neg = emb[2 * len(s) :].view(*local["neg"].shape, -1)
            nll = bernoulli_nll(model.scorer, s_emb, r_emb, o_emb, neg, obj.negative_chunk, self.negative_weight)
        else:
            queries = torch.cat([s_emb, o_emb])
            query_rel = torch.cat([r_emb, rel.index_select(0, r + model.num_relations)])
            nll = softmax_nll(model.scorer, queries, query_rel, torch.cat([o_emb, s_emb]), ent)

        kl = self._kl(ent_kl, rel_kl, local, pos_B3, ids, share)
        loss = nll + kl_multiplier * kl
        if obj.reg == "n3" and obj.reg_weight > 0:
            ent_mean, rel_mean = ent_leaf[:, : model.entities.dim], rel_leaf[:, : model.relations.dim]
            means = (ent_mean.index_select(0, s), rel_mean.index_select(0, r), ent_mean.index_select(0, o))
            loss = loss + obj.reg_weight * n3_penalty(*means, complex_valued=model.scorer.name == "complex")
        loss.backward()
        self._clip(ent_leaf.grad, rel_leaf.grad)
        model.entities.apply_gradients(ids, ent_leaf.grad)
        model.relations.apply_gradients(None, rel_leaf.grad)
        return StepTerms(nll=nll.item(), kl=kl.item(), loss=loss.item())

    def _rows_needed(
        self, pos_B3: torch.Tensor, negatives: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Entity ids to gather (None: all) and the batch's positions within the gathered rows."""
        parts = {"s": pos_B3[:, 0], "o": pos_B3[:, 2]}
        if negatives is not None:
            parts["neg"] = negatives
        if self.gather_all:
            return None, parts
        flat = torch.cat([p.reshape(-1) for p in parts.values()])
        ids, inverse = torch.unique(flat, return_inverse=True)
        local, offset = {}, 0
        for name, p in parts.items():
            local[name] = inverse[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        return ids, local

    def _kl(
        self,
        ent_kl: torch.Tensor,
        rel_kl: torch.Tensor,
        local: dict[str, torch.Tensor],
        pos_B3: torch.Tensor,
        ids: torch.Tensor | None,
        share: float,
    ) -> torch.Tensor:
        model = self.model
        if not model.variational:
            return ent_kl.new_zeros(())
        if model.latent == "lfm":
            # One latent set per fact: the KL of the embeddings of the batch's facts, each positive fact
            # once per epoch, plus every distinct corrupted entity of the batch once.
            r = pos_B3[:, 1]
            total = ent_kl[local["s"]].sum() + ent_kl[local["o"]].sum() + rel_kl[r].sum()
            if model.reciprocal:
                total = total + rel_kl[r + model.num_relations].sum()
            if "neg" in local:
                total = total + ent_kl[torch.unique(local["neg"])].sum()
            return total
        if self.config.objective.kl_estimator == "full":
            return share * (ent_kl.sum() + rel_kl.sum())
        size = model.entities.num_rows if ids is None else len(ids)
        occurrences = torch.bincount(torch.cat([local["s"], local["o"]]), minlength=size)
        frequency = self.frequency if ids is None else self.frequency[ids]
        return per_occurrence_kl(ent_kl, occurrences, frequency) + share * rel_kl.sum()

    def _clip(self, *grads: torch.Tensor) -> None:
        max_norm = self.config.optim.grad_clip
        if max_norm is None:
            return
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if total > max_norm:
            for g in grads:
                g.mul_(max_norm / (total + 1e-6))


def train(config: RunConfig, out_dir: Path, dataset: KGDataset | None = None) -> dict:
    """Train (resuming from ``out_dir`` when it holds a checkpoint), evaluate, write metrics.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    dataset = dataset or load_data(config)
    save_config(config, out_dir / "config.yaml")
    model = build_model(config, dataset.num_entities, dataset.num_relations)
    filters = build_filters(dataset.all_known(), dataset.num_relations)
    state = checkpoint.resume(out_dir, config, model)

    train_cfg, obj = config.train, config.objective
    num_batches = dataset.num_batches(train_cfg.batch_size)
    warmup_epochs = round(obj.kl_warmup * train_cfg.epochs)
    step = Step(config, model, dataset.entity_frequency)
    logger = RunLogger(out_dir, total_steps=train_cfg.epochs * num_batches, progress=train_cfg.progress)
    logger.start(state.epoch * num_batches, state.epoch)

    for epoch in range(state.epoch, train_cfg.epochs):
        started = time.perf_counter()
        generator = epoch_generator(train_cfg.seed, epoch)
        batches = dataset.batches(
            batch_size=train_cfg.batch_size, epoch=epoch, seed=train_cfg.seed, prefetch=config.data.prefetch
        )
        kl_multiplier = obj.kl_weight if epoch >= warmup_epochs else 0.0
        nll_sum = kl_sum = 0.0
        for i, batch in enumerate(batches):
            terms = step(batch, kl_share(i, num_batches, obj.kl_schedule), kl_multiplier, generator)
            nll_sum += terms.nll
            kl_sum += terms.kl
            logger.step(terms.nll, terms.kl)
        record = {
            "epoch": epoch + 1,
            "elbo": -(nll_sum + kl_sum),
            "kl": kl_sum,
            "nll": nll_sum,
            "kl_multiplier": kl_multiplier,
            "seconds": time.perf_counter() - started,
        }
        state.train_seconds += record["seconds"]
        state.epoch = epoch + 1
        budget = train_cfg.time_budget_s
        # Stop when another epoch of the same length would end past the budget.
        out_of_time = budget is not None and state.train_seconds + record["seconds"] > budget
        last = state.epoch == train_cfg.epochs or out_of_time
        if train_cfg.eval_every and (state.epoch % train_cfg.eval_every == 0 or last):
            valid = evaluate(model, dataset.valid, filters, batch_size=config.eval.batch_size)
            record["valid_mrr"] = valid["filtered"]["mrr"]
            if valid["filtered"]["mrr"] > state.best_mrr:
                state.best_mrr, state.best_epoch = valid["filtered"]["mrr"], state.epoch
                checkpoint.save(out_dir / checkpoint.BEST, model, state, config)
        logger.epoch(record)
        if state.epoch % train_cfg.checkpoint_every == 0 or last:
            checkpoint.save(out_dir / checkpoint.LATEST, model, state, config)
        if out_of_time:
            print(f"time budget {budget:.0f}s: stopping after epoch {state.epoch}", flush=True)
            break
    logger.close()

    if (out_dir / checkpoint.BEST).exists():
        checkpoint.load_into(out_dir / checkpoint.BEST, model)
    metrics = evaluate_run(config, model, dataset, filters)
    metrics.update(
        train_seconds=state.train_seconds,
        best_epoch=state.best_epoch or state.epoch,
        config=to_dict(config),
    )
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def evaluate_run(config: RunConfig, model: KGModel, dataset: KGDataset, filters: dict) -> dict:
    kwargs = dict(batch_size=config.eval.batch_size, num_samples=config.eval.num_samples, seed=config.train.seed)
    return {
        "dataset": dataset.name,
        "valid": evaluate(model, dataset.valid, filters, **kwargs),
        "test": evaluate(model, dataset.test, filters, **kwargs),
        "dropped_facts": sum(dataset.dropped.values()),
        "dropped_by_split": dataset.dropped,
    }
