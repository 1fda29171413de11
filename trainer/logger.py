"""Where training numbers go: the per-epoch JSON-lines log, the progress bar and stdout.

One small interface (step / epoch / close); a metrics exporter is one more backend of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from trainer.io import atomic_write_text

LOG_NAME = "log.jsonl"
STEPS_NAME = "steps.jsonl"


class RunLogger:
    def __init__(
        self, out_dir: Path, *, total_steps: int, progress: bool, enabled: bool = True, log_steps: bool = False
    ):
        """``enabled`` False (ranks other than 0) makes every call a no-op."""
        self.path = Path(out_dir) / LOG_NAME
        self.steps_path = Path(out_dir) / STEPS_NAME if log_steps else None
        self.total_steps = total_steps
        self.progress = progress
        self.enabled = enabled
        self.bar: tqdm | None = None

    def start(self, done_steps: int, done_epochs: int) -> None:
        """Open the log, dropping records past the checkpoint a resumed run starts from."""
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

    def step(self, nll: float, kl: float, *, epoch: int, step: int, loss: float) -> None:
        if self.steps_path is not None and self.enabled:
            record = {"epoch": epoch, "step": step, "nll": nll, "kl": kl, "loss": loss}
            with self.steps_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(nll=f"{nll:.4g}", kl=f"{kl:.4g}", refresh=False)

    def epoch(self, record: dict) -> None:
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
