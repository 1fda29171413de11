import os
import stat

import pytest

from storage.atomic import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text


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


def test_two_writers_of_one_path_never_share_a_temporary_and_a_failed_one_leaves_the_old_file(tmp_path):
    out = tmp_path / "emb.parquet"
    out.write_text("old")
    with atomic_path(out) as first, atomic_path(out) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first, whole")
        second.write_text("second, whole")
        assert out.read_text() == "old"  # nothing is in place until a writer finishes
    assert out.read_text() == "first, whole"  # the outer block finished last: its whole file, not a mix
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed midway")
    assert out.read_text() == "first, whole"
    assert [p.name for p in tmp_path.iterdir()] == ["emb.parquet"]  # no temporary left
    with atomic_path(tmp_path / "new" / "dir" / "x.tsv") as tmp:  # the directory made, as for every write
        tmp.write_text("x")
    assert (tmp_path / "new" / "dir" / "x.tsv").read_text() == "x"
