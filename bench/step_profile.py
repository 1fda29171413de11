"""Where a training step's time goes, and how far it is from this machine's bounds.

One training process (``Training.train_epoch``, the function ``train`` runs) on wn18rr with
``bench.throughput``'s task at PyTorch-BigGraph's exact sampling: V-ComplEx (LIM, row-wise Adagrad,
per-occurrence KL), 64 complex dimensions, the Bernoulli objective, batch 1024 in chunks of 32 positives
sharing 32 head and 32 tail negatives. Epochs alternate between 1 and 2 threads, so both see the same
stretches of this machine's drifting speed; each compiled kernel is timed inside the step, and what is
left of the step (Python, the small torch operations, the relations' path) is the step minus them. The
table gives medians over the epochs of each thread count, the first two epochs dropped.

The bounds are measured in the same run: the machine's GEMM rate (``torch.mm`` of 1024 x 1024 matrices on
2 threads) against the multiply-adds a step's chunked products need (forward: each positive against its
chunk's K negatives; backward: the queries' and the negatives' gradients: 3 B K D multiply-adds a step),
and its memory bandwidth (a 1 GiB copy) against the least traffic a step makes (each distinct entity row
it touches read and written once: mean, log-variance and optimiser state).

    make bench-step                  # or: python -m bench.step_profile [--epochs N] [--dataset D]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import sharding.gaussian
import sharding.kernels.native
from bench.common import machine, markdown_table, write_results
from bench.throughput import BATCH, COMPLEX_DIM, task_overrides
from sharding.exchange import LocalExchange
from storage.dataset import load_data
from trainer.config import load_config
from trainer.loop import Training

CHUNK, NEGATIVES = 32, 64  # PBG's exact sampling: nvkg's k counts both sides (bench/throughput.py)
KERNELS = ("bernoulli_ms", "sample_kl_ms", "entity_update_ms")
"""What each column times: the Bernoulli NLL and its gradients (bilinear.c), the owners' sample and KL pass
(noise.c), the entity table's update (row-wise Adagrad with the sample's backward, noise.c; the relations'
update, a torch path on the same class, is left in the rest)."""
WARM_UP = 2


def timed_functions(run: Training) -> dict[str, tuple[object, str]]:
    """Where each of ``KERNELS`` is called: a module's function, or the entity table's own method (set on
    the instance, so the relation table's ``step`` of the same class is not counted)."""
    return {
        "bernoulli_ms": (sharding.kernels.native, "bernoulli_forward_backward"),
        "sample_kl_ms": (sharding.gaussian, "stream_sample_and_kl"),
        "entity_update_ms": (run.model.entities, "step"),
    }


class Timers:
    """Seconds spent in, and calls of, each of ``KERNELS`` since the last ``reset``, and the distinct
    entity rows the Bernoulli kernel was handed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.rows: list[int] = []
        self._installed: list[tuple[object, str, bool, Callable]] = []

    def install(self, functions: dict[str, tuple[object, str]]) -> None:
        for column, (owner, name) in functions.items():
            original = getattr(owner, name)
            own = name in vars(owner)  # a module's function; an instance's method lives on its class
            self._installed.append((owner, name, own, original))
            setattr(owner, name, self._timed(column, original))

    def remove(self) -> None:
        for owner, name, own, original in reversed(self._installed):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._installed.clear()

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.rows.clear()

    def _timed(self, column: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            if column == "bernoulli_ms":
                self.rows.append(len(args[0].entities))
            self.calls[column] += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[column] += time.perf_counter() - started

        return timed


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gemm_gflops(threads: int = 2, size: int = 1024, repeats: int = 5) -> float:
    """The best of ``repeats`` timings of 20 products of ``size`` x ``size`` matrices, in GFLOP/s."""
    with _threads(threads):
        return _gemm_gflops(size, repeats)


def _gemm_gflops(size: int, repeats: int) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    c = torch.empty(size, size)
    torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(20):
            torch.mm(a, b, out=c)
        best = max(best, 20 * 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def copy_gbps(threads: int = 2, numbers: int = 1 << 28, repeats: int = 5) -> float:
    """The best of ``repeats`` copies of 1 GiB (read and written), in GB/s."""
    with _threads(threads):
        return _copy_gbps(numbers, repeats)


def _copy_gbps(numbers: int, repeats: int) -> float:
    source, target = torch.ones(numbers), torch.zeros(numbers)
    target.copy_(source)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = max(best, 2 * source.numel() * source.element_size() / (time.perf_counter() - started) / 1e9)
    return best


def row_bytes(run: Training) -> int:
    """Bytes of one entity row with its optimiser state: what an update reads and writes of it."""
    table = run.model.entities
    state = [t for t in table.optimizer.state_dict().values() if isinstance(t, torch.Tensor) and t.dim() == 2]
    return sum(t.shape[1] * t.element_size() for t in (table.weight, *state))


def set_up(dataset: str, out: Path) -> Training:
    overrides = task_overrides(dataset, "lim", "rowwise_adagrad", CHUNK, NEGATIVES)
    config = load_config(None, [*overrides, "train.epochs=1000", "train.device=cpu"])
    data = load_data(config.data)
    return Training.set_up(config, out, data, LocalExchange(), None)


def profile(run: Training, epochs: int) -> dict[int, list[dict[str, float]]]:
    """Per thread count (1, 2), each epoch's per-step milliseconds: the step, each kernel, the rest."""
    if not run.model.writes_gradients:
        raise RuntimeError(
            "the step does not run the compiled Bernoulli kernel here (no C compiler, NVKG_NATIVE=0, or not "
            "on the CPU): there is nothing to profile; see sharding/kernels/native.py"
        )
    timers, threads_before = Timers(), torch.get_num_threads()
    try:
        timers.install(timed_functions(run))
        per_threads: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for epoch in range(epochs):
            threads = 1 + epoch % 2
            torch.set_num_threads(threads)
            timers.reset()
            record = run.train_epoch(epoch)
            steps = run.schedule.num_steps
            row = {"step_ms": record["seconds"] / steps * 1e3}
            row |= {column: timers.seconds[column] / steps * 1e3 for column in KERNELS}
            row["rest_ms"] = row["step_ms"] - sum(row[column] for column in KERNELS)
            row["distinct_rows"] = statistics.mean(timers.rows)
            row["calls_per_step"] = {column: timers.calls[column] / steps for column in KERNELS}
            if epoch >= WARM_UP:
                per_threads[threads].append(row)
        return per_threads
    finally:
        timers.remove()
        torch.set_num_threads(threads_before)


def summarise(per_threads: dict[int, list[dict[str, float]]], bounds: dict[str, float]) -> list[dict]:
    rows = []
    for threads, epochs in per_threads.items():
        row: dict = {"threads": threads, "epochs": len(epochs)}
        row |= {k: statistics.median(e[k] for e in epochs) for k, v in epochs[0].items() if not isinstance(v, dict)}
        row["positives_per_s"] = BATCH / row["step_ms"] * 1e3
        rows.append(row)
    one, two = rows
    rows.append({"threads": "1 / 2", **{k: one[k] / two[k] for k in ("step_ms", *KERNELS, "rest_ms")}})
    # The products' multiply-adds a step: forward B K D, backward 2 B K D (D real numbers a row).
    products = 3 * BATCH * NEGATIVES * 2 * COMPLEX_DIM * 2 / 1e6
    two["products_gflops"] = products / two["bernoulli_ms"]
    bounds |= {
        "products_mflop_per_step": products,
        "products_floor_ms": products / bounds["gemm_gflops"],
        "traffic_mb_per_step": two["distinct_rows"] * bounds["row_bytes"] * 2 / 1e6,
    }
    bounds["traffic_floor_ms"] = bounds["traffic_mb_per_step"] / bounds["copy_gbps"]
    return rows


def markdown(rows: list[dict], bounds: dict[str, float], dataset: str) -> str:
    two = rows[1]
    lines = [
        f"# Where a step's time goes ({dataset}, V-ComplEx LIM, row-wise Adagrad, Bernoulli, batch {BATCH} "
        f"in chunks of {CHUNK} sharing {NEGATIVES // 2} head + {NEGATIVES // 2} tail negatives)\n",
        "Milliseconds a step, medians over epochs alternating between 1 and 2 threads in one process; the "
        "last row is 1 thread's time over 2 threads'. `rest`: the step minus the three kernels (Python, small "
        "torch operations, the relations' path).\n",
        markdown_table(rows, ["threads", "epochs", "step_ms", *KERNELS, "rest_ms", "positives_per_s"]),
        "\n## Bounds, measured in the same run\n",
        f"- GEMM: {bounds['gemm_gflops']:.0f} GFLOP/s (`torch.mm`, 1024^3, 2 threads). The chunked products "
        f"need {bounds['products_mflop_per_step']:.1f} MFLOP a step: {bounds['products_floor_ms']:.3f} ms at "
        f"that rate. The Bernoulli kernel (products and everything else it does) ran at "
        f"{two['products_gflops']:.0f} GFLOP/s of products on 2 threads.",
        f"- Memory: {bounds['copy_gbps']:.1f} GB/s (a 1 GiB copy, 2 threads). A step touches "
        f"{two['distinct_rows']:.0f} distinct entity rows of {bounds['row_bytes']} bytes (mean, log-variance, "
        f"optimiser state): {bounds['traffic_mb_per_step']:.1f} MB read and written at least, "
        f"{bounds['traffic_floor_ms']:.3f} ms at that rate.",
        f"- The step on 2 threads: {two['step_ms']:.3f} ms, {two['step_ms'] / bounds['products_floor_ms']:.1f}x "
        f"the products' floor and {two['step_ms'] / bounds['traffic_floor_ms']:.1f}x the traffic's.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="wn18rr")
    parser.add_argument("--epochs", type=int, default=16, help="epochs in all, alternating 1 and 2 threads")
    args = parser.parse_args()
    if args.epochs < WARM_UP + 2:
        parser.error(f"--epochs: at least {WARM_UP + 2} (the first {WARM_UP} are dropped)")
    with tempfile.TemporaryDirectory(prefix="nvkg-step-") as out:
        run = set_up(args.dataset, Path(out))
        per_threads = profile(run, args.epochs)
        bounds = {"gemm_gflops": gemm_gflops(), "copy_gbps": copy_gbps(), "row_bytes": row_bytes(run)}
    rows = summarise(per_threads, bounds)
    payload = {"dataset": args.dataset, "machine": machine(), "rows": rows, "bounds": bounds,
               "epochs": per_threads}  # fmt: skip
    write_results(f"step-profile-{args.dataset}", payload, markdown(rows, bounds, args.dataset))


if __name__ == "__main__":
    main()
