"""Writing files so that nothing is ever half-written: the one helper every writer uses."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def write_atomically(path: PathLike, content: Union[str, bytes, Callable[[str], None]]) -> Path:
    """Write ``content`` (text, bytes, or a function that writes the file at the path it is
    given) to a temporary file beside ``path``, then rename it into place: readers see the old
    file or the new one, never part of one. On any error the temporary file is removed and the
    old file stays. Creates the parent directory."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
