"""Downloading public benchmark graphs: transfers through pooch, resumable over HTTP, size and sha256
checks, a record of each completed download, safe extraction, conversion.

``fetch`` hands the transfer to pooch (a ``Pooch`` of one file): retries with a growing wait, a temporary
file moved into place only when the transfer completed, and ftp, sftp and ``doi:`` URLs through pooch's own
downloaders. For http(s) it plugs in ``ResumingHTTP``, a pooch downloader that keeps what arrived in
``NAME.part`` and continues it with an HTTP Range request, on pooch's next attempt or on the next run (or
starts over when the server ignores ranges): pooch's own HTTP downloader starts every attempt from byte 0
(README, "Download"). The sha256 is checked after the transfer rather than by pooch, which would retry a
mismatch as if it were a network failure; the same pass gives the digest recorded in
``NAME.download.json`` (url, size, sha256), written last: a later call reuses ``NAME`` only when that
record exists and the file still matches it, so a file that merely sits in the downloads directory
(copied there, left by a test, truncated) is downloaded again rather than trusted.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tqdm import tqdm

from storage.atomic import atomic_write_json
from storage.convert import ConvertOptions, ExpectedCounts, convert
from storage.layout import Manifest, sha256_file
from storage.sources import DglKeSource, TsvSource

if TYPE_CHECKING:
    import requests

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


class ResumingHTTP:
    """A pooch downloader for http(s) that resumes: the body accumulates in ``part``, which becomes pooch's
    output file only once it is complete, so a failed attempt leaves it for the next one to continue."""

    def __init__(self, part: Path, *, timeout: float, progress: bool):
        self.part, self.timeout, self.progress = part, timeout, progress

    def __call__(self, url: str, output_file: str, pooch_: object, check_only: bool = False) -> None:
        import requests  # here, not at the top: the command lines import this module to list the registry

        offset = self.part.stat().st_size if self.part.exists() else 0
        # identity: a server may gzip what it sends when asked (requests asks by default), and then the bytes
        # written, and a Range offset into them, are not the file's.
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        try:
            response = requests.get(url, headers=headers, stream=True, timeout=self.timeout)
        except requests.RequestException as err:
            raise DownloadError(
                f"cannot reach {url} ({err}). Offline? Download it by other means and pass --archive PATH"
            ) from None
        with response:
            if response.status_code == 416 and offset:
                # The part file holds the whole body, unless the server says the file has another size
                # (``Content-Range: bytes */SIZE``: it changed since): then start over.
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit() and int(total) != offset:
                    self.part.unlink()
                    raise DownloadError(f"{url}: is {total} bytes now, the partial download {offset}; starting over")
            elif response.status_code >= 400:
                raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason}")
            else:
                start = offset if response.status_code == 206 else 0  # 200: the server ignored the range
                length = response.headers.get("Content-Length")
                self._receive(response, url, start, None if length is None else start + int(length))
        os.replace(self.part, output_file)

    def _receive(self, response: requests.Response, url: str, start: int, expected: int | None) -> None:
        import requests
        import urllib3

        # disable=None: tqdm shows the bar only when stderr is a terminal.
        bar = tqdm(total=expected, initial=start, unit="B", unit_scale=True, desc=Path(url).name, leave=False,
                   disable=None if self.progress else True)  # fmt: skip
        with bar, open(self.part, "ab" if start else "wb") as handle:
            try:
                # The bytes as sent (no content decoding), so a Range offset is an offset into the file.
                for chunk in response.raw.stream(CHUNK, decode_content=False):
                    handle.write(chunk)
                    bar.update(len(chunk))
            except (OSError, requests.RequestException, urllib3.exceptions.HTTPError) as err:
                raise DownloadError(
                    f"{url}: connection lost after {handle.tell()} bytes ({err!r}); run again to resume"
                ) from None
            size = handle.tell()
        if expected is not None and size != expected:
            raise DownloadError(f"{url}: got {size} of {expected} bytes; run again to resume")


def fetch(
    url: str, dest: Path, *, sha256: str | None = None, timeout: float = 60.0, retries: int = 2, progress: bool = False
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part`` over http(s)), trying ``retries`` more times
    after a failed transfer; return ``dest``. ``progress``: a progress bar on a terminal."""
    if retries < 0:
        raise ValueError(f"retries={retries}: must be at least 0")
    dest = Path(dest)
    if _reusable(dest, url, sha256):
        return dest
    import pooch
    import requests

    record_path(dest).unlink(missing_ok=True)
    dest.unlink(missing_ok=True)  # pooch would keep any file it finds there; only a recorded one is trusted
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if urlsplit(url).scheme in ("http", "https"):
        downloader = ResumingHTTP(part, timeout=timeout, progress=progress)
    else:
        downloader = pooch.choose_downloader(url, progressbar=progress and sys.stderr.isatty())
    fetcher = pooch.Pooch(path=dest.parent, base_url="", registry={dest.name: None}, urls={dest.name: url},
                          retry_if_failed=retries)  # fmt: skip
    try:
        fetcher.fetch(dest.name, downloader=downloader)
    except requests.RequestException as err:  # from pooch's own downloaders (doi: resolves over HTTP)
        raise DownloadError(f"{url}: {err}") from None
    return _finish(dest, sha256, url)


def _finish(dest: Path, sha256: str | None, url: str) -> Path:
    actual = sha256_file(dest)
    if sha256 is not None and actual != sha256:
        dest.unlink()
        raise DownloadError(f"{url}: sha256 {actual} does not match the expected {sha256}; deleted, run again")
    # Written last: killed before this, the next call finds no record and downloads again.
    atomic_write_json(record_path(dest), {"url": url, "size": dest.stat().st_size, "sha256": actual})
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
    retries: int = 2,
    progress: bool = False,
) -> Manifest:
    """Fetch (or take ``archive``), extract and convert the dataset ``name`` into ``out``; with
    ``check_counts``, a conversion whose counts differ from the registry's is refused before ``out``
    is written. ``progress``: progress bars of the download and the conversion, on a terminal."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(sorted(REGISTRY))}")
    remote = REGISTRY[name]
    url = url or remote.url
    if archive is None:
        dest = Path(downloads) / Path(url).name
        archive = fetch(url, dest, sha256=sha256 or remote.sha256, retries=retries, progress=progress)
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
            source, Path(out), name=name, options=options, overwrite=overwrite, provenance=provenance,
            expect=expect, progress=progress,
        )  # fmt: skip
