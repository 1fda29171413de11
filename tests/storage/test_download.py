"""Downloads against a real HTTP server on 127.0.0.1 that honours (or ignores) Range and can cut a body short."""

import gzip
import hashlib
import io
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from storage import download as download_module
from storage.convert import ExpectedCounts
from storage.download import DownloadError, Remote, download, fetch, record_path
from storage.reader import TripleStore

ROOT = Path(__file__).parents[2]


class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.files, self.honour_range, self.cut_after = files, True, None
        self.gzip_if_asked = False  # as a server compressing on the fly does, when the client accepts gzip
        self.ranges: list[str | None] = []
        self.encodings: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                header = self.headers.get("Range")
                server.ranges.append(header)
                server.encodings.append(self.headers.get("Accept-Encoding"))
                if header and server.honour_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                if server.gzip_if_asked and "gzip" in self.headers.get("Accept-Encoding", ""):
                    payload = gzip.compress(payload)
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if server.cut_after is not None:
                    payload, server.cut_after = payload[: server.cut_after], None
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server({"/blob.bin": bytes(range(256)) * 4000})
    yield s
    s.close()


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    body = server.files["/blob.bin"]
    server.cut_after = 300_000
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", retries=0)
    assert (tmp_path / "blob.bin.part").stat().st_size == 300_000 and not (tmp_path / "blob.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin.part"]  # pooch removed its temporary file
    digest = hashlib.sha256(body).hexdigest()
    fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", sha256=digest)
    assert server.ranges[-1] == "bytes=300000-"
    assert (tmp_path / "blob.bin").read_bytes() == body and not (tmp_path / "blob.bin.part").exists()


def test_a_retry_resumes_the_interrupted_transfer_in_the_same_call(server, tmp_path):
    server.cut_after = 300_000
    fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", retries=1)
    assert server.ranges == [None, "bytes=300000-"]
    assert (tmp_path / "blob.bin").read_bytes() == server.files["/blob.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "blob.bin.download.json"]


def test_a_complete_part_file_is_finished_without_a_transfer(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(server.files["/blob.bin"])
    fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin")
    assert server.ranges == [f"bytes={len(server.files['/blob.bin'])}-"]  # answered 416, with the same size
    assert (tmp_path / "blob.bin").read_bytes() == server.files["/blob.bin"]


def test_a_part_file_longer_than_the_remote_file_starts_over(server, tmp_path):
    body = server.files["/blob.bin"]
    (tmp_path / "blob.bin.part").write_bytes(body + b"from an older, longer version")
    with pytest.raises(DownloadError, match="starting over"):
        fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", retries=0)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()
    fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin")
    assert (tmp_path / "blob.bin").read_bytes() == body


def test_the_file_arrives_as_stored_from_a_server_that_would_compress_it(server, tmp_path):
    server.gzip_if_asked = True
    fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin")
    assert server.encodings == ["identity"]
    assert (tmp_path / "blob.bin").read_bytes() == server.files["/blob.bin"]


def test_server_ignoring_ranges_restarts_from_zero(server, tmp_path):
    server.honour_range = False
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes")
    fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin")
    assert (tmp_path / "blob.bin").read_bytes() == server.files["/blob.bin"]


def test_checksum_mismatch_deletes_the_download(server, tmp_path):
    with pytest.raises(DownloadError, match="does not match the expected"):
        fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", sha256="0" * 64)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()


def test_unreachable_host_says_offline(tmp_path):
    with pytest.raises(DownloadError, match=r"cannot reach .*Offline\? .*--archive"):
        fetch("http://127.0.0.1:9/nothing.zip", tmp_path / "nothing.zip", timeout=5)


def _freebase_like_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("Freebase/entity2id.txt", "4\n/m/a\t0\n/m/b\t1\n/m/c\t2\n/m/d\t3\n")
        archive.writestr("Freebase/relation2id.txt", "2\n/r/x\t0\n/r/y\t1\n")
        archive.writestr("Freebase/train.txt", "0\t1\t0\n1\t2\t1\n2\t3\t0\n3\t0\t1\n")
        archive.writestr("Freebase/valid.txt", "0\t2\t1\n")
        archive.writestr("Freebase/test.txt", "1\t3\t0\n")
    return buffer.getvalue()


def _storage_download(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "storage", "download", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_download_command_refuses_other_counts_then_converts_a_sample_reusing_the_recorded_download(server, tmp_path):
    body = _freebase_like_zip()
    server.files["/Freebase.zip"] = body
    args = ["freebase86m", "--url", f"{server.url}/Freebase.zip", "--downloads", str(tmp_path / "dl"),
            "--out", str(tmp_path / "fb"), "--sha256", hashlib.sha256(body).hexdigest()]  # fmt: skip
    refused = _storage_download(*args)
    assert refused.returncode == 2
    assert "entities: expected 86,054,151, found 4" in refused.stderr, refused.stderr
    assert "train triples: expected 304,727,650, found 4" in refused.stderr
    assert not (tmp_path / "fb").exists() and [p.name for p in tmp_path.iterdir()] == ["dl"]

    result = _storage_download(*args, "--skip-count-check")
    assert result.returncode == 0, result.stderr
    assert len(server.ranges) == 1, "the completed, recorded download was fetched again"
    store = TripleStore(tmp_path / "fb")
    assert store.manifest.num_entities == 4 and store.num_triples("train") == 4
    assert store.manifest.source["archive"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert sorted(store.read_split("train").tolist()) == [[0, 0, 1], [1, 1, 2], [2, 0, 3], [3, 1, 0]]
    # Extraction cleaned up; the archive and its download record stay.
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["Freebase.zip", "Freebase.zip.download.json"]

    # The sample now in the directory is no Freebase86m to `make train-freebase` (storage info --expect).
    command = [sys.executable, "-m", "storage", "info", str(tmp_path / "fb"), "--expect", "freebase86m"]
    info = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert info.returncode == 2
    assert f"{tmp_path / 'fb'}: does not hold the published 'freebase86m'" in info.stderr, info.stderr
    assert "relations: expected 14,824, found 2" in info.stderr


def test_only_a_recorded_unchanged_download_is_reused(server, tmp_path):
    url, dest, body = f"{server.url}/blob.bin", tmp_path / "blob.bin", server.files["/blob.bin"]
    dest.write_bytes(b"a file someone left here")  # no record: not trusted
    fetch(url, dest)
    assert dest.read_bytes() == body and len(server.ranges) == 1
    fetch(url, dest)
    assert len(server.ranges) == 1  # recorded and unchanged: reused
    fetch(url.replace("127.0.0.1", "localhost"), dest)
    assert len(server.ranges) == 2  # recorded for another URL, no pinned checksum: downloaded again
    dest.write_bytes(body[:-1] + b"x")  # same size, other bytes
    fetch(url.replace("127.0.0.1", "localhost"), dest)
    assert dest.read_bytes() == body and len(server.ranges) == 3
    record_path(dest).write_text("{not json")
    fetch(url, dest)
    assert len(server.ranges) == 4


def _write_sample_zip(path: Path) -> Path:
    path.write_bytes(_freebase_like_zip())
    return path


@pytest.mark.parametrize(
    ("counts", "refusal"),
    [
        (ExpectedCounts(num_entities=4, num_relations=2, num_train_triples=4), None),
        (
            ExpectedCounts(num_entities=4, num_relations=3, num_train_triples=5),
            r"dataset 'tiny'.*relations: expected 3, found 2; train triples: expected 5, found 4",
        ),
    ],
)
def test_registry_counts_are_checked_before_anything_is_written(tmp_path, monkeypatch, counts, refusal):
    remote = Remote("http://127.0.0.1:9/tiny.zip", "dglke", counts=counts)
    monkeypatch.setitem(download_module.REGISTRY, "tiny", remote)
    archive, out = _write_sample_zip(tmp_path / "tiny.zip"), tmp_path / "datasets" / "tiny"
    if refusal is None:
        manifest = download("tiny", out, downloads=tmp_path / "dl", archive=archive)
        assert manifest.num_entities == 4 and TripleStore(out).num_triples("train") == 4
        return
    with pytest.raises(ValueError, match=refusal):
        download("tiny", out, downloads=tmp_path / "dl", archive=archive)
    assert not (tmp_path / "datasets").exists()  # refused before even the output's parent was made
    assert list((tmp_path / "dl").iterdir()) == []  # the extraction is removed too


def test_archive_escaping_the_directory_is_refused(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../evil/train.txt", "a\tr\tb\n")
    (tmp_path / "evil.zip").write_bytes(buffer.getvalue())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "storage",
            "download",
            "wn18rr",
            "--archive",
            str(tmp_path / "evil.zip"),
            "--downloads",
            str(tmp_path / "dl"),
            "--out",
            str(tmp_path / "ds"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "escapes the extraction directory" in result.stderr
    assert not (tmp_path / "evil").exists() and not (tmp_path / "ds").exists()
