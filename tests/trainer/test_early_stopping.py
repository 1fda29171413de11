"""Early stopping on the validation MRR: when it stops, what the final evaluation uses, and resuming."""

import json

import pytest

from tests.trainer.conftest import make_config
from trainer import checkpoint
from trainer.loop import train

# lr 0.1 on the tiny graph: the validation MRR peaks at an early epoch and then stalls and falls.
SETTINGS = ["train.epochs=30", "train.eval_every=1", "train.checkpoint_every=10", "optim.lr=0.1"]
PATIENCE = 3


def _log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def _without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_stops_after_patience_evaluations_and_evaluates_the_best(tmp_path, tiny_dataset, capsys):
    metrics = train(make_config(*SETTINGS, f"train.early_stopping_patience={PATIENCE}"), tmp_path, tiny_dataset)
    log = _log(tmp_path)
    mrrs = [r["valid_mrr"] for r in log]
    best_epoch = mrrs.index(max(mrrs)) + 1
    # It stops PATIENCE evaluations after the best, long before train.epochs, with every later MRR lower.
    assert len(log) == best_epoch + PATIENCE < 30
    assert all(m < max(mrrs) for m in mrrs[best_epoch:])
    assert log[-1]["early_stopped"] is True and not any(r.get("early_stopped") for r in log[:-1])
    assert (metrics["stopped_early"], metrics["epochs_trained"], metrics["best_epoch"]) == (True, len(log), best_epoch)
    assert json.loads((tmp_path / "metrics.json").read_text())["stopped_early"] is True
    assert f"early stopping: no better validation MRR in {PATIENCE} evaluations; stopping after epoch {len(log)}" in (
        capsys.readouterr().out
    )
    # The final evaluation loads best/, not the last (worse) state; the checkpoint holds the stopping epoch.
    assert metrics["valid"]["filtered"]["mrr"] == max(mrrs) > mrrs[-1]
    state = checkpoint.read_index(tmp_path / checkpoint.LATEST)["state"]
    assert (state["epoch"], state["evals_since_best"]) == (len(log), PATIENCE)


def test_a_resumed_run_stops_where_the_uninterrupted_one_did(tmp_path, tiny_dataset):
    full = make_config(*SETTINGS, f"train.early_stopping_patience={PATIENCE}")
    train(full, tmp_path / "full", tiny_dataset)
    stop = len(_log(tmp_path / "full"))

    # Interrupted one epoch before the stop, with a part of the patience already used, then resumed.
    partial = make_config(*SETTINGS, f"train.early_stopping_patience={PATIENCE}", f"train.epochs={stop - 1}")
    train(partial, tmp_path / "resumed", tiny_dataset)
    assert checkpoint.read_index(tmp_path / "resumed" / checkpoint.LATEST)["state"]["evals_since_best"] == PATIENCE - 1
    metrics = train(full, tmp_path / "resumed", tiny_dataset)
    assert _without_seconds(_log(tmp_path / "resumed")) == _without_seconds(_log(tmp_path / "full"))
    assert (metrics["stopped_early"], metrics["epochs_trained"]) == (True, stop)

    # A stopped run started again trains nothing more: it only evaluates its best checkpoint again.
    again = train(full, tmp_path / "resumed", tiny_dataset)
    assert len(_log(tmp_path / "resumed")) == stop
    assert again["valid"] == metrics["valid"] and again["stopped_early"] is True


def test_without_early_stopping_the_run_goes_on(tmp_path, tiny_dataset):
    metrics = train(make_config(*SETTINGS, "train.epochs=8"), tmp_path, tiny_dataset)
    assert len(_log(tmp_path)) == 8 and metrics["stopped_early"] is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.early_stopping_patience=0"], r"train.early_stopping_patience=0: must be > 0"),
        (["train.early_stopping_patience=2", "train.eval_every=0"], r"needs train.eval_every > 0"),
    ],
)
def test_patience_is_checked_at_the_door(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(*overrides)
