import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_train_writes_the_run_directory_and_evaluate_reproduces_it(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "--config",
        "configs/default.yaml",
        "--dataset",
        "nations",
        "--set",
        "train.epochs=3",
        "--set",
        "model.dim=16",
        "--set",
        "train.eval_every=1",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert f"run directory: {out}" in result.stdout and "filtered" in result.stdout
    for name in ("config.yaml", "log.jsonl", "metrics.json", "checkpoint/index.json", "best/relations.pt"):
        assert (out / name).is_file(), name
    assert len(list((out / "checkpoint").glob("entities-*.pt"))) == 1
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"epoch", "elbo", "kl", "nll", "seconds"} <= set(records[0])
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("valid", "test"):
        for kind in ("filtered", "raw"):
            assert set(metrics[split][kind]) == {"mr", "mrr", "hits@1", "hits@3", "hits@10"}
    assert metrics["dropped_facts"] == 0 and metrics["train_seconds"] > 0

    evaluated = run_cli("evaluate", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["test"] == metrics["test"]


def test_bad_dataset_line_is_reported_with_file_and_line(tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "train.txt").write_text("a\tr\tb\nonly-two\tfields\n")
    (data / "valid.txt").write_text("a\tr\tb\n")
    (data / "test.txt").write_text("a\tr\tb\n")
    result = run_cli("train", "--dataset", str(data), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "train.txt:2: expected 3" in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "--set", "model.latent=bayes"), "model.latent='bayes'"),
        (("train", "--config", "no/such.yaml"), "config file not found"),
        (("evaluate", "no/such/run"), "config file not found"),
    ],
)
def test_cli_errors_are_one_clear_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("installed", [False, True], ids=["checkout", "installed"])
def test_submit_uploads_only_nvkg_sources(tmp_path, monkeypatch, installed):
    """A checkout is the job's working_dir; an installed package sits among every other library, so the job
    gets a copy of its three packages instead of the whole site-packages."""
    import trainer.cli
    import trainer.ray_launch

    root = ROOT
    if installed:
        root = tmp_path / "site-packages"
        for package in ("trainer", "sharding", "storage", "torch"):
            (root / package).mkdir(parents=True)
            (root / package / "__init__.py").write_text("")
        monkeypatch.setattr(trainer.cli, "ROOT", root)
    uploaded = []

    def fake_submit(address: str, args: list[str], *, working_dir: Path) -> str:
        uploaded.append({p.name for p in Path(working_dir).iterdir()})
        return "job-1"

    monkeypatch.setattr(trainer.ray_launch, "submit", fake_submit)
    assert trainer.cli.main(["submit", "--address", "http://127.0.0.1:1", "--out", str(tmp_path / "run")]) == 0
    if installed:
        assert uploaded == [{"trainer", "sharding", "storage"}]
    else:
        assert {"trainer", "sharding", "storage", "pyproject.toml"} <= uploaded[0]
