"""The TensorBoard backend of the run logger: its event files, read back byte by byte, hold log.jsonl's
numbers, and a resumed run's file hides the older file's points past the checkpoint."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from sharding.exchange import LocalExchange
from tests.trainer.conftest import make_config
from trainer.logger import SCALARS, TENSORBOARD_DIR
from trainer.loop import Training, train


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: Path):
    """The TFRecord framing TensorBoard reads: length, its masked CRC-32C, the bytes, their masked CRC-32C."""
    data, offset = path.read_bytes(), 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        body = data[offset + 12 : offset + 12 + length]
        (body_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
        assert header_crc == _masked_crc32c(header) and body_crc == _masked_crc32c(body), path
        yield event_pb2.Event.FromString(body)
        offset += 16 + length


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, the files read in TensorBoard's order (by name); a session start at step s
    drops the points at s and later, as TensorBoard's purge of orphaned data does."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in _records(path):
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for points in scalars.values():
                    for step in [s for s in points if s >= event.step]:
                        del points[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def _assert_matches_log(out_dir: Path) -> dict[str, dict[int, float]]:
    """The scalars TensorBoard would show hold log.jsonl's per-epoch numbers (as float32, TensorBoard's
    scalar type), and nothing past its last epoch."""
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    scalars = read_scalars(out_dir / TENSORBOARD_DIR)
    assert set(scalars) == set(SCALARS)
    for tag, key in SCALARS.items():
        logged = {r["epoch"]: float(np.float32(r[key])) for r in records if key in r}
        assert logged and {step: scalars[tag][step] for step in logged} == logged, tag
        assert max(scalars[tag]) == records[-1]["epoch"], tag
    return scalars


SETTINGS = ["metrics.tensorboard=true", "train.eval_every=2", "optim.lr_decay=0.5", "optim.lr_patience=1"]


def test_event_files_hold_the_logged_scalars(tmp_path, tiny_dataset):
    train(make_config("train.epochs=4", *SETTINGS), tmp_path, tiny_dataset)
    scalars = _assert_matches_log(tmp_path)
    assert set(scalars["valid/mrr"]) == {2, 4} and set(scalars["train/elbo"]) == set(scalars["train/lr"]) == {
        1,
        2,
        3,
        4,
    }


def test_a_resumed_run_hides_the_points_past_its_checkpoint(tmp_path, tiny_dataset):
    # A run killed after epoch 5 (its logs written) whose latest checkpoint is epoch 3's ...
    killed = make_config("train.epochs=6", "train.checkpoint_every=3", *SETTINGS)
    run = Training.set_up(killed, tmp_path, tiny_dataset, LocalExchange(), None)
    for _ in range(5):
        run.end_epoch(run.train_epoch(run.state.epoch))
    run.logger.close()
    before = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert set(before["train/elbo"]) == {1, 2, 3, 4, 5}
    # ... resumed with another batch size (so epoch 4's numbers change) and 4 epochs in all.
    resumed = make_config("train.epochs=4", "train.checkpoint_every=3", "train.batch_size=2", *SETTINGS)
    train(resumed, tmp_path, tiny_dataset)
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    scalars = _assert_matches_log(tmp_path)
    assert set(scalars["train/elbo"]) == {1, 2, 3, 4} and scalars["train/elbo"][4] != before["train/elbo"][4]


@pytest.mark.filterwarnings("ignore:epoch .*collapsed:UserWarning")  # lr 1000 collapses them; not the point here
def test_a_rolled_back_run_starts_a_new_file_and_matches_its_log(tmp_path, tiny_dataset, capsys):
    rollback = [
        "objective.likelihood=bernoulli",
        "optim.lr=1000",
        "train.on_divergence=rollback",
        "train.max_rollbacks=20",
    ]
    train(make_config("train.epochs=3", *rollback, *SETTINGS), tmp_path, tiny_dataset)
    assert "rolled back to the initial values" in capsys.readouterr().out
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) > 1
    _assert_matches_log(tmp_path)


def test_tensorboard_is_off_by_default(tmp_path, tiny_dataset):
    train(make_config("train.epochs=1"), tmp_path, tiny_dataset)
    assert not (tmp_path / TENSORBOARD_DIR).exists()
