"""Prometheus metrics of a training run, one HTTP endpoint per worker (prometheus-client).

Chosen over ``ray.util.metrics`` because one exporter then serves a plain process, torchrun and Ray
Train alike (Ray's metrics need a running Ray). Every worker serves ``metrics.port + rank`` on
``metrics.host`` (127.0.0.1 unless configured) and, when ``metrics.discovery_dir`` is set, writes a
Prometheus ``file_sd`` target file there, so workers placed by Ray on any node are found without a
fixed list. Names follow Prometheus conventions: ``nvkg_`` prefix, base units, ``_total`` counters;
every series carries ``job`` and ``worker`` labels. The values are this worker's share of the step.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from storage.atomic import atomic_write_text

if TYPE_CHECKING:
    from trainer.config import MetricsConfig

LABELS = ("job", "worker")


class MetricsExporter:
    def __init__(self, *, job: str, rank: int, host: str, port: int, discovery_dir: str | None):
        self.registry = CollectorRegistry()
        self.labels = {"job": job, "worker": str(rank)}

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*LABELS, *extra], registry=self.registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=self.registry)

        self.negative_elbo = gauge("nvkg_negative_elbo", "Negative ELBO of the last step (this worker's share)")
        self.kl = gauge("nvkg_kl_divergence", "KL to the prior in the last step's loss (this worker's share)")
        self.log_likelihood = gauge(
            "nvkg_expected_log_likelihood", "Expected log-likelihood of the last step's facts (this worker's share)"
        )
        self.kl_weight = gauge("nvkg_kl_weight", "Multiplier of the KL term (warm-up times kl_weight)")
        self.throughput = gauge("nvkg_positives_per_second", "Positive facts per second over the last step")
        self.learning_rate = gauge("nvkg_learning_rate", "Learning rate of the row optimisers")
        self.variance = gauge("nvkg_entity_variance_mean", "Mean posterior variance of this worker's entity rows")
        self.collapsed = gauge(
            "nvkg_variance_collapsed_ratio", "Share of the entities whose posterior variance has collapsed"
        )
        self.epoch = gauge("nvkg_epoch", "Epochs completed")
        self.step = gauge("nvkg_step", "Global step within the run")
        self.mrr = gauge("nvkg_eval_mrr", "Filtered mean reciprocal rank on validation", ("split",))
        self.hits = gauge("nvkg_eval_hits_ratio", "Filtered Hits@k on validation", ("split", "k"))
        self.steps_total = counter("nvkg_steps", "Training steps taken by this worker")
        self.positives_total = counter("nvkg_positives", "Positive facts this worker trained on")
        self.restarts_total = counter("nvkg_restarts", "Times this run resumed from a checkpoint")
        self.server, _ = start_http_server(port + rank, addr=host, registry=self.registry)
        self.address = f"{_reachable(host)}:{port + rank}"
        self.discovery_file = None
        if discovery_dir:
            self.discovery_file = Path(discovery_dir) / f"nvkg-{job}-worker{rank}.json"
            targets = [{"targets": [self.address], "labels": self.labels}]
            atomic_write_text(self.discovery_file, json.dumps(targets) + "\n")

    def observe_step(
        self, *, nll: float, kl: float, kl_weight: float, positives: int, seconds: float, lr: float, step: int
    ) -> None:
        labels = self.labels
        self.negative_elbo.labels(**labels).set(nll + kl)
        self.kl.labels(**labels).set(kl)
        self.log_likelihood.labels(**labels).set(-nll)
        self.kl_weight.labels(**labels).set(kl_weight)
        self.throughput.labels(**labels).set(positives / max(seconds, 1e-9))
        self.learning_rate.labels(**labels).set(lr)
        self.step.labels(**labels).set(step)
        self.steps_total.labels(**labels).inc()
        self.positives_total.labels(**labels).inc(positives)

    def observe_variance(self, mean_variance: float) -> None:
        self.variance.labels(**self.labels).set(mean_variance)

    def observe_epoch(self, epoch: int, valid: dict | None, collapsed: float | None = None) -> None:
        self.epoch.labels(**self.labels).set(epoch)
        if collapsed is not None:
            self.collapsed.labels(**self.labels).set(collapsed)
        if valid is not None:
            self.mrr.labels(**self.labels, split="valid").set(valid["filtered"]["mrr"])
            for k in (1, 3, 10):
                self.hits.labels(**self.labels, split="valid", k=str(k)).set(valid["filtered"][f"hits@{k}"])

    def observe_restart(self) -> None:
        self.restarts_total.labels(**self.labels).inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.discovery_file is not None:
            self.discovery_file.unlink(missing_ok=True)


def _reachable(host: str) -> str:
    """The address a scraper should use: the host bound, or this machine's name when bound to all."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def job_name(out_dir: Path, configured: str | None) -> str:
    """The ``job`` label: configured, or the run directory's name (never a path: it may hold secrets)."""
    return configured or Path(os.path.normpath(out_dir)).name


def start_exporter(metrics: MetricsConfig, out_dir: Path, rank: int) -> MetricsExporter | None:
    """This rank's endpoint as the ``metrics`` section asks (None: no endpoint)."""
    if metrics.port is None:
        return None
    if metrics.port + rank > 65535:
        raise ValueError(f"metrics.port={metrics.port}: worker {rank} would serve port {metrics.port + rank} > 65535")
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
