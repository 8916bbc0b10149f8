"""write_atomically: the old file or the new one, never part of one, no temporary file left,
synced to disk, with the mode any other writer would give it."""

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

from peftcore.files import remove_stale_temporaries, write_atomically


def write_with_open(tmp):
    with open(tmp, "w") as handle:
        handle.write("via a function")


def test_text_bytes_and_writer_functions(tmp_path):
    write_atomically(tmp_path / "a" / "x.txt", "héllo")
    assert (tmp_path / "a/x.txt").read_text(encoding="utf-8") == "héllo"
    write_atomically(tmp_path / "x.bin", b"\x00\x01")
    write_atomically(tmp_path / "y.txt", lambda tmp: Path(tmp).write_text("via a function"))
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01" and (
        tmp_path / "y.txt"
    ).read_text() == "via a function"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.bin", "y.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "record.json"
    write_atomically(target, "old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_failed_sync_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    write_atomically(target, "old")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    for content in ("new", write_with_open):
        with pytest.raises(OSError, match="I/O error"):
            write_atomically(target, content)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def record_syncs(monkeypatch):
    """Every fsync (of a file or a directory, by inode) and every os.replace, in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync-dir" if stat.S_ISDIR(info.st_mode) else "fsync-file", info.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.parametrize("content", [b"bytes", "text", write_with_open], ids=["bytes", "text", "function"])
def test_the_file_is_synced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch, content):
    target = tmp_path / "out" / "record.json"
    target.parent.mkdir()
    events = record_syncs(monkeypatch)
    write_atomically(target, content)
    file_inode, dir_inode = target.stat().st_ino, target.parent.stat().st_ino
    assert events == [("fsync-file", file_inode), ("replace", file_inode), ("fsync-dir", dir_inode)]


def test_a_function_that_replaces_the_file_has_the_replacement_synced(tmp_path, monkeypatch):
    """A writer may stage elsewhere and move its file in: the file that ends up there is synced."""

    def stage_and_move(tmp):
        staged = tmp_path / "staged"
        staged.write_text("staged")
        os.rename(staged, tmp)

    events = record_syncs(monkeypatch)
    target = write_atomically(tmp_path / "x", stage_and_move)
    assert events[0] == ("fsync-file", target.stat().st_ino) and target.read_text() == "staged"


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one is restored whatever happens."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(
    "mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"]
)
@pytest.mark.parametrize("content", [b"bytes", write_with_open], ids=["bytes", "function"])
def test_new_files_follow_the_umask(tmp_path, umask, mask, mode, content):
    umask(mask)
    target = write_atomically(tmp_path / "new.json", content)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    plain = tmp_path / "plain"
    plain.write_text("as open() creates it")
    assert stat.S_IMODE(plain.stat().st_mode) == mode  # the same as every other writer


@pytest.mark.parametrize("content", [b"bytes", write_with_open], ids=["bytes", "function"])
def test_a_replaced_file_keeps_its_mode(tmp_path, umask, content):
    target = tmp_path / "private.json"
    target.write_text("old")
    for mode in (0o600, 0o640, 0o444):
        target.chmod(mode)
        write_atomically(target, content)
        assert stat.S_IMODE(target.stat().st_mode) == mode


def test_a_function_that_replaces_the_file_still_gets_the_mode(tmp_path, umask):
    """tempfile.mkstemp makes 0600 files: a writer that stages with it does not make ours private."""

    def stage_with_mkstemp(tmp):
        fd, staged = tempfile.mkstemp(dir=tmp_path)
        os.close(fd)
        os.replace(staged, tmp)

    umask(0o022)
    target = write_atomically(tmp_path / "x", stage_with_mkstemp)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_stale_temporaries_of_one_file_are_removed_and_nothing_else(tmp_path):
    names = []

    def killed(tmp):
        names.append(Path(tmp))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "last.ckpt", killed)
    stale = names[0]
    stale.write_text("half")  # what a process killed outright (SIGKILL) leaves behind
    old_style = tmp_path / ".last.ckpt.k3_x9abc.tmp"  # tempfile.mkstemp's names, as older versions wrote
    keep = [
        ".last.ckpt.backup.old.tmp",
        ".last.ckpt.x.ckpt.tmp",
        "last.ckpt",
        ".last.ckpt.tmp",
        "last.ckpt.abc.tmp",
        ".best.ckpt.abc.tmp",
        ".last.ckpt.abc.tmpx",
    ]
    old_style.write_text("")
    for name in keep:
        (tmp_path / name).write_text("")
    (tmp_path / ".last.ckpt.dir.tmp").mkdir()  # not a regular file: left alone
    assert remove_stale_temporaries(tmp_path, "last.ckpt") == sorted([stale, old_style])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + [".last.ckpt.dir.tmp"])
    assert remove_stale_temporaries(tmp_path, "last.ckpt") == []
    assert remove_stale_temporaries(tmp_path / "missing", "last.ckpt") == []


@pytest.mark.parametrize("name", ["", "a/b", ".", ".."])
def test_stale_temporaries_need_a_file_name(tmp_path, name):
    with pytest.raises(ValueError, match="takes a file name such as 'last.ckpt'"):
        remove_stale_temporaries(tmp_path, name)
