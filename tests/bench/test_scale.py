"""The scale bench end to end on a tiny planted graph: it trains, reads the run's log and metrics, and
writes its results (it once deleted the run before reading it)."""

import json
import sys

import bench.common
from bench import scale


def test_scale_bench_trains_and_writes_its_results(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    argv = ["bench.scale", "--entities", "400", "--triples", "6000", "--relations", "5", "--eval-facts", "40",
            "--clusters", "8", "--rank", "4", "--workers", "1", "--batch", "512", "--negatives", "16",
            "--data", str(tmp_path / "data")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    scale.main()
    payload = json.loads((tmp_path / "results" / "scale-400.json").read_text())
    row = payload["result"]
    assert row["entities"] <= 400 and row["train triples"] > 0 and row["positives/s"] > 0
    assert 0 < row["test MRR"] <= 1 and len(payload["epochs"]) == 1
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith("run-")] == []  # checkpoints gone
