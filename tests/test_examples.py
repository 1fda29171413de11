"""examples/: each example runs as a user runs it, in a fresh process, and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "examples" / "notebook.py"


def run_notebook(python: str | Path, tmp_path: Path, env: dict[str, str]) -> str:
    """Run the notebook script with ``python``, its temporary directory under ``tmp_path``; its stdout."""
    env = {**env, "TMPDIR": str(tmp_path)}
    result = subprocess.run([python, NOTEBOOK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


def check_notebook_output(stdout: str, tmp_path: Path) -> None:
    mrr = re.search(r"^test filtered MRR (\d\.\d+), Hits@10 (\d\.\d+)$", stdout, re.MULTILINE)
    assert mrr and float(mrr[1]) > 0.3, stdout  # 20 epochs on nations: about 0.7
    fact = re.search(r"^test fact: \((\S+), (\S+), (\S+)\)$", stdout, re.MULTILINE)
    assert fact, stdout
    assert f"({fact[1]}, {fact[2]}, ?), 50 samples" in stdout  # the table of format_predictions
    for measure in ("magnitude", "mc_mean"):
        assert re.search(rf"^{measure}: test ECE \d\.\d+ -> \d\.\d+$", stdout, re.MULTILINE), stdout
    calibrated = re.findall(r"^\S+ +p\(true\) (\d\.\d+)  from p\(mean\) \d\.\d+", stdout, re.MULTILINE)
    assert len(calibrated) == 5 and all(0 < float(p) < 1 for p in calibrated), stdout
    assert re.search(r"^triple classification: test accuracy \d\.\d+, F1 \d\.\d+$", stdout, re.MULTILINE), stdout
    # nations: 14 entities, 55 relations and their 55 reciprocals
    assert "exported 124 rows to embeddings.parquet: kind, id, name, frequency, mean, variance" in stdout
    assert re.search(r"^report figures: .*reliability", stdout, re.MULTILINE), stdout
    assert re.search(r"^precision-coverage area: magnitude \d\.\d+", stdout, re.MULTILINE), stdout
    assert not list(tmp_path.glob("nvkg-notebook-*")), "the notebook leaves its temporary directory behind"


def test_notebook_runs_from_the_checkout(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    check_notebook_output(run_notebook(sys.executable, tmp_path, env), tmp_path)
