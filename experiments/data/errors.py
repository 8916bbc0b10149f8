"""The one exception of the data pipeline, and how a value is shown in its messages."""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """A problem with the data: a missing file, split or field, or a row that cannot be read or used.

    The message names the file (or data set), the line (or row index) and the field, and says
    what to do; the CLI prints it without a traceback.
    """


def describe(value: Any) -> str:
    """A value for a message: its type and (shortened) repr, e.g. ``int 5``, or ``null``."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
