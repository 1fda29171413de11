"""Where training numbers go: the per-epoch JSON-lines log, the per-step log, the progress bar, stdout
and the Prometheus exporter. One small interface (start / step / epoch / close) with those backends.

The files and the bar belong to rank 0 (``enabled``); every rank feeds its own metrics endpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.io import atomic_write_text
from trainer.metrics import MetricsExporter

LOG_NAME = "log.jsonl"
STEPS_NAME = "steps.jsonl"


class RunLogger:
    def __init__(
        self,
        out_dir: Path,
        *,
        total_steps: int,
        progress: bool,
        enabled: bool = True,
        log_steps: bool = False,
        exporter: MetricsExporter | None = None,
        variance_every: int = 50,
        lr: float = 0.0,
    ):
        self.path = Path(out_dir) / LOG_NAME
        self.steps_path = Path(out_dir) / STEPS_NAME if log_steps and enabled else None
        self.total_steps, self.progress, self.enabled = total_steps, progress, enabled
        self.exporter, self.variance_every, self.lr = exporter, variance_every, lr
        self.bar: tqdm | None = None

    def start(self, done_steps: int, done_epochs: int, resumed: bool = False) -> None:
        """Open the logs, dropping records past the checkpoint a resumed run starts from."""
        if self.exporter is not None and resumed:
            self.exporter.observe_restart()
        if not self.enabled:
            return
        for path in (self.path, self.steps_path):
            if path is not None and path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= done_epochs]
                atomic_write_text(path, "".join(line + "\n" for line in kept))
        if self.progress:
            self.bar = tqdm(
                total=self.total_steps, initial=done_steps, unit="step", dynamic_ncols=True, mininterval=1.0
            )

    def step(self, terms, totals, *, epoch: int, step: int, global_step: int, positives: int, seconds: float,
             kl_weight: float, model) -> None:  # fmt: skip
        """``terms``: the step's StepTerms on this rank; ``totals``: summed over ranks (the per-step log and
        the bar show them; without the per-step log they are rank 0's own terms, to spare a collective)."""
        if self.exporter is not None:
            self.exporter.observe_step(
                nll=terms.nll, kl=terms.kl, kl_weight=kl_weight, positives=positives,
                seconds=seconds, lr=self.lr, step=global_step,
            )  # fmt: skip
            if model.variational and global_step % self.variance_every == 0:
                with torch.no_grad():
                    self.exporter.observe_variance(float(model.entities.full().logvar.exp().mean()))
        if self.steps_path is not None:
            record = {"epoch": epoch, "step": step, "nll": totals.nll, "kl": totals.kl, "loss": totals.loss}
            with self.steps_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(nll=f"{totals.nll:.4g}", kl=f"{totals.kl:.4g}", refresh=False)

    def epoch(self, record: dict, valid: dict | None = None) -> None:
        if self.exporter is not None:
            self.exporter.observe_epoch(record["epoch"], valid)
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        line = (
            f"epoch {record['epoch']}: elbo={record['elbo']:.6g} kl={record['kl']:.6g} "
            f"nll={record['nll']:.6g} ({record['seconds']:.2f}s)"
        )
        if "valid_mrr" in record:
            line += f" valid_mrr={record['valid_mrr']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(elbo=f"{record['elbo']:.5g}", kl=f"{record['kl']:.4g}", nll=f"{record['nll']:.5g}")
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.exporter is not None:
            self.exporter.close()
