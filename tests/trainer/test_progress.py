"""The evaluation's progress bar: on a terminal with train.progress=true, never in a pipe (test logs)."""

import io
import sys

import pytest

from tests.trainer.conftest import make_config
from trainer.loop import train


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("terminal", "progress", "shown"), [(True, True, True), (True, False, False),
                                                             (False, True, False)])  # fmt: skip
def test_evaluation_bar(tiny_dataset, tmp_path, monkeypatch, terminal, progress, shown):
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    config = make_config("train.epochs=2", "train.eval_every=1", f"train.progress={str(progress).lower()}")
    train(config, tmp_path / "run", dataset=tiny_dataset)
    text = stream.getvalue()
    # The periodic validations and the final evaluation of valid and test.
    assert all((label in text) == shown for label in ("evaluating valid", "evaluating test")), text
