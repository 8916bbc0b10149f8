"""write_atomically: the old file or the new one, never part of one, and no temporary file left."""

import pytest

from peftcore.files import write_atomically


def test_text_bytes_and_writer_functions(tmp_path):
    write_atomically(tmp_path / "a" / "x.txt", "héllo")
    assert (tmp_path / "a/x.txt").read_text(encoding="utf-8") == "héllo"
    write_atomically(tmp_path / "x.bin", b"\x00\x01")
    write_atomically(tmp_path / "y.txt", lambda tmp: open(tmp, "w").write("via a function"))
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01" and (tmp_path / "y.txt").read_text() == "via a function"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "x.bin", "y.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "record.json"
    write_atomically(target, "old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]
