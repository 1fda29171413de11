"""What a resume refuses, and that a refusal leaves the run as it was."""

import re
import shutil

import pytest

import trainer.cli
from trainer import checkpoint
from trainer.config import load_config
from trainer.loop import train

BASE = ["data.dataset=nations", "model.dim=4", "train.epochs=1", "train.progress=false", "train.batch_size=512"]


@pytest.fixture
def run(tmp_path):
    config = load_config(None, [*BASE, f"data.cache_dir={tmp_path / 'cache'}"])
    train(config, tmp_path / "run")
    return tmp_path / "run", config


def test_a_refused_resume_names_each_field_and_leaves_the_run_s_config(run):
    out, config = run
    before = (out / "config.yaml").read_text()
    for override, message in [
        ("model.dim=8", "model.dim: 4 -> 8"),
        ("objective.kl_weight=0.5", "objective.kl_weight: 1.0 -> 0.5"),
        ("optim.optimizer=rowwise_adagrad", "optim.optimizer: 'adam' -> 'rowwise_adagrad'"),
    ]:
        changed = load_config(None, [*BASE, f"data.cache_dir={config.data.cache_dir}", "train.epochs=2", override])
        with pytest.raises(ValueError, match=f"other settings, which a run cannot change: {message}; use another"):
            train(changed, out)
        assert (out / "config.yaml").read_text() == before, override
        assert checkpoint.read_restarts(out) == 0  # a refused start is no restart


def test_a_checkpoint_without_its_index_or_with_a_foreign_shard_is_refused_naming_it(run, tmp_path):
    out, config = run
    latest = out / checkpoint.LATEST
    other = load_config(None, [*BASE, "model.dim=6", f"data.cache_dir={config.data.cache_dir}"])
    train(other, tmp_path / "other")
    (shard,) = latest.glob("entities-*.pt")
    shutil.copy(next((tmp_path / "other" / checkpoint.LATEST).glob("entities-*.pt")), shard)
    with pytest.raises(ValueError, match=f"^{latest} \\(entity shards\\): checkpoint rows have width"):
        train(config, out)
    (latest / checkpoint.INDEX).unlink()
    with pytest.raises(ValueError, match=f"^{latest}: a checkpoint without its index.json"):
        train(config, out)
    assert shard.exists()  # nothing trained over it


def test_the_dataset_option_is_taken_as_written(capsys):
    for name in ("kg #1", "2024", "null", "[kg"):  # a comment, a number, YAML's null, a flow sequence
        assert trainer.cli.main(["config", "--dataset", name, "--show"]) == 0
        assert f"data.dataset = {name!r}" in capsys.readouterr().out


def test_a_run_whose_best_checkpoint_is_gone_says_which_it_loads(tmp_path):
    from trainer.runs import load_run

    config = load_config(None, [*BASE, "train.epochs=2", "train.eval_every=1", f"data.cache_dir={tmp_path / 'c'}"])
    train(config, tmp_path / "run")
    assert load_run(tmp_path / "run").checkpoint == tmp_path / "run" / checkpoint.BEST
    shutil.rmtree(tmp_path / "run" / checkpoint.BEST)
    with pytest.warns(UserWarning, match=r"best/ \(epoch \d\) is missing; using checkpoint/ \(epoch 2\) instead"):
        assert load_run(tmp_path / "run").checkpoint == tmp_path / "run" / checkpoint.LATEST


def test_a_resume_that_raises_the_epochs_does_not_warm_the_kl_up_again(tmp_path):
    import json

    warm = [*BASE, "objective.kl_warmup=0.5", f"data.cache_dir={tmp_path / 'c'}"]
    train(load_config(None, [*warm, "train.epochs=4"]), tmp_path / "run")
    train(load_config(None, [*warm, "train.epochs=12"]), tmp_path / "run")  # half of 12 would be 6 epochs
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["kl_multiplier"] for r in log if "kl_multiplier" in r] == [0.0, 0.0] + [1.0] * 10


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({"epoch": "3"}, "state.epoch='3': expected an integer >= 0"),
        ({"epoch": -2}, "state.epoch=-2: expected an integer >= 0"),
        ({"epoch": 3.5}, "state.epoch=3.5: expected an integer >= 0"),
        ({"lr": -1.0}, "state.lr=-1.0: expected a positive number"),
        ({"lr": "0.01"}, "state.lr='0.01': expected a finite number"),
        ({"best_mrr": "x"}, "state.best_mrr='x': expected a finite number"),
        ({"epoch": None}, "state.epoch=None: expected an integer >= 0"),
    ],
)
def test_an_edited_index_is_refused_naming_the_field(run, edit, problem):
    import json

    out, config = run
    index = out / checkpoint.LATEST / checkpoint.INDEX
    saved = json.loads(index.read_text())
    log = (out / "log.jsonl").read_text()
    index.write_text(json.dumps({**saved, "state": {**saved["state"], **edit}}))
    with pytest.raises(ValueError, match=re.escape(f"{index}: not an nvkg checkpoint index ({problem})")):
        train(config, out)
    assert (out / "log.jsonl").read_text() == log  # refused before the log was touched
    index.write_text(json.dumps({**saved, "state": {k: v for k, v in saved["state"].items() if k != "epoch"}}))
    with pytest.raises(ValueError, match=r"missing key 'state\.epoch'"):
        train(config, out)


def test_another_run_s_shard_is_refused_under_either_name(run, tmp_path):
    out, config = run
    latest = out / checkpoint.LATEST
    kinships = load_config(None, [*BASE, "data.dataset=kinships", f"data.cache_dir={config.data.cache_dir}"])
    train(kinships, tmp_path / "kinships")
    (theirs,) = (tmp_path / "kinships" / checkpoint.LATEST).glob("entities-*.pt")
    (ours,) = latest.glob("entities-*.pt")
    shutil.copy(theirs, latest / theirs.name)  # beside ours, under its own name
    with pytest.raises(ValueError, match=f"^{re.escape(str(latest / theirs.name))}: rows \\[0, 104\\) past the"):
        train(config, out)
    (latest / theirs.name).unlink()
    shutil.copy(theirs, ours)  # over ours
    with pytest.raises(ValueError, match=f"^{re.escape(str(ours))}: holds rows \\[0, 104\\], not the \\[0, 14\\)"):
        train(config, out)
