"""`pip install .`: the wheel holds exactly trainer/, sharding/, storage/ with their run-time files and the
configs, its dependencies are requirements.txt's, and the installed `nvkg` trains outside the checkout.

The install test downloads nothing: a fresh virtual environment sees this interpreter's site-packages
(torch, ray, setuptools...) through a .pth file, and pip installs only nvkg into it, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.test_examples import check_notebook_output, run_notebook

ROOT = Path(__file__).parents[1]
SOURCES = ("pyproject.toml", "README.md", "trainer", "sharding", "storage", "configs")  # the Dockerfile's COPYs
DEV_TOOLS = {"pytest", "ruff", "mypy", "types-PyYAML"}


def requirement_name(line: str) -> str:
    return line.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip()


def test_dependencies_are_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pinned = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    runtime, dev = set(project["dependencies"]), set(project["optional-dependencies"]["dev"])
    assert runtime | dev == pinned
    assert {requirement_name(r) for r in dev} == DEV_TOOLS
    assert "torch==2.13.0" in runtime


def run(command: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A virtual environment with nvkg installed from a copy of the sources; (its bin, the environment)."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp, env=os.environ.copy()).strip())  # fmt: skip
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "parent-environment.pth").write_text("".join(f"{path}\n" for path in parents))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HOME"] = str(tmp / "home")  # the dataset and kernel caches, fresh
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    run([*pip, "--ignore-installed", "--quiet", source], cwd=tmp, env=env)
    return venv / "bin", env


def test_wheel_holds_the_three_packages_and_their_files(installed):
    bin_dir, env = installed
    script = "import importlib.metadata, json; print(json.dumps([str(f) for f in importlib.metadata.files('nvkg')]))"
    listing = run([bin_dir / "python", "-c", script], cwd=bin_dir, env=env)
    files = {Path(f) for f in json.loads(listing)}
    top = {f.parts[0] for f in files if f.parts[0] != ".." and not f.parts[0].endswith(".dist-info")}
    assert top == {"trainer", "sharding", "storage"}
    assert {f.name for f in files if f.parent == Path("sharding/kernels") and f.suffix in (".c", ".h")} == {
        p.name for p in (ROOT / "sharding" / "kernels").glob("*.[ch]")
    }
    assert {f for f in files if f.parts[:2] == ("storage", "bundled")} == {
        p.relative_to(ROOT) for p in (ROOT / "storage" / "bundled").rglob("*.txt")
    }
    assert {f.name for f in files if f.parent == Path("trainer/configs")} == {
        p.name for p in (ROOT / "configs").glob("*.yaml")
    }


def test_installed_nvkg_trains_outside_the_checkout(installed, tmp_path):
    bin_dir, env = installed
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert run([bin_dir / "nvkg", "--version"], cwd=tmp_path, env=env).strip() == f"nvkg {version}"
    imported = run([bin_dir / "python", "-c", "import trainer; print(trainer.__file__)"], cwd=tmp_path, env=env)
    assert Path(imported).is_relative_to(bin_dir.parent), imported  # not the checkout
    configs = Path(run([bin_dir / "nvkg", "configs"], cwd=tmp_path, env=env).strip())
    assert configs.is_relative_to(bin_dir.parent) and (configs / "default.yaml").is_file()

    out = tmp_path / "run"
    overrides = ["train.epochs=2", "model.dim=16", "train.eval_every=1", "train.progress=false"]
    sets = [arg for item in overrides for arg in ("--set", item)]
    trained = run([bin_dir / "nvkg", "train", "--config", configs / "default.yaml", "--dataset", "nations", *sets,
                   "--out", out], cwd=tmp_path, env=env)  # fmt: skip
    assert "test metrics:" in trained
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "metrics.json").read_text())["dropped_facts"] == 0
    if shutil.which(env.get("CC", "cc")):  # the kernels were built from the installed sources
        assert list((Path(env["HOME"]) / ".cache" / "nvkg" / "native").glob("kernels-*.so"))
    info = run([bin_dir / "nvkg", "storage", "info", next((Path(env["HOME"]) / ".cache/nvkg/datasets").iterdir())],
               cwd=tmp_path, env=env)  # fmt: skip
    assert "nations" in info


def test_installed_package_runs_the_notebook_example(installed, tmp_path):
    bin_dir, env = installed
    check_notebook_output(run_notebook(bin_dir / "python", tmp_path, env), tmp_path)
