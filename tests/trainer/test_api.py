"""trainer/api.py: each function gives what its command gives, from a config object or a YAML file."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from trainer import api, report
from trainer.config import load_config

ROOT = Path(__file__).parents[2]
SHORT = {"train.epochs": 2, "model.dim": 16, "train.eval_every": 1, "train.progress": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> api.Trained:
    return api.train(ROOT / "configs/default.yaml", tmp_path_factory.mktemp("api") / "run", dataset="nations",
                     overrides=SHORT)  # fmt: skip


@pytest.fixture(scope="module")
def run(trained) -> api.Run:
    return api.load_run(trained.run_dir)


def test_make_config_applies_dataset_and_overrides_to_a_copy():
    base = load_config(ROOT / "configs/default.yaml")
    made = api.make_config(base, dataset=Path("data/mygraph"), overrides={"model.dim": 32, "optim.lr": 1})
    assert (made.data.dataset, made.model.dim, made.optim.lr) == ("data/mygraph", 32, 1.0)
    assert base == load_config(ROOT / "configs/default.yaml")  # left unchanged
    from_file = api.make_config(ROOT / "configs/default.yaml", dataset="nations", overrides={"model.dim": 32})
    assert from_file == load_config(ROOT / "configs/default.yaml", ["data.dataset=nations", "model.dim=32"])
    assert api.make_config() == load_config()


def test_make_config_docstring_example_holds():
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(api.make_config, "make_config", globs=vars(api)):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.dimension": 8}, "model.dimension"),
        ({"train.epochs": "many"}, "train.epochs"),
        ({"model.dim": 0}, "model.dim"),
        ({"train.epochs.x": 1}, "epochs is not a section"),
    ],
)
def test_make_config_refuses_a_bad_key_naming_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        api.make_config(overrides=overrides)


def test_train_returns_metrics_json_and_a_config_object_trains_the_same(trained, tmp_path):
    assert trained.metrics == json.loads((trained.run_dir / "metrics.json").read_text())
    assert trained.metrics["epochs_trained"] == 2 and trained.metrics["test"]["filtered"]["mrr"] > 0
    config = api.make_config(ROOT / "configs/default.yaml", dataset="nations", overrides=SHORT)
    again = api.train(config, tmp_path / "again")
    assert again.run_dir == tmp_path / "again"
    assert again.metrics["test"] == trained.metrics["test"]


def test_predict_is_the_command_and_takes_a_run_or_its_directory(trained, run):
    fact = run.dataset.test[0].tolist()
    head = run.dataset.names("entities")["name"][fact[0]].as_py()
    relation = run.dataset.names("relations")["name"][fact[1]].as_py()
    result = api.predict(run, head=head, relation=relation, top_k=3, samples=5)
    assert result == report.predict(run, head=head, relation=relation, tail=None, top_k=3, samples=5)
    assert result == api.predict(trained.run_dir, head=head, relation=relation, top_k=3, samples=5)
    assert len(result["predictions"]) == 3 and not result["query"]["calibrated"]
    assert "rank  tail" in api.format_predictions(result)
    with pytest.raises(ValueError, match="exactly one"):
        api.predict(run, relation=relation)
    with pytest.raises(ValueError, match="unknown entity"):
        api.predict(run, head="atlantis", relation=relation)


def test_calibrate_stores_calibration_that_predict_and_classify_then_use(tmp_path_factory):
    trained = api.train(None, tmp_path_factory.mktemp("calibrated") / "run", dataset="nations", overrides=SHORT)
    run = api.load_run(trained.run_dir)
    fitted = api.calibrate(run, samples=5)
    assert fitted == json.loads((trained.run_dir / "calibration.json").read_text())
    assert fitted["test"]["seed"] == run.config.train.seed
    assert {"before", "after"} <= set(fitted["test"]["magnitude"])
    tail = run.dataset.names("entities")["name"][0].as_py()
    relation = run.dataset.names("relations")["name"][0].as_py()
    result = api.predict(run, tail=tail, relation=relation, top_k=2, samples=5)
    assert result["query"]["calibrated"] and all("calibrated_probability" in row for row in result["predictions"])
    classified = api.classify(trained.run_dir, seed=3)
    assert classified == json.loads((trained.run_dir / "classification.json").read_text())
    assert classified["seed"] == 3 and "calibrated" in classified


def test_classify_writes_where_asked(run, tmp_path):
    out = tmp_path / "classified.json"
    assert api.classify(run, out=out) == json.loads(out.read_text())
    assert 0 <= json.loads(out.read_text())["test"]["accuracy"] <= 1
    assert api.classify(run, out=out, measure="magnitude")["measure"] == "magnitude"


def test_export_picks_the_format_from_the_name(run, tmp_path):
    parquet = api.export(run, tmp_path / "emb.parquet")
    tsv = api.export(run, tmp_path / "emb.tsv")
    forced = api.export(run, tmp_path / "emb.data", fmt="tsv")
    table = pq.read_table(parquet)
    assert table.num_rows == run.dataset.num_entities + 2 * run.dataset.num_relations  # with the reciprocals
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == table.column_names and len(lines) == table.num_rows + 1
    assert forced.read_text() == tsv.read_text()
    with pytest.raises(ValueError, match="is a directory"):
        api.export(run, tmp_path)


def test_report_writes_figures_under_the_run(run):
    summary = api.report(run, samples=5)
    out = run.directory / "report"
    assert json.loads((out / "report.json").read_text())["figures"] == summary["figures"]
    assert all((out / name).is_file() for name in summary["figures"].values())


def test_matmul_precision_is_applied_for_the_run(tmp_path, tiny_dataset):
    """TF32 (high) is what a CUDA run asks for; the setting reaches torch before the first step."""
    import torch

    from tests.trainer.conftest import make_config
    from trainer.loop import train

    before = torch.get_float32_matmul_precision()
    try:
        train(make_config("train.epochs=1", "train.matmul_precision=high"), tmp_path, tiny_dataset)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
