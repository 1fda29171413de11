"""Progress bars of downloads and conversions: shown on a terminal, silent otherwise or when turned off."""

import io
import re
import sys

import pytest

from storage.convert import convert
from storage.dataset import BUNDLED_DIR
from storage.download import fetch
from storage.sources import TsvSource
from tests.storage.test_download import _Server


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _stderr(monkeypatch, terminal: bool) -> io.StringIO:
    """sys.stderr as a terminal or as a pipe, its text kept (set in the test itself: pytest's capture
    replaces sys.stderr again between a fixture's set-up and the test)."""
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


CASES = [(True, True, True), (True, False, False), (False, True, False)]


@pytest.mark.parametrize(("terminal", "progress", "shown"), CASES)
def test_conversion_bar(tmp_path, monkeypatch, terminal, progress, shown):
    stderr = _stderr(monkeypatch, terminal)
    convert(TsvSource(BUNDLED_DIR / "nations"), tmp_path / "nations", progress=progress)
    assert ("nations: writing" in stderr.getvalue()) == shown
    if not shown:
        assert stderr.getvalue() == ""


@pytest.mark.parametrize(("terminal", "progress", "shown"), CASES)
def test_download_bar(tmp_path, monkeypatch, terminal, progress, shown):
    stderr = _stderr(monkeypatch, terminal)
    server = _Server({"/blob.bin": bytes(range(256)) * 4000})
    try:
        fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", progress=progress)
    finally:
        server.close()
    # pooch's own log line ("Downloading file 'blob.bin' ...") may be there; the bar only on a terminal.
    assert bool(re.search(r"blob\.bin: +\d+%\|", stderr.getvalue())) == shown
