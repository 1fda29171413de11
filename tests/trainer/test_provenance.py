import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

import pytest
import torch

import trainer.cli
from storage.dataset import load_data
from trainer.config import load_config
from trainer.loop import train
from trainer.provenance import (
    JUDGING,
    PACKAGES,
    ROOT,
    git_commit,
    merged,
    same_training,
    training_code,
    training_record,
)

TINY = ["data.dataset=nations", "model.dim=4", "train.progress=false"]


def test_training_through_the_cli_runs_no_function_of_a_module_the_fingerprint_leaves_out(tmp_path: Path) -> None:
    """Left out of the fingerprint, code that training ran could change a run and not its record. Every
    function called (in any thread) while ``python -m trainer train`` trains and evaluates is traced."""
    called: set[str] = set()

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            called.add(frame.f_code.co_filename)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        overrides = [*TINY, "train.epochs=2", f"data.cache_dir={tmp_path / 'cache'}"]
        argv = ["train", *(a for o in overrides for a in ("--set", o)), "--out", str(tmp_path / "run")]
        assert trainer.cli.main(argv) == 0
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    ran = {path.relative_to(ROOT).as_posix() for path in map(_path, called) if path is not None}
    assert {"trainer/loop.py", "trainer/cli.py", "sharding/table.py", "storage/reader.py"} <= ran
    assert not ran & JUDGING, f"training ran {sorted(ran & JUDGING)}"


def _path(filename: str) -> Path | None:
    path = Path(filename).resolve()
    return path if path.is_relative_to(ROOT) else None


def copy_sources(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    return tmp_path


def test_the_fingerprint_changes_with_what_trains_and_not_with_what_judges(tmp_path, monkeypatch):
    root = copy_sources(tmp_path)
    before = training_code(root)
    assert before == training_code(ROOT)  # the tree's path does not enter it
    report = root / "trainer" / "report.py"
    report.write_text(report.read_text() + "\n# a change to a report\n")
    assert training_code(root) == before
    training = ("trainer/model.py", "trainer/cli.py", "sharding/kernels/bilinear.c", "sharding/kernels/vecmath.h")
    for changed in training:
        path = root / changed
        original = path.read_bytes()
        path.write_bytes(original + b" ")
        assert training_code(root) != before, changed
        path.write_bytes(original)
    assert training_code(root) == before
    (root / "sharding" / "extra.py").write_text("")  # a new module training could import
    assert training_code(root) != before
    (root / "sharding" / "extra.py").unlink()
    # Bytes moved from one file's end to the next file's start are another tree.
    a, b = root / "trainer" / "step.py", root / "trainer" / "tune.py"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(a_bytes[:-1])
    b.write_bytes(a_bytes[-1:] + b_bytes)
    assert training_code(root) != before
    b.write_bytes(b_bytes)
    a.write_bytes(a_bytes)
    # A name that is not a readable file (an editor's dangling lock link) is no source; a source that cannot
    # be read leaves the code unknown rather than stopping a run that has trained.
    (root / "trainer" / ".#loop.py").symlink_to(root / "nowhere")
    assert training_code(root) == before
    unreadable = root / "trainer" / "loop.py"
    read_bytes = Path.read_bytes

    def refuse(path):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert training_code(root) is None


def git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True,
                   capture_output=True)  # fmt: skip


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_commit_is_the_checkout_s_and_dirty_only_when_training_sources_changed(tmp_path):
    root = copy_sources(tmp_path / "repo")
    assert git_commit(root) is None  # not a checkout (an image)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "sources")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(root) == head
    (root / "notes.md").write_text("outside the packages")
    (root / "storage" / "notes.txt").write_text("not a source")
    (root / "trainer" / "report.py").write_text("# a module that only judges")
    assert git_commit(root) == head
    assert git_commit(root / "trainer") is None  # inside a checkout, not its top (an installed package)
    (root / "sharding" / "kernels" / "new.c").write_text("")  # untracked: training may build it
    assert git_commit(root) == f"{head}-dirty"
    (root / "sharding" / "kernels" / "new.c").unlink()
    (root / "trainer" / "model.py").write_text("# changed")
    assert git_commit(root) == f"{head}-dirty"


@pytest.fixture(scope="module")
def nations(tmp_path_factory):
    """(config, dataset)."""
    config = load_config(None, [*TINY, f"data.cache_dir={tmp_path_factory.mktemp('cache')}"])
    return config, load_data(config.data)


def test_a_run_is_the_same_training_only_when_everything_that_decides_its_numbers_is(nations):
    config, data = nations
    record = training_record(config, torch.device("cpu"), data, 1)
    assert record == training_record(config, torch.device("cpu"), data, 1)
    assert same_training(json.loads(json.dumps(record)), record)
    assert same_training({**record, "commit": "another"}, record)  # where it came from does not decide
    others = [("training_code", "0" * 64), ("torch", "2.0.0"), ("numpy", "1.0"), ("kernels", None),
              ("device", "cuda (H100)"), ("data", "0" * 64), ("streams", 2), ("config", "0" * 64)]  # fmt: skip
    for key, other in others:
        assert not same_training({**record, key: other}, record), key
    assert not same_training({k: v for k, v in record.items() if k != "kernels"}, record)  # absent is not None
    assert not same_training(record, training_record(config, torch.device("cpu"), data, 2))
    reseeded = load_config(None, [*TINY, f"data.cache_dir={config.data.cache_dir}", "train.seed=7"])
    assert not same_training(record, training_record(reseeded, torch.device("cpu"), data, 1))
    for unknown in ({**record, "training_code": None}, {**record, "data": None}):  # unknown is never the same
        assert not same_training(unknown, unknown)
    assert same_training({**record, "kernels": None}, {**record, "kernels": None})  # torch ops: known
    assert not same_training(None, record) and not same_training({}, record) and not same_training("x", record)
    assert not same_training({"mixed": [record, record]}, record)


def test_a_resume_by_other_code_records_each(nations):
    config, data = nations
    a = training_record(config, torch.device("cpu"), data, 1)
    b = {**a, "training_code": "1" * 64}
    assert merged(None, a, resumed=False) == a and merged(b, a, resumed=False) == a
    assert merged({**a, "commit": "old"}, a, resumed=True) == {**a, "commit": "old"}  # the same training
    assert merged(b, a, resumed=True) == {"mixed": [b, a]}
    assert merged({"mixed": [b, a]}, b, resumed=True) == {"mixed": [b, a, b]}
    assert merged(None, a, resumed=True) == {"mixed": [None, a]}  # a checkpoint from before records


def test_metrics_json_and_checkpoints_record_what_trained_the_run(tmp_path):
    config = load_config(None, [*TINY, "train.epochs=1", f"data.cache_dir={tmp_path / 'cache'}"])
    out = tmp_path / "run"
    train(config, out)
    recorded = json.loads((out / "metrics.json").read_text())["code"]
    assert recorded == training_record(config, torch.device("cpu"), load_data(config.data), 1)
    assert recorded["training_code"] == training_code() and len(recorded["data"]) == 64
    index = out / "checkpoint" / "index.json"
    saved = json.loads(index.read_text())
    assert saved["state"]["code"] == recorded
    # The run resumed (here: finished, run again) by a process whose code differs from the checkpoint's.
    other = {**recorded, "training_code": "1" * 64}
    index.write_text(json.dumps({**saved, "state": {**saved["state"], "code": other}}))
    train(config, out)
    assert json.loads((out / "metrics.json").read_text())["code"] == {"mixed": [other, recorded]}
    # Resumed with another setting that a run may change (a seed): not the run that config trains afresh.
    index.write_text(json.dumps(saved))
    reseeded = load_config(None, [*TINY, "train.epochs=2", "train.seed=7", f"data.cache_dir={tmp_path / 'cache'}"])
    train(reseeded, out)
    mixed = json.loads((out / "metrics.json").read_text())["code"]["mixed"]
    assert mixed[0] == recorded and mixed[1]["config"] != recorded["config"]
