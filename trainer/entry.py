"""The ``nvkg`` command of an installed package: one name for the trainer's and the storage's CLIs.

nvkg train --config "$(nvkg configs)/default.yaml" --dataset nations   # = python -m trainer train ...
nvkg storage convert --format tsv DIR data/mygraph                       # = python -m storage convert ...
nvkg configs                                                             # the directory of the shipped configs
nvkg --version
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: nvkg COMMAND ...          the trainer's commands (train, evaluate, predict, ...: nvkg --help)
       nvkg storage COMMAND ...  dataset commands (convert, download, info: nvkg storage --help)
       nvkg configs              print the directory of the shipped run configs
       nvkg --version
"""


def configs_dir() -> Path:
    """Where the run configs are: a wheel ships the repository's ``configs/`` as ``trainer/configs/``
    (pyproject.toml), a checkout has them at its root."""
    shipped = Path(__file__).parent / "configs"
    return shipped if shipped.is_dir() else Path(__file__).parents[1] / "configs"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    head, rest = (args[0], args[1:]) if args else (None, [])
    if head == "storage":
        from storage.cli import main as storage_main

        return storage_main(rest, prog="nvkg storage")
    if head == "configs" and not rest:
        print(configs_dir())
        return 0
    if head == "--version":
        from storage.cli import version_text

        print(version_text())
        return 0
    if head in (None, "-h", "--help"):
        print(USAGE)
        if head is None:
            return 2
    from trainer.cli import main as trainer_main

    return trainer_main(args, prog="nvkg")
