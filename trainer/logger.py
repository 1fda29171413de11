"""Where training numbers go: the per-epoch JSON-lines log, the per-step log, the progress bar, stdout,
TensorBoard and the Prometheus exporter. One small interface (start / step / timed / epoch / close) with
those backends.

The files, TensorBoard and the bar belong to rank 0 (``enabled``); every rank feeds its own metrics endpoint.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from storage.atomic import atomic_write_text
from trainer.metrics import MetricsExporter

LOG_NAME = "log.jsonl"
STEPS_NAME = "steps.jsonl"
TENSORBOARD_DIR = "tensorboard"
SCALARS = {"train/elbo": "elbo", "train/kl": "kl", "train/nll": "nll", "valid/mrr": "valid_mrr", "train/lr": "lr"}
"""TensorBoard tag -> log.jsonl key of the per-epoch scalars (the step is the epoch)."""


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
        tensorboard: bool = False,
    ):
        self.path = Path(out_dir) / LOG_NAME
        self.steps_path = Path(out_dir) / STEPS_NAME if log_steps and enabled else None
        self.tensorboard_dir = Path(out_dir) / TENSORBOARD_DIR if tensorboard and enabled else None
        self.total_steps, self.progress, self.enabled = total_steps, progress, enabled
        self.exporter, self.variance_every, self.lr = exporter, variance_every, lr
        self.bar: tqdm | None = None
        self.board: TensorBoard | None = None

    def start(self, done_steps: int, done_epochs: int) -> None:
        """Open the logs, dropping records past the checkpoint a resumed run starts from."""
        if not self.enabled:
            return
        self._truncate(done_epochs)
        if self.tensorboard_dir is not None:
            self.board = TensorBoard(self.tensorboard_dir, done_epochs)
        if self.progress:
            self.bar = tqdm(
                total=self.total_steps, initial=done_steps, unit="step", dynamic_ncols=True, mininterval=1.0
            )

    def rewind(self, done_steps: int, done_epochs: int, lr: float) -> None:
        """Training starts again after epoch ``done_epochs`` (a rollback): drop the later records."""
        self.lr = lr
        if not self.enabled:
            return
        self._truncate(done_epochs)
        if self.board is not None:
            self.board.close()
            self.board = TensorBoard(self.board.directory, done_epochs)
        if self.bar is not None:
            self.bar.reset(total=self.total_steps)
            self.bar.update(done_steps)

    def _truncate(self, done_epochs: int) -> None:
        for path in (self.path, self.steps_path):
            if path is not None and path.exists():
                kept = [line for line in _records(path) if json.loads(line)["epoch"] <= done_epochs]
                atomic_write_text(path, "".join(line + "\n" for line in kept))

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
                    self.exporter.observe_variance(model.entities.mean_variance())
        if self.steps_path is not None:
            record = {"epoch": epoch, "step": step, "nll": totals.nll, "kl": totals.kl, "loss": totals.loss}
            with self.steps_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(nll=f"{totals.nll:.4g}", kl=f"{totals.kl:.4g}", refresh=False)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Time the block into the ``what`` (evaluation, checkpoint) duration histogram."""
        started = time.perf_counter()
        yield
        if self.exporter is not None:
            self.exporter.observe_duration(what, time.perf_counter() - started)

    def epoch(self, record: dict, valid: dict | None = None) -> None:
        if self.exporter is not None:
            self.exporter.observe_epoch(record["epoch"], valid, record.get("collapsed_fraction"))
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.board is not None:
            # The learning rate is in the record when it evaluated (before a reduce-on-plateau changed it).
            self.board.write({"lr": self.lr, **record})
        line = (
            f"epoch {record['epoch']}: elbo={record['elbo']:.6g} kl={record['kl']:.6g} "
            f"nll={record['nll']:.6g} ({record['seconds']:.2f}s)"
        )
        if "valid_mrr" in record:
            sampled = " (sampled candidates)" if record.get("valid_protocol") == "sampled" else ""
            line += f" valid_mrr={record['valid_mrr']:.4f}{sampled}"
        if self.bar is not None:
            self.bar.set_postfix(elbo=f"{record['elbo']:.5g}", kl=f"{record['kl']:.4g}", nll=f"{record['nll']:.5g}")
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            self.board.close()
        if self.exporter is not None:
            self.exporter.close()


class TensorBoard:
    """Per-epoch scalars as TensorBoard event files (tensorboardX: protobuf and numpy only, no TensorFlow)."""

    def __init__(self, directory: Path, done_epochs: int):
        from tensorboardX import SummaryWriter

        self.directory = directory
        # Every start (fresh, resumed, rolled back) opens a new event file that tells TensorBoard to drop the
        # older files' points past the checkpoint, as log.jsonl drops its records. tensorboardX names a file
        # by the second it was opened: the suffix keeps a rollback's file within the same second apart, and
        # after the older one in TensorBoard's (name) order.
        self.writer = SummaryWriter(str(directory), purge_step=done_epochs + 1, filename_suffix=f".{time.time_ns()}")

    def write(self, record: dict) -> None:
        for tag, key in SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _records(path: Path) -> list[str]:
    """The lines of a JSON-lines log; a torn last line (the writer was killed mid-write) is dropped, any
    other unreadable line is an error naming the file and line."""
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("no epoch")
        except ValueError:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: dropping a torn last line", stacklevel=3)
                break
            raise ValueError(f"{path}:{number}: not a log record (delete the run directory or fix the line)") from None
        records.append(line)
    return records
