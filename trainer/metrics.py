"""Prometheus metrics of a training run, one HTTP endpoint per worker (prometheus-client).

Chosen over ``ray.util.metrics`` because one exporter then serves a plain process, torchrun and Ray
Train alike (Ray's metrics need a running Ray). Every worker serves ``metrics.port + rank`` on
``metrics.host`` (127.0.0.1 unless configured) and, when ``metrics.discovery_dir`` is set, writes a
Prometheus ``file_sd`` target file there, so workers placed by Ray on any node are found without a
fixed list. Names follow Prometheus conventions: ``nvkg_`` prefix, base units, ``_total`` counters,
``_seconds`` histograms; every series carries ``run`` and ``worker`` labels, the process's own ones
(``process_*``, ``python_*``) too. The values are this worker's share of the step.

``run``, not ``job``: Prometheus sets ``job`` and ``instance`` on every target, so a ``job`` label
from the exporter becomes ``exported_job`` under a default scrape config (or needs ``honor_labels``).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from storage.atomic import atomic_write_text

if TYPE_CHECKING:
    from trainer.config import MetricsConfig

LABELS = ("run", "worker")
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0, 300.0,
    600.0, 1800.0, 3600.0,
)  # fmt: skip
"""Seconds: a step on a small graph takes milliseconds, an 86M-entity evaluation or checkpoint minutes."""


@dataclass(frozen=True)
class StepSeries:
    """This worker's series that every step sets (``MetricsExporter``'s metrics of the same names)."""

    negative_elbo: Gauge
    kl: Gauge
    log_likelihood: Gauge
    kl_weight: Gauge
    throughput: Gauge
    learning_rate: Gauge
    step: Gauge
    step_seconds: Histogram
    steps_total: Counter
    positives_total: Counter


class MetricsExporter:
    def __init__(
        self, *, run: str, rank: int, host: str, port: int, discovery_dir: str | None, restarts: int = 0
    ) -> None:
        # A private registry, so that two exporters in one process (tests, a local Ray) stay apart; the
        # process, platform and GC collectors are added back with this worker's labels (resident memory
        # is what a 48 GB worker runs out of).
        self.registry = CollectorRegistry()
        self.labels = {"run": run, "worker": str(rank)}
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(_Labelled(collector, self.labels))

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*LABELS, *extra], registry=self.registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=self.registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, LABELS, registry=self.registry, buckets=DURATION_BUCKETS)

        self.negative_elbo = gauge("nvkg_negative_elbo", "Negative ELBO of the last step (this worker's share)")
        self.kl = gauge("nvkg_kl_divergence", "KL to the prior in the last step's loss (this worker's share)")
        self.log_likelihood = gauge(
            "nvkg_expected_log_likelihood", "Expected log-likelihood of the last step's facts (this worker's share)"
        )
        self.kl_weight = gauge("nvkg_kl_weight", "Multiplier of the KL term (warm-up times kl_weight)")
        self.throughput = gauge("nvkg_positives_per_second", "Positive facts per second over the last step")
        self.learning_rate = gauge("nvkg_learning_rate", "Learning rate of the row optimisers")
        self.variance = gauge(
            "nvkg_entity_variance_mean",
            "Mean posterior variance of this worker's entity rows (over up to 65,536 evenly spaced rows)",
        )
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
        self.step_seconds = histogram("nvkg_step_duration_seconds", "Wall time of a training step on this worker")
        self.durations = {
            "evaluation": histogram("nvkg_evaluation_duration_seconds", "Wall time of a periodic evaluation"),
            "checkpoint": histogram("nvkg_checkpoint_write_duration_seconds", "Wall time of a checkpoint write"),
        }
        self.step_series: StepSeries | None = None
        # The count lives in the checkpoint: set before the first scrape, so a panel never sees it restart at 0.
        self.restarts_total.labels(**self.labels).inc(restarts)
        self.server, _ = start_http_server(port + rank, addr=host, registry=self.registry)
        self.address = f"{_reachable(host)}:{port + rank}"
        self.discovery_file = None
        if discovery_dir:
            # The port in the name: two live runs on a host never share a port, while their directories'
            # names (the run label) may be alike, and one's close would delete the other's file.
            self.discovery_file = Path(discovery_dir) / f"nvkg-{run}-worker{rank}-port{port + rank}.json"
            # No target labels: the series carry run and worker themselves, and the same names as target
            # labels would turn them into exported_run and exported_worker under a default scrape config.
            atomic_write_text(self.discovery_file, json.dumps([{"targets": [self.address]}]) + "\n")

    def observe_step(
        self, *, nll: float, kl: float, kl_weight: float, positives: int, seconds: float, lr: float, step: int
    ) -> None:
        series = self.step_series or self._bind_step_series()
        series.negative_elbo.set(nll + kl)
        series.kl.set(kl)
        series.log_likelihood.set(-nll)
        series.kl_weight.set(kl_weight)
        series.throughput.set(positives / max(seconds, 1e-9))
        series.learning_rate.set(lr)
        series.step.set(step)
        series.step_seconds.observe(seconds)
        series.steps_total.inc()
        series.positives_total.inc(positives)

    def _bind_step_series(self) -> StepSeries:
        """Every step sets ten series: labels(), a locked lookup each, bound once (31 -> 4 us a step), at the
        first step, so that no series shows a step's value before there is one."""
        self.step_series = StepSeries(**{
            field.name: getattr(self, field.name).labels(**self.labels) for field in fields(StepSeries)
        })  # fmt: skip
        return self.step_series

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

    def observe_duration(self, what: str, seconds: float) -> None:
        """``what``: evaluation or checkpoint."""
        self.durations[what].labels(**self.labels).observe(seconds)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.discovery_file is not None:
            self.discovery_file.unlink(missing_ok=True)


class _Labelled(Collector):
    """Another collector's metrics with this worker's labels added (copies: the collector is shared)."""

    def __init__(self, collector: Collector, labels: dict[str, str]) -> None:
        self.collector, self.labels = collector, labels

    def collect(self) -> Iterable[Metric]:
        for family in self.collector.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, **self.labels}) for s in family.samples]
            yield labelled


def _reachable(host: str) -> str:
    """The address a scraper should use: the host bound, or this machine's name when bound to all."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def run_name(out_dir: Path, configured: str | None) -> str:
    """The ``run`` label: configured, or the run directory's name (never a path: it may hold secrets)."""
    return configured or Path(os.path.normpath(out_dir)).name


def start_exporter(metrics: MetricsConfig, out_dir: Path, rank: int, restarts: int = 0) -> MetricsExporter | None:
    """This rank's endpoint as the ``metrics`` section asks (None: no endpoint); ``restarts``: the run's
    resumes so far (from its checkpoint)."""
    if metrics.port is None:
        return None
    if metrics.port + rank > 65535:
        raise ValueError(f"metrics.port={metrics.port}: worker {rank} would serve port {metrics.port + rank} > 65535")
    try:
        return MetricsExporter(
            run=run_name(out_dir, metrics.run),
            rank=rank,
            host=metrics.host,
            port=metrics.port,
            discovery_dir=metrics.discovery_dir,
            restarts=restarts,
        )
    except OSError as err:
        raise ValueError(
            f"metrics.port={metrics.port}: cannot serve {metrics.host}:{metrics.port + rank} ({err})"
        ) from None
