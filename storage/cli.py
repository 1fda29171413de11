"""``python -m storage convert|download|info``: make and inspect dataset directories.

Also the argparse pieces both command lines share (storage sits below the trainer): ``HelpFormatter``
and ``version_text``.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from storage.convert import ConvertOptions, convert
from storage.download import REGISTRY, download
from storage.layout import Manifest
from storage.reader import TripleStore
from storage.sources import DglKeSource, NTriplesSource, TsvSource

ROOT = Path(__file__).parents[1]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every argument's help ends with its default, unless there is none worth showing (None, an empty
    list, a flag's)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == [] or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def version_text() -> str:
    """``nvkg X.Y.Z`` from the installed package's metadata; in a checkout that was never installed, the
    version its pyproject.toml declares, marked as such."""
    try:
        return f"nvkg {version('nvkg')}"
    except PackageNotFoundError:
        pass
    try:
        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return "nvkg (version unknown: not installed, no pyproject.toml)"
    return f"nvkg {declared} (uninstalled checkout)"


def add_command(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A sub-command whose help shows defaults; its usage line follows the parent's prog."""
    return commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


def _add_convert_options(parser: argparse.ArgumentParser) -> None:
    defaults = ConvertOptions()
    parser.add_argument(
        "--partition-rows",
        type=int,
        default=defaults.partition_rows,
        help="target triples per partition file (the unit of de-duplication and of memory)",
    )
    parser.add_argument(
        "--row-group-rows",
        type=int,
        default=defaults.row_group_rows,
        help="rows per Parquet row group (the unit a streaming reader fetches)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the partition hash and the shuffle")
    parser.add_argument("--name", help="dataset name in the manifest (default: the output directory's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (they are shown only on a terminal anyway)",
    )


def _parser(prog: str = "python -m storage") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="nvkg dataset storage", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="COMMAND --help: its options"
    )

    conv = add_command(commands, "convert", "convert raw triples into a Parquet dataset directory")
    conv.add_argument("--format", required=True, choices=("tsv", "ntriples", "dglke"), help="layout of the input")
    conv.add_argument("input", type=Path, help="tsv/dglke: a directory; ntriples: the train file (.nt or .nt.gz)")
    conv.add_argument("out", type=Path, help="dataset directory to create")
    conv.add_argument("--valid", type=Path, help="ntriples: validation file")
    conv.add_argument("--test", type=Path, help="ntriples: test file")
    conv.add_argument(
        "--relations", type=Path, help="ntriples: keep only predicates listed in this file (one IRI a line)"
    )
    conv.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of failing")
    _add_convert_options(conv)

    down = add_command(commands, "download", "download, extract and convert a public dataset")
    down.add_argument("name", choices=sorted(REGISTRY), help="registry name of the dataset")
    down.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    down.add_argument("--downloads", type=Path, default=Path("data/downloads"), help="where archives are kept")
    down.add_argument("--url", help="mirror of the archive (default: the registry's URL)")
    down.add_argument("--sha256", help="expected sha256 of the archive")
    down.add_argument("--archive", type=Path, help="an archive already on disk: skip the download")
    down.add_argument(
        "--retries",
        type=int,
        default=2,
        help="further attempts after a failed transfer, each resuming where the last stopped",
    )
    down.add_argument(
        "--skip-count-check",
        action="store_true",
        help="convert an archive whose counts differ from the registry's (a sample or a test mirror)",
    )
    _add_convert_options(down)

    info = add_command(commands, "info", "verify a dataset directory and print its manifest counts")
    info.add_argument("root", type=Path, help="dataset directory (holding manifest.json)")
    info.add_argument("--no-checksums", action="store_true", help="check sizes only, not sha256")
    info.add_argument(
        "--expect", metavar="NAME", help="fail unless the counts are those the registry publishes for NAME"
    )
    return parser


def _options(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(partition_rows=args.partition_rows, row_group_rows=args.row_group_rows, seed=args.seed)


def _read_relations(path: Path | None) -> set[str] | None:
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"--relations {path}: {'a directory' if path.is_dir() else 'no such file'}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM would stick to the first IRI, which then never matches
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"--relations {path}, line {line}: not UTF-8 ({err.reason})") from None
    return {line.strip().strip("<>") for line in text.splitlines() if line.strip()}


def _summary(manifest: Manifest, seconds: float | None = None) -> str:
    lines = [
        f"{manifest.name}: {manifest.num_entities:,} entities ({manifest.num_train_entities:,} in train), "
        f"{manifest.num_relations:,} relations ({manifest.num_train_relations:,} in train)"
    ]
    for split, counts in manifest.splits.items():
        fields = ", ".join(f"{k} {v:,}" for k, v in asdict(counts).items() if v)
        lines.append(f"  {split}: {fields or 'absent'}")
    if seconds is not None:
        total = sum(c.lines for c in manifest.splits.values())
        lines.append(f"converted in {seconds:.2f}s ({total / max(seconds, 1e-9):,.0f} lines/s)")
    return "\n".join(lines)


def cmd_convert(args: argparse.Namespace) -> None:
    source: TsvSource | DglKeSource | NTriplesSource
    if args.format == "tsv":
        source = TsvSource(args.input, skip_bad_lines=args.skip_bad_lines)
    elif args.format == "dglke":
        if args.skip_bad_lines:
            raise ValueError("--skip-bad-lines: not for --format dglke, whose lines are ids of its own maps")
        source = DglKeSource(args.input)
    else:
        source = NTriplesSource(
            {"train": args.input, "valid": args.valid, "test": args.test},
            relations=_read_relations(args.relations),
            skip_bad_lines=args.skip_bad_lines,
        )
    started = time.perf_counter()
    manifest = convert(
        source, args.out, name=args.name, options=_options(args), overwrite=args.overwrite, progress=args.progress
    )
    print(f"wrote {args.out}")
    print(_summary(manifest, time.perf_counter() - started))


def cmd_download(args: argparse.Namespace) -> None:
    manifest = download(
        args.name,
        args.out,
        downloads=args.downloads,
        url=args.url,
        sha256=args.sha256,
        archive=args.archive,
        options=_options(args),
        overwrite=args.overwrite,
        check_counts=not args.skip_count_check,
        retries=args.retries,
        progress=args.progress,
    )
    print(f"wrote {args.out}")
    print(_summary(manifest))


def cmd_info(args: argparse.Namespace) -> None:
    store = TripleStore(args.root, verify=not args.no_checksums)
    if args.expect is not None:
        remote = REGISTRY.get(args.expect)
        expect = remote.counts if remote is not None else None
        if expect is None:
            raise ValueError(f"--expect {args.expect}: the registry publishes no counts for it")
        expect.check_manifest(args.expect, args.root, store.manifest)
    print(_summary(store.manifest))
    checked = "sizes" if args.no_checksums else "sizes and sha256"
    print(f"  files verified: {len(store.manifest.files)} ({checked}; manifest counts against the files)")


def main(argv: list[str] | None = None, prog: str = "python -m storage") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        {"convert": cmd_convert, "download": cmd_download, "info": cmd_info}[args.command](args)
    except (ValueError, OSError) as err:  # OSError names its file: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
