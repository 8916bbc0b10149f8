"""Writing files so that nothing is ever half-written: the one helper every writer uses.

``write_atomically(path, content)`` writes a temporary file beside ``path`` (same directory, so
the rename never crosses a filesystem), ``.{name}.<random>.tmp``, then renames it into place:

    1. create the temporary with mode 0666, which the kernel narrows by the umask, as for any
       file a program creates; when ``path`` exists, the temporary takes that file's mode
       instead (as ``open(path, "w")`` keeps it), so a file kept private stays private
    2. write it (or let a function write it) and fsync it: its bytes are on disk
    3. rename it over ``path`` (readers see the old file or the new one, never part of one)
    4. fsync the directory: the rename itself survives a power cut

On any error before the rename the temporary is removed and the old file stays as it was. A
process killed outright (SIGKILL, power loss) can still leave a temporary behind:
``remove_stale_temporaries(directory, name)`` removes those of one file.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

PathLike = str | os.PathLike
Content = str | bytes | Callable[[str], None]

_TEMPORARY_SUFFIX = ".tmp"
# The random part of a temporary's name: ours is hex; tempfile.mkstemp's (older versions of this
# module used it) is lowercase letters, digits and '_'. Never a dot, so '.x.<random>.tmp' of
# file 'x' cannot be mistaken for a temporary of file 'x.<something>'.
_RANDOM_PART = r"[a-z0-9_]+"


def write_atomically(path: PathLike, content: Content) -> Path:
    """Write ``content`` (text as UTF-8, bytes, or a function that writes the file at the path
    it is given) to ``path`` atomically and durably; returns ``path`` as a Path.

    The file is created with mode ``0666 & ~umask`` like any other new file, or keeps the mode
    of the file it replaces. Its data are fsynced before the rename and its directory after
    it. On any error (KeyboardInterrupt included) the temporary file is removed and the old
    file stays. Creates the parent directory.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    kept_mode = _mode_of(target)
    fd, tmp = _create_temporary(target)
    try:
        mode = kept_mode if kept_mode is not None else stat.S_IMODE(os.fstat(fd).st_mode)
        if callable(content):
            os.close(fd)
            content(str(tmp))
            _set_mode(tmp, mode)  # the function may have replaced the file with one of its own
            _sync_file(tmp)
        else:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), mode)
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(target.parent)
    return target


def remove_stale_temporaries(directory: PathLike, name: str) -> list[Path]:
    """Remove the temporary files ``write_atomically`` leaves beside ``directory/name`` when its
    process is killed mid-write (``.{name}.<random>.tmp``); returns the paths removed.

    Only regular files of exactly that pattern are touched, never ``name`` itself or another
    file's temporaries. Call it only while no other process is writing ``name`` (for example
    when a run that owns the directory starts): a temporary being written is indistinguishable
    from a stale one.
    """
    if not name or "/" in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise ValueError(f"remove_stale_temporaries takes a file name such as 'last.ckpt', got {name!r}")
    folder = Path(directory)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(name)}\.{_RANDOM_PART}{re.escape(_TEMPORARY_SUFFIX)}")
    removed = []
    for entry in folder.iterdir():
        if pattern.fullmatch(entry.name) and stat.S_ISREG(entry.lstat().st_mode):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return sorted(removed)


def _create_temporary(target: Path) -> tuple[int, Path]:
    """A new file beside ``target``, opened for writing, created with mode 0666 (the kernel
    applies the umask); O_EXCL makes the name ours alone."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}{_TEMPORARY_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(
        f"could not create a temporary file beside {target}: 100 random names were all taken"
    )


def _mode_of(path: Path) -> int | None:
    """The permission bits of an existing file, None when there is none."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None


def _set_mode(path: Path, mode: int) -> None:
    if stat.S_IMODE(os.stat(path).st_mode) != mode:
        os.chmod(path, mode)


def _sync_file(path: Path) -> None:
    """fsync a file that someone else wrote and closed (a read-only descriptor suffices on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(directory: Path) -> None:
    """fsync a directory so a rename in it is durable. Skipped where the platform cannot open a
    directory (no O_DIRECTORY: Windows) or the filesystem cannot sync one (EINVAL, ENOTSUP: some
    network and FUSE filesystems); any other error is raised."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
