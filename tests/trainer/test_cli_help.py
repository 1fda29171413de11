"""The command lines' help, version and prog, and `config`: every argument documented with its default,
every config key with its docstring (trainer/cli.py, storage/cli.py, trainer/entry.py)."""

import argparse
import dataclasses
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

import storage.cli
from storage.cli import _parser as storage_parser
from storage.cli import version_text
from trainer.cli import _parser as trainer_parser
from trainer.cli import main as trainer_main
from trainer.config import RunConfig, describe, field_docs
from trainer.entry import main as nvkg

ROOT = Path(__file__).parents[2]
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("parser", [trainer_parser(), storage_parser()], ids=["trainer", "storage"])
def test_every_argument_of_every_command_has_help(parser):
    undocumented = [
        f"{command} {action.dest}"
        for command, sub in {"": parser, **_commands(parser)}.items()
        for action in sub._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert not undocumented, undocumented
    assert {"train", "evaluate", "predict", "submit", "tune", "config"} <= set(_commands(trainer_parser()))


def test_help_shows_defaults_and_the_prog_it_was_invoked_as(capsys):
    with pytest.raises(SystemExit) as exit_info:
        nvkg(["predict", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nvkg predict ")
    assert "completions to list (default: 10)" in out and "run_dir" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    with pytest.raises(SystemExit):
        nvkg(["storage", "download", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: nvkg storage download ")
    assert "(default: data/downloads)" in out and "(default: 2)" in out
    for package, command in (("trainer", "tune"), ("storage", "convert")):
        result = subprocess.run([sys.executable, "-m", package, command, "--help"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0 and result.stdout.startswith(f"usage: python -m {package} {command} ")


def test_version_on_both_command_lines(capsys):
    for main in (trainer_main, storage.cli.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.strip() == version_text()
    assert nvkg(["--version"]) == 0
    assert capsys.readouterr().out.strip() == version_text()
    assert version_text().startswith(f"nvkg {PYPROJECT_VERSION}")


def test_version_without_package_metadata_falls_back_to_pyproject(monkeypatch, tmp_path):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(storage.cli, "version", missing)
    assert version_text() == f"nvkg {PYPROJECT_VERSION} (uninstalled checkout)"
    monkeypatch.setattr(storage.cli, "ROOT", tmp_path)  # neither installed nor a checkout
    assert version_text() == "nvkg (version unknown: not installed, no pyproject.toml)"


def test_every_config_key_has_a_docstring():
    keys = describe(RunConfig())
    sections = dataclasses.fields(RunConfig)
    assert len(keys) == sum(len(dataclasses.fields(f.default_factory())) for f in sections)
    assert [k.key for k in keys if not k.doc] == []
    docs = field_docs(type(RunConfig().model))
    assert docs["dim"] == "Real numbers per embedding mean (ComplEx uses dim/2 complex dimensions)."
    # The class docstring of LaunchConfig is no field's.
    assert not any("What a Ray Train run" in doc for doc in field_docs(type(RunConfig().launch)).values())


def test_config_show_prints_every_key_with_its_value_default_and_doc(capsys):
    assert trainer_main(["config", "--show", "--config", "configs/default.yaml", "--set", "model.dim=16"]) == 0
    out = capsys.readouterr().out
    for key in describe(RunConfig()):
        assert f"\n{key.key} = " in "\n" + out, key.key
    assert "model.dim = 16  (default: 128)\n    Real numbers per embedding mean" in out
    assert "train.time_budget_s = null  (default: null)" in out
    assert trainer_main(["config", "--set", "optim.lr=0.003"]) == 0
    assert "optim.lr = 0.003  (default: 0.01)" in capsys.readouterr().out
    assert trainer_main(["config", "--set", "optim.lrr=1"]) == 2
    assert "unknown config key(s) optim.lrr" in capsys.readouterr().err
