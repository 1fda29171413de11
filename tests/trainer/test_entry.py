"""The `nvkg` command's dispatch (trainer/entry.py), in this process; tests/test_package.py runs the
installed command."""

from pathlib import Path

import pytest

from storage.dataset import BUNDLED_DIR
from trainer.entry import configs_dir, main

ROOT = Path(__file__).parents[2]


def test_storage_commands_go_to_the_storage_cli(tmp_path):
    out = tmp_path / "nations"
    assert main(["storage", "convert", "--format", "tsv", str(BUNDLED_DIR / "nations"), str(out)]) == 0
    assert (out / "manifest.json").is_file()
    assert main(["storage", "info", str(out)]) == 0


def test_other_commands_go_to_the_trainer_cli(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "missing/config.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2


def test_configs_prints_the_checkout_configs_directory(capsys):
    assert main(["configs"]) == 0
    assert Path(capsys.readouterr().out.strip()) == configs_dir() == ROOT / "configs"
    assert (configs_dir() / "default.yaml").is_file()


def test_no_arguments_prints_usage(capsys):
    assert main([]) == 2
    assert "nvkg storage" in capsys.readouterr().out


def test_version_is_printed_installed_or_not(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("nvkg ")
