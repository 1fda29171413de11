"""Downloading public benchmark graphs: resumable HTTP, size and sha256 checks, safe extraction, conversion.

``fetch`` downloads into ``NAME.part`` and renames to ``NAME`` once the whole body has arrived and its
size (Content-Length) and sha256 (when known) match; a later call continues a ``.part`` file with an
HTTP Range request, or starts over when the server ignores ranges. A completed download is recorded in
``NAME.download.json`` (url, size, sha256), written after the rename: a later call reuses ``NAME`` only
when that record exists and the file still matches it, so a file that merely sits in the downloads
directory (copied there, left by a test, truncated) is downloaded again rather than trusted.
"""

from __future__ import annotations

import http.client
import json
import os
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from storage.atomic import atomic_write_json
from storage.convert import ConvertOptions, ExpectedCounts, convert
from storage.layout import Manifest, sha256_file
from storage.sources import DglKeSource, TsvSource

CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    url: str
    layout: str
    """tsv (train/valid/test.txt of names) or dglke (entity2id/relation2id and id triples)."""
    sha256: str | None = None
    """Pinned checksum of the archive, where one has been recorded; otherwise the computed one is printed."""
    counts: ExpectedCounts | None = None
    """The published counts, where known: a conversion that finds others is refused."""


REGISTRY: dict[str, Remote] = {
    "wn18rr": Remote("https://github.com/TimDettmers/ConvE/raw/master/WN18RR.tar.gz", "tsv"),
    "fb15k-237": Remote("https://github.com/TimDettmers/ConvE/raw/master/FB15k-237.tar.gz", "tsv"),
    "yago3-10": Remote("https://github.com/TimDettmers/ConvE/raw/master/YAGO3-10.tar.gz", "tsv"),
    # The counts DGL-KE documents for this archive. No checksum of it has been published, so none is
    # pinned: the computed one is printed and recorded in the manifest.
    "freebase86m": Remote(
        "https://data.dgl.ai/dataset/Freebase.zip",
        "dglke",
        counts=ExpectedCounts(num_entities=86_054_151, num_relations=14_824, num_train_triples=304_727_650),
    ),
}
RECORD_SUFFIX = ".download.json"


class DownloadError(ValueError):
    pass


def fetch(url: str, dest: Path, *, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); return ``dest``."""
    dest = Path(dest)
    if _reusable(dest, url, sha256):
        return dest
    record_path(dest).unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urlopen(request, timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and offset:  # the part file already holds the whole body
            return _finish(part, dest, sha256, url)
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"cannot reach {url} ({reason}). Offline? Download it by other means and pass --archive PATH"
        ) from None
    with response:
        resumed = offset and response.status == 206
        if offset and not resumed:
            offset = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        expected = None if length is None else offset + int(length)
        with open(part, "ab" if resumed else "wb") as handle:
            try:
                while chunk := response.read(CHUNK):
                    handle.write(chunk)
            except (OSError, http.client.HTTPException) as err:
                raise DownloadError(
                    f"{url}: connection lost after {handle.tell()} bytes ({err!r}); run again to resume"
                ) from None
    size = part.stat().st_size
    if expected is not None and size != expected:
        raise DownloadError(f"{url}: got {size} of {expected} bytes; run again to resume")
    return _finish(part, dest, sha256, url)


def _finish(part: Path, dest: Path, sha256: str | None, url: str) -> Path:
    actual = sha256_file(part)
    if sha256 is not None and actual != sha256:
        part.unlink()
        raise DownloadError(f"{url}: sha256 {actual} does not match the expected {sha256}; deleted, run again")
    size = part.stat().st_size
    os.replace(part, dest)
    # Written last: killed before this, the next call finds no record and downloads again.
    atomic_write_json(record_path(dest), {"url": url, "size": size, "sha256": actual})
    return dest


def record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + RECORD_SUFFIX)


def recorded_sha256(dest: Path) -> str | None:
    """The sha256 a completed ``fetch`` of ``dest`` recorded (None: no record)."""
    record = _read_record(dest)
    return None if record is None else record["sha256"]


def _read_record(dest: Path) -> dict | None:
    try:
        record = json.loads(record_path(dest).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not {"url", "size", "sha256"} <= set(record):
        return None
    return record


def _reusable(dest: Path, url: str, sha256: str | None) -> bool:
    """Whether ``dest`` is a completed download of ``url`` (or of the pinned ``sha256``) left unchanged."""
    record = _read_record(dest)
    if record is None or not dest.is_file():
        return False
    if sha256 is not None and record["sha256"] != sha256:
        return False
    # Without a pinned checksum the URL is all that says which file this is: a mirror's (or a test
    # server's) file of the same name is not the registry's.
    if sha256 is None and record["url"] != url:
        return False
    return dest.stat().st_size == record["size"] and sha256_file(dest) == record["sha256"]


def extract(archive: Path, into: Path) -> None:
    """Unpack a .zip, .tar.gz or .tgz; members that would land outside ``into`` are refused."""
    into = Path(into).resolve()
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as handle:
            for member in handle.namelist():
                if not (into / member).resolve().is_relative_to(into):
                    raise DownloadError(f"{archive}: member {member!r} escapes the extraction directory")
            handle.extractall(into)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as handle:
            try:
                handle.extractall(into, filter="data")
            except tarfile.FilterError as err:
                raise DownloadError(f"{archive}: unsafe member ({err})") from None
    else:
        raise DownloadError(f"{archive}: unknown archive type (expected .zip, .tar.gz, .tgz)")


def find_dataset_dir(root: Path, layout: str) -> Path:
    """The directory under ``root`` holding the files of ``layout``."""
    marker = "entity2id.txt" if layout == "dglke" else "train.txt"
    found = sorted(p.parent for p in Path(root).rglob(marker))
    if not found:
        raise DownloadError(f"no {marker} inside the archive extracted at {root}")
    return found[0]


def download(
    name: str,
    out: Path,
    *,
    downloads: Path,
    url: str | None = None,
    sha256: str | None = None,
    archive: Path | None = None,
    options: ConvertOptions | None = None,
    overwrite: bool = False,
    check_counts: bool = True,
) -> Manifest:
    """Fetch (or take ``archive``), extract and convert the dataset ``name`` into ``out``; with
    ``check_counts``, a conversion whose counts differ from the registry's is refused before ``out``
    is written."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(sorted(REGISTRY))}")
    remote = REGISTRY[name]
    url = url or remote.url
    if archive is None:
        archive = fetch(url, Path(downloads) / Path(url).name, sha256=sha256 or remote.sha256)
        digest = recorded_sha256(archive) or sha256_file(archive)
    elif not Path(archive).is_file():
        raise ValueError(f"--archive {archive}: no such file")
    else:
        digest = sha256_file(archive)
    Path(downloads).mkdir(parents=True, exist_ok=True)
    print(f"{archive}: sha256 {digest}", flush=True)
    with tempfile.TemporaryDirectory(dir=Path(downloads), prefix=f".{name}-extract-") as tmp:
        extract(Path(archive), Path(tmp))
        directory = find_dataset_dir(Path(tmp), remote.layout)
        source = DglKeSource(directory) if remote.layout == "dglke" else TsvSource(directory)
        provenance = {"archive": {"url": url, "sha256": digest}}
        expect = remote.counts if check_counts else None
        return convert(
            source, Path(out), name=name, options=options, overwrite=overwrite, provenance=provenance, expect=expect
        )
