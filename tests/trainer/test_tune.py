"""`tune`: the search space file, the reporter seam of the training loop, and a real 4-trial ASHA search
on a local Ray head (trainer/tune.py)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharding.exchange import LocalExchange
from tests.sharding.conftest import free_port, read_jsonl
from tests.trainer.conftest import make_config
from trainer import checkpoint
from trainer.config import load_config
from trainer.loop import train
from trainer.tune import Dimension, load_space, most_evaluations

ROOT = Path(__file__).parents[2]


def _space(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(path, load_config(None, []))


def test_a_space_reads_distributions_lists_and_fixed_values(tmp_path):
    space = _space(
        tmp_path,
        "optim.lr: {loguniform: [1e-3, 1.0e-1]}\n"  # 1e-3 is a string to YAML 1.1
        "model.dim: {choice: [16, 32]}\n"
        "train.batch_size: {qrandint: [256, 2048, 256]}\n"
        "model.latent: {grid: [lim, lfm]}\n"
        "train.epochs: 5\n",
    )
    assert space == {
        "optim.lr": Dimension("loguniform", (0.001, 0.1)),
        "model.dim": Dimension("choice", (16, 32)),
        "train.batch_size": Dimension("qrandint", (256, 2048, 256)),
        "model.latent": Dimension("grid", ("lim", "lfm")),
        "train.epochs": Dimension("fixed", (5,)),
    }
    assert space["model.latent"].domain() == {"grid_search": ["lim", "lfm"]}
    assert space["train.epochs"].domain() == 5


def test_asha_rungs_reach_the_longest_trial_the_space_can_draw(tmp_path):
    base = load_config(None, ["train.epochs=10", "train.eval_every=2"])
    assert most_evaluations(base, _space(tmp_path, "optim.lr: {uniform: [0.01, 0.1]}")) == 5  # the config's
    # 25 epochs evaluated every 2: 13 validations (the last after epoch 25); a choice's values all count.
    assert most_evaluations(base, _space(tmp_path, "train.epochs: {randint: [5, 26]}")) == 13
    both = "train.epochs: {choice: [4, 12]}\ntrain.eval_every: {choice: [3, 1]}"
    assert most_evaluations(base, _space(tmp_path, both)) == 12


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim.lrr: {uniform: [0, 1]}", "optim.lrr: not a config key"),
        ("lr: {uniform: [0, 1]}", "lr: not a config key"),
        ("optim.lr: {normal: [0, 1]}", "optim.lr: unknown distribution 'normal'"),
        ("optim.lr: {uniform: [1, 0]}", "optim.lr: uniform: the lower bound 1 is not below the upper bound 0"),
        ("optim.lr: {loguniform: [0, 1]}", "optim.lr: loguniform: the lower bound must be positive"),
        ("train.epochs: {randint: [1, 2.5]}", "train.epochs: expected an integer, got 2.5"),
        ("model.dim: {choice: [16, 15]}", "model.dim=15: ComplEx needs an even dim"),
        ("optim.lr: {uniform: [-1, 1]}", "optim.lr=-1.0: must be >= 0"),
        ("model.latent: {choice: []}", "model.latent: choice: expected a non-empty list"),
        ("- 1", "expected a mapping"),
        ("train.epochs: {uniform: [1, 3]}", "train.epochs: train.epochs: expected int, got 1.0"),  # draws 2.0
        ("train.epochs: {quniform: [1, 3, 1]}", "train.epochs: train.epochs: expected int, got 1.0"),
        ("optim.lr: {quniform: [0.1, 0.2, 0]}", "optim.lr: quniform: the step q must be positive, got 0"),
        ("train.epochs: {qrandint: [1, 9, -2]}", "train.epochs: qrandint: the step q must be positive, got -2"),
        ("model.dim: {randint: [4, 9]}", "model.dim: model.dim=5: ComplEx needs an even dim"),  # inside the range
        ("train.eval_every: 0", "tune: train.eval_every=0 evaluates only at the end"),  # before Ray starts
    ],
)
def test_a_bad_space_is_refused_naming_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ValueError, match="space.yaml: .*" + message.replace("(", r"\(").replace("[", r"\[")):
        _space(tmp_path, text)


class _Recording(checkpoint.Reporter):
    def __init__(self, out_dir: Path, exchange: LocalExchange) -> None:
        super().__init__(out_dir, exchange)
        self.records: list[dict] = []

    def evaluated(self, record: dict) -> None:
        self.records.append(dict(record))


def test_the_reporter_is_told_of_every_validation(tiny_dataset, tmp_path):
    """The seam a Tune trial reports through: once per periodic validation, with the logged record."""
    reporter = _Recording(tmp_path, LocalExchange())
    train(make_config("train.epochs=5", "train.eval_every=2"), tmp_path, dataset=tiny_dataset, reporter=reporter)
    assert [r["epoch"] for r in reporter.records] == [2, 4, 5]
    logged = [r for r in read_jsonl(tmp_path / "log.jsonl") if "valid_mrr" in r]
    assert [r["valid_mrr"] for r in reporter.records] == [r["valid_mrr"] for r in logged]


def _env(home):
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    return env


def _start_head(env) -> str:
    """`ray start --head` with 2 CPUs on 127.0.0.1 (token auth on, this HOME's token); its GCS address.
    A port picked free can be taken before Ray binds it: retried on fresh ports."""
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    errors = []
    for _ in range(3):
        port = free_port()
        head = ["ray", "start", "--head", "--num-cpus", "2", "--port", str(port), "--node-ip-address", "127.0.0.1",
                "--include-dashboard", "false", "--disable-usage-stats"]  # fmt: skip
        result = subprocess.run(head, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            return f"127.0.0.1:{port}"
        errors.append(result.stdout[-1500:] + result.stderr[-1500:])
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    raise RuntimeError("ray start --head failed 3 times:\n" + "\n---\n".join(errors))


@pytest.mark.slow
def test_a_four_trial_asha_search_on_nations(tmp_path):
    (tmp_path / "space.yaml").write_text("optim.lr: {loguniform: [1.0e-3, 1.0e-1]}\nmodel.dim: {choice: [16, 32]}\n")
    out, env = tmp_path / "search", _env(tmp_path)
    address = _start_head(env)
    settings = ["train.epochs=6", "train.eval_every=2", "train.batch_size=512", "train.num_threads=1"]
    command = [sys.executable, "-m", "trainer", "tune", "--dataset", "nations", "--space", str(tmp_path / "space.yaml"),
               "--trials", "4", "--address", address, "--out", str(out)]  # fmt: skip
    try:
        started = time.monotonic()
        result = subprocess.run([*command, *[a for s in settings for a in ("--set", s)]], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        seconds = time.monotonic() - started
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"4-trial search: {seconds:.1f}s")
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 4 and all("error" not in t and t["evaluations"] >= 1 for t in trials), trials
    best = json.loads((out / "best.json").read_text())
    assert best["valid_mrr"] == max(t["valid_mrr"] for t in trials)
    # best.yaml is a config like any other: the user's settings with the best trial's values.
    config = load_config(out / "best.yaml")
    assert (config.optim.lr, config.model.dim) == (best["params"]["optim.lr"], best["params"]["model.dim"])
    assert (config.data.dataset, config.train.epochs) == ("nations", 6)
    # What Tune was told is what the trials' own logs hold; the best run directory has its best checkpoint.
    for trial in trials:
        logged = {r["valid_mrr"] for r in read_jsonl(Path(trial["run_dir"]) / "log.jsonl") if "valid_mrr" in r}
        assert trial["valid_mrr"] in logged
    best_dir = Path(best["run_dir"])
    assert max(r.get("valid_mrr", 0) for r in read_jsonl(best_dir / "log.jsonl")) == best["valid_mrr"]
    assert (best_dir / "best" / checkpoint.INDEX).is_file()
    assert f"best run directory: {best['run_dir']}" in result.stdout


def test_keys_valid_alone_are_refused_where_a_trial_draws_them_together(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("model.scorer: {grid: [distmult, complex]}\nmodel.dim: {grid: [5, 8]}\n")
    base = load_config(None, ["model.scorer=distmult"])  # dim 5 alone is valid with it
    with pytest.raises(ValueError, match=r"a trial of model.scorer='complex', model.dim=5: model.dim=5: ComplEx"):
        load_space(path, base)
