import os
import stat

import pytest

from storage.atomic import atomic_torch_save, atomic_write_json, atomic_write_text


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_an_atomic_write_gets_the_mode_of_a_new_file_not_the_temporary_s_0600(tmp_path, mask):
    previous = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        atomic_torch_save(tmp_path / "c.pt", {"x": 1})
        (tmp_path / "plain.txt").write_text("x")  # what open() makes under this umask
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~mask
    for name in ("a.txt", "b.json", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_filesystem_that_refuses_modes_still_gets_the_file(tmp_path, monkeypatch):
    def refuse(fd, mode):
        raise PermissionError("no Unix modes here")

    monkeypatch.setattr(os, "fchmod", refuse)
    open_fds = len(os.listdir("/proc/self/fd"))
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert len(os.listdir("/proc/self/fd")) == open_fds  # the temporary's descriptor closed
