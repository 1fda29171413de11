"""Import and read throughput of the storage layer on synthetic Freebase-like graphs.

For each size (default 1M and 20M training triples, one shared vocabulary): import the TSV and the
N-Triples files with ``python -m storage convert`` in a child process (throughput over all input lines,
timed inside the converter; peak RSS of the child from wait4), then stream the training split with
1 and with 2 concurrent worker processes (triples/s per worker over epochs 1-2 after a warm-up epoch,
batches of 100k, shuffled as in training).

    make bench-storage                      # or: python -m bench.storage --sizes 1000000 20000000
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import markdown_table, write_results

ROOT = Path(__file__).parents[1]


# Peak RSS is read from /proc/self/status (VmHWM) inside the child: the rusage of a forked child also
# counts the parent's pages from before exec, which would measure this script, not the converter.
_CONVERT = """
import re, sys
from storage.cli import main
code = main(sys.argv[1:])
print("peak_rss_kib", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
sys.exit(code)
"""


def _field(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"the conversion printed no {pattern!r}:\n{text}")
    return match.group(1)


def convert(fmt: str, graph: Path, out: Path) -> dict:
    args = ["convert", "--format", fmt, str(out), "--overwrite"]
    if fmt == "tsv":
        args[3:3] = [str(graph)]
    else:
        args[3:3] = [str(graph / "train.nt"), "--valid", str(graph / "valid.nt"), "--test", str(graph / "test.nt")]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _CONVERT, *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr}")
    seconds = float(_field(r"converted in ([\d.]+)s", result.stdout))
    peak_kib = int(_field(r"peak_rss_kib (\d+)", result.stdout))
    manifest = json.loads((out / "manifest.json").read_text())
    lines = sum(s["lines"] for s in manifest["splits"].values())
    return {
        "lines": lines,
        "seconds": seconds,
        "wall_seconds": wall,
        "lines_per_s": lines / seconds,
        "peak_rss_mib": peak_kib / 1024,
        "entities": manifest["num_entities"],
    }


def generate(graph: Path, size: int, entities: int, relations: int) -> None:
    """In a child process, so this script stays small."""
    code = (
        "import sys; from pathlib import Path; from bench.synthetic import write_graph; "
        "n, e, r = (int(a) for a in sys.argv[2:5]); "
        "write_graph(Path(sys.argv[1]), n, num_entities=e, num_relations=r)"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(graph), str(size), str(entities), str(relations)], cwd=ROOT, check=True
    )


def read_worker(root: str, rank: int, world_size: int, batch_size: int) -> None:
    from storage.reader import TripleStore

    store = TripleStore(Path(root), verify=False)
    rows, seconds = 0, 0.0
    # Epoch 0 warms up (thread pools, page cache, allocator); epochs 1 and 2 are timed, as in training.
    for epoch in range(3):
        started = time.perf_counter()
        for batch in store.batches(
            "train", batch_size=batch_size, epoch=epoch, seed=0, rank=rank, world_size=world_size
        ):
            rows += len(batch) if epoch else 0
        seconds += time.perf_counter() - started if epoch else 0.0
    print(json.dumps({"rows": rows // 2, "seconds": seconds / 2}))  # per epoch


def read(root: Path, world_size: int, batch_size: int = 100_000) -> dict:
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.storage",
                "--read-worker",
                str(root),
                str(rank),
                str(world_size),
                str(batch_size),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    results = [json.loads(child.communicate()[0]) for child in children]
    per_worker = [r["rows"] / r["seconds"] for r in results]
    return {"world_size": world_size, "rows": sum(r["rows"] for r in results), "per_worker_rows_per_s": min(per_worker)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 20_000_000])
    parser.add_argument("--entities", type=int, default=500_000)
    parser.add_argument("--relations", type=int, default=1_000)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, deleted after)")
    parser.add_argument("--read-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read_worker:
        root, rank, world, batch = args.read_worker
        read_worker(root, int(rank), int(world), int(batch))
        return
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        rows, reads = [], []
        for size in args.sizes:
            graph = Path(scratch) / f"graph-{size}"
            generate(graph, size, args.entities, args.relations)
            for fmt in ("tsv", "ntriples"):
                result = convert(fmt, graph, Path(scratch) / f"ds-{fmt}-{size}")
                rows.append({"train triples": size, "format": fmt, **result})
                print(rows[-1], flush=True)
            for world_size in (1, 2):
                reads.append({"train triples": size, **read(Path(scratch) / f"ds-tsv-{size}", world_size)})
                print(reads[-1], flush=True)
    by_format = {fmt: [r for r in rows if r["format"] == fmt] for fmt in ("tsv", "ntriples")}
    growth = {fmt: rs[-1]["peak_rss_mib"] / rs[0]["peak_rss_mib"] for fmt, rs in by_format.items() if len(rs) > 1}
    markdown = "## Import (python -m storage convert)\n\n" + markdown_table(
        rows, ["train triples", "format", "lines", "entities", "seconds", "wall_seconds", "lines_per_s", "peak_rss_mib"]
    )
    markdown += "\nPeak RSS, largest over smallest size: " + ", ".join(f"{k} {v:.2f}x" for k, v in growth.items())
    markdown += "\n\n## Read (train split, batches of 100k, shuffled)\n\n" + markdown_table(
        reads, ["train triples", "world_size", "rows", "per_worker_rows_per_s"]
    )
    write_results("storage", {"import": rows, "read": reads, "rss_growth": growth, "entities": args.entities}, markdown)


if __name__ == "__main__":
    main()
