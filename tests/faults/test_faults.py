"""The fault suite (``make test-faults``): a run killed at any injected point loses nothing, damaged files
and hostile values give a clear error naming the field, file or line, and a diverged run never looks good.

Kills are real SIGKILLs of real processes, placed by ``NVKG_FAULT`` at named points (storage/faults.py),
so each step of a swap is hit on purpose, not by luck of timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sharding.exchange import LocalExchange
from storage.atomic import recover_swap, remove_stale_temps, swap_dir, temp_dir_beside
from storage.cli import main as storage_main
from storage.convert import write_id_dataset
from storage.dataset import open_dataset
from tests.sharding.conftest import free_port
from trainer import checkpoint
from trainer.cli import main
from trainer.config import load_config
from trainer.evaluate import build_filters, evaluate
from trainer.model import build_model

pytestmark = pytest.mark.faults
ROOT = Path(__file__).parents[2]
SETTINGS = [
    "model.dim=8", "train.batch_size=256", "train.epochs=4", "train.eval_every=2", "train.checkpoint_every=1",
    "train.progress=false", "train.num_threads=1", "objective.likelihood=bernoulli",
]  # fmt: skip


def trainer(out: Path, *extra: str, fault: str | None = None, workers: int = 1, rank: str | None = None):
    args = ["train", "--dataset", "nations", "--out", str(out)]
    for item in [*SETTINGS, *extra]:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NVKG_FAULT", None)
    if fault:
        env["NVKG_FAULT"] = fault
    if rank is not None:
        env["NVKG_FAULT_RANK"] = rank
    launcher = [sys.executable]
    if workers > 1:
        launcher += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(workers),
                     "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
    command = [*launcher, "-m", "trainer", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def epochs_and_elbo(out: Path) -> list[tuple[int, float]]:
    return [(r["epoch"], r["elbo"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def final_rows(out: Path) -> torch.Tensor:
    (shard,) = (out / checkpoint.LATEST).glob("entities-*.pt")
    return torch.load(shard, weights_only=True)["weight"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = trainer(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "fault",
    [
        "train.step@9",  # mid-epoch 2
        "checkpoint.shard_written@3",  # mid-checkpoint: the shard is written, the index is not
        "swap.staged@2",  # checkpoint swaps, each step: the new one renamed beside the old
        "swap.moved_old@3",  # the old one moved aside, the new one not yet in place
        "swap.installed@4",  # the new one in place, the old one not yet deleted
    ],
)
def test_a_kill_at_any_point_loses_nothing(tmp_path, reference, fault):
    out = tmp_path / "run"
    killed = trainer(out, fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = trainer(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert epochs_and_elbo(out) == epochs_and_elbo(reference)
    assert torch.equal(final_rows(out), final_rows(reference))
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_one_of_two_workers_killed_then_the_run_resumes(tmp_path, reference):
    out = tmp_path / "run"
    killed = trainer(out, "sharding.streams=2", fault="train.step@10", workers=2, rank="1")
    assert killed.returncode != 0
    resumed = trainer(out, "sharding.streams=2", workers=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [epoch for epoch, _ in epochs_and_elbo(out)] == [1, 2, 3, 4]
    # One process reading the same two streams takes the same steps (up to float summation order).
    single = tmp_path / "single"
    assert trainer(single, "sharding.streams=2").returncode == 0
    for (_, a), (_, b) in zip(epochs_and_elbo(out), epochs_and_elbo(single), strict=True):
        assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize("point", ["swap.staged", "swap.moved_old", "swap.installed"])
def test_a_killed_directory_swap_is_finished_by_the_next_reader(tmp_path, point):
    target, new = tmp_path / "data", tmp_path / "incoming"
    target.mkdir()
    (target / "version").write_text("old")
    new.mkdir()
    (new / "version").write_text("new")
    script = f"from storage.atomic import swap_dir; swap_dir({str(new)!r}, {str(target)!r})"
    env = {**os.environ, "NVKG_FAULT": point}
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env).returncode == -9
    recover_swap(target)
    assert (target / "version").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    swap_dir(tmp_path / "data", tmp_path / "again")  # and the next swap works as usual
    assert (tmp_path / "again" / "version").read_text() == "new"


def _tsv_dataset(root: Path) -> Path:
    root.mkdir()
    names = [f"e{i}" for i in range(30)]
    lines = [f"{names[i % 30]}\tr{i % 3}\t{names[(i * 7 + 1) % 30]}" for i in range(120)]
    (root / "train.txt").write_text("\n".join(lines[:100]) + "\n")
    (root / "valid.txt").write_text("\n".join(lines[100:110]) + "\n")
    (root / "test.txt").write_text("\n".join(lines[110:]) + "\n")
    return root


def convert(source: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"NVKG_FAULT": fault} if fault else {})}
    command = [sys.executable, "-m", "storage", "convert", "--format", "tsv", str(source), str(out)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


def test_a_killed_conversion_leaves_nothing_that_loads_and_its_leftovers_are_removed(tmp_path):
    source = _tsv_dataset(tmp_path / "tsv")
    out = tmp_path / "converted"
    assert convert(source, out, fault="convert.split_written").returncode == -9
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".converted.tmp-")], "no temporary left?"
    done = convert(source, out)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "tsv"]
    assert open_dataset(out, cache_dir=tmp_path).num_entities > 0


def test_a_conversion_killed_in_its_swap_is_recovered_when_opened(tmp_path):
    source = _tsv_dataset(tmp_path / "tsv")
    out = tmp_path / "converted"
    assert convert(source, out, fault="swap.moved_old").returncode == -9
    assert not out.exists()
    assert open_dataset(out, cache_dir=tmp_path).num_entities > 0


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.checkpoint_every=0", "train.checkpoint_every=0: must be > 0"),
        ("train.num_threads=-1", "train.num_threads=-1: must be > 0"),
        ("metrics.port=70000", "metrics.port=70000: must be in [1, 65535]"),
        ("eval.num_samples=-1", "eval.num_samples=-1: must be >= 0"),
        ("objective.kl_weight=-1", "objective.kl_weight=-1.0: must be >= 0"),
        ("optim.lr=.inf", "optim.lr=inf: must be a finite number"),
        ("model.init_logvar=1000", "model.init_logvar=1000.0: must be in [-30, 10]"),
        ("model.latent=bayes", "model.latent='bayes': expected one of lim, lfm, point"),
    ],
)
def test_hostile_config_values_are_refused_before_anything_runs(tmp_path, capsys, override, message):
    code, err = _cli(capsys, "train", "--dataset", "nations", "--out", str(tmp_path / "run"), "--set", override)
    assert code == 2 and message in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "run"
    assert main(["train", "--dataset", "nations", "--out", str(out), *[a for s in SETTINGS for a in ("--set", s)],
                 "--set", "train.epochs=2"]) == 0  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "{run}", "--head", "usa", "--relation", "embassy", "--top-k", "-3"], "must be at least 1"),
        (["predict", "{run}", "--head", "usa", "--relation", "embassy", "--samples", "0"], "must be at least 1"),
        (["report", "{run}", "--fact", "100000"], "--fact 100000: the test split has facts 0 to"),
        (["export", "{run}", "--out", "{run}"], "is a directory; name the file to write"),
        (["train", "--dataset", "nations", "--out", "{run}/config.yaml"], "is a file, not a directory"),
    ],
)
def test_hostile_arguments_give_a_clear_error(small_run, capsys, argv, message):
    argv = [a.replace("{run}", str(small_run)) for a in argv]
    try:
        code, err = _cli(capsys, *argv)
    except SystemExit as exit_:  # argparse's own refusal: usage and the reason, exit 2
        code, err = int(exit_.code or 0), capsys.readouterr().err
    assert code == 2 and message in err, err


def _copy_run(small_run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(small_run, tmp_path / "run")
    return tmp_path / "run"


def test_a_torn_last_log_line_is_dropped_on_resume(small_run, tmp_path, capsys):
    run = _copy_run(small_run, tmp_path)
    with (run / "log.jsonl").open("a") as log:
        log.write('{"epoch": 3, "elb')
    args = ["train", "--dataset", "nations", "--out", str(run), *[a for s in SETTINGS for a in ("--set", s)]]
    with pytest.warns(UserWarning, match=r"log\.jsonl:3: dropping a torn last line"):
        assert main(args) == 0
    assert [r["epoch"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("extra_state_key", "unexpected key 'state.surprise'"),
        ("stray_shard", "not an entity shard name"),
        ("truncated_shard", "not a readable nvkg checkpoint"),
    ],
)
def test_damaged_checkpoints_are_refused_by_name(small_run, tmp_path, capsys, damage, message):
    run = _copy_run(small_run, tmp_path)
    latest = run / checkpoint.LATEST
    if damage == "extra_state_key":
        index = json.loads((latest / checkpoint.INDEX).read_text())
        index["state"]["surprise"] = 1
        (latest / checkpoint.INDEX).write_text(json.dumps(index))
    elif damage == "stray_shard":
        (latest / "entities-notes.pt").write_text("scratch")
    else:
        (shard,) = latest.glob("entities-*.pt")
        shard.write_bytes(shard.read_bytes()[:64])
    (run / checkpoint.BEST).rename(run / "best-moved")  # so that the damaged latest is the one loaded
    code, err = _cli(capsys, "evaluate", str(run))
    assert code == 2 and message in err and str(latest) in err, err


def test_a_stray_file_in_a_checkpoint_is_ignored(small_run, tmp_path, capsys):
    run = _copy_run(small_run, tmp_path)
    (run / checkpoint.LATEST / "README.txt").write_text("notes")
    code, _ = _cli(capsys, "evaluate", str(run))
    assert code == 0


@pytest.fixture()
def converted(tmp_path) -> Path:
    out = tmp_path / "converted"
    assert convert(_tsv_dataset(tmp_path / "tsv"), out).returncode == 0
    return out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["splits"]["train"].update(triples=5), "train: 5 triples listed"),
        (lambda m: m["splits"]["valid"].update(partitions=2), "valid: 2 partitions listed"),
        (lambda m: m.update(num_entities=3, num_train_entities=3), "num_entities=3"),
        (lambda m: m.update(num_train_relations=99), "train entity/relation counts exceed the totals"),
    ],
)
def test_a_manifest_that_does_not_match_its_files_is_refused(converted, edit, message):
    path = converted / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match the files it describes") as err:
        open_dataset(converted, cache_dir=converted.parent)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_corrupt_part_file_names_itself_without_checksums(converted):
    (part,) = (converted / "train").glob("*.parquet")
    data = bytearray(part.read_bytes())
    data[4 : len(data) // 2] = b"\xff" * (len(data) // 2 - 4)  # same size, wrong bytes in the data pages
    part.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=str(part)):
        dataset = open_dataset(converted, cache_dir=converted.parent, verify=False)
        dataset.train  # noqa: B018  the read that used to fail with an IndexError


def test_a_diverged_run_stops_with_its_epoch_and_step_and_never_becomes_best(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "nations", "--out", str(out), "--set", "optim.lr=100.0", "--set", "train.epochs=2",
            "--set", "model.dim=16", "--set", "train.progress=false"]  # fmt: skip
    code, err = _cli(capsys, *args)
    assert code == 2 and "training diverged at epoch 1, step 1: non-finite loss" in err
    assert not (out / checkpoint.BEST).exists() and not (out / "metrics.json").exists()


def test_rollback_restarts_from_the_last_checkpoint_with_half_the_learning_rate(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "nations", "--out", str(out), "--set", "optim.lr=100.0", "--set", "train.epochs=3",
            "--set", "model.dim=16", "--set", "train.progress=false", "--set", "train.on_divergence=rollback",
            "--set", "train.max_rollbacks=12", "--set", "train.checkpoint_every=1"]  # fmt: skip
    code = main(args)
    assert code == 0 and "non-finite loss: rolled back to" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 < metrics["test"]["filtered"]["mrr"] < 1.0
    index = checkpoint.read_index(out / checkpoint.LATEST)
    assert index["state"]["lr"] <= 50.0


def test_a_nan_score_ranks_last(tiny_nan_model):
    model, facts, filters = tiny_nan_model
    result = evaluate(model, facts, filters)
    assert result["filtered"]["mrr"] < 0.5 and result["raw"]["mr"] > 1.0


@pytest.fixture()
def tiny_nan_model(tmp_path):
    facts = np.array([[0, 0, 1], [1, 0, 2], [2, 0, 3], [3, 0, 0]])
    write_id_dataset(tmp_path / "d", entity_names=[f"e{i}" for i in range(4)], relation_names=["r"],
                     splits={"train": facts, "valid": facts[:2], "test": facts[2:]})  # fmt: skip
    dataset = open_dataset(tmp_path / "d", cache_dir=tmp_path)
    model = build_model(load_config(None, ["model.dim=4"]), 4, 1)
    model.entities.weight.fill_(float("nan"))
    return model, dataset.test, build_filters(dataset.all_known(), 1)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"\xff\xfe\tr\ta", "train.txt:4: not valid UTF-8 (byte 1)"),
        (b"x\ry\tr\ta", "train.txt:4: a carriage return inside the line"),
        (b"x\tr", "train.txt:4: expected 3 non-empty tab-separated fields"),
    ],
)
def test_bad_lines_are_named_or_skipped(tmp_path, capsys, line, message):
    source = _tsv_dataset(tmp_path / "tsv")
    lines = (source / "train.txt").read_bytes().split(b"\n")
    (source / "train.txt").write_bytes(b"\n".join([*lines[:3], line, *lines[3:]]))
    assert storage_main(["convert", "--format", "tsv", str(source), str(tmp_path / "a")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert storage_main(["convert", "--format", "tsv", "--skip-bad-lines", str(source), str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["splits"]["train"]["bad_lines"] == 1


def test_a_live_writers_temporary_directory_is_kept(tmp_path):
    target = tmp_path / "out"
    script = (
        "from pathlib import Path; from storage.atomic import remove_stale_temps; "
        f"print(len(remove_stale_temps(Path({str(target)!r}))))"
    )
    with temp_dir_beside(target) as live:
        other = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
        assert other.stdout.strip() == "0" and live.exists(), other.stderr
    assert remove_stale_temps(target) == [live] and not live.exists()


def test_rollback_keeps_the_best_validation_and_the_training_time(tmp_path):
    from trainer.loop import Training
    from trainer.step import Divergence

    config = load_config(None, [*SETTINGS, "data.dataset=nations", "train.eval_every=1", "train.checkpoint_every=100",
                                "train.on_divergence=rollback"])  # fmt: skip
    run = Training.set_up(config, tmp_path / "run", None, LocalExchange(), None)
    for epoch in range(2):
        run.end_epoch(run.train_epoch(epoch))
    best, seconds, lr, code = run.state.best_mrr, run.state.train_seconds, run.lr, run.state.code
    assert best > 0 and not (tmp_path / "run" / checkpoint.LATEST).exists()
    run.roll_back(Divergence(3, 0, "loss"))  # no checkpoint: back to the initial values
    assert run.state.epoch == 0 and run.lr == lr / 2
    assert run.state.best_mrr == best and run.state.train_seconds == seconds
    assert run.state.code == code and code["training_code"]  # what trained the run, not what a checkpoint says
    run.logger.close()
