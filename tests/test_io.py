"""jdq.io: atomic writes keep the old file on failure, leave no temporary file, use the umask."""

import os
import stat

import pytest

from jdq.io import atomic_write, atomic_write_text


def _entries(folder):
    return sorted(os.listdir(folder))


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "out.txt"
    assert atomic_write_text(target, "first\n") == target
    assert target.read_text() == "first\n"
    atomic_write_text(str(target), "second")
    assert target.read_text() == "second"
    assert _entries(tmp_path) == ["out.txt"]


def test_failing_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "data.bin"
    old = bytes(range(256)) * 3
    target.write_bytes(old)
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, write)
    assert target.read_bytes() == old
    assert _entries(tmp_path) == ["data.bin"]
    assert os.path.dirname(seen[0]) == str(tmp_path)  # the temporary file was in the target's folder


def test_interrupted_write_leaves_no_temp(tmp_path):
    def write(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.npz", write)
    assert _entries(tmp_path) == []


def test_temp_file_keeps_the_extension(tmp_path):
    seen = []
    atomic_write(tmp_path / "grid.png", lambda tmp: seen.append(tmp) or open(tmp, "wb").close())
    assert seen[0].endswith(".png") and os.path.basename(seen[0]).startswith(".grid.")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        target = atomic_write_text(tmp_path / f"f{umask:o}.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_missing_folder_is_a_clear_error(tmp_path):
    called = []
    with pytest.raises(FileNotFoundError, match=r"folder .*nope does not exist"):
        atomic_write(tmp_path / "nope" / "f.txt", called.append)
    assert called == []  # nothing was written


def test_parents_creates_folders(tmp_path):
    target = atomic_write_text(tmp_path / "a" / "b" / "f.md", "x", parents=True)
    assert target.read_text() == "x"


def test_directory_target_is_a_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write_text(tmp_path / "d", "x")
    assert _entries(tmp_path / "d") == []


def test_parent_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        atomic_write_text(tmp_path / "f" / "g.txt", "x")
    assert (tmp_path / "f").read_text() == "keep"
