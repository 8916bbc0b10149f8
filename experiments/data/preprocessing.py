"""Preprocessing: a dialogue becomes one ``"<speaker>: <text>"`` line per turn, with @mentions and
links removed; reference summaries are checked and stripped."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from experiments.data.errors import DataError, describe

_MENTION = re.compile(r"(?<!\w)@\w+")  # (?<!\w): keeps e-mail addresses whole
_LINK = re.compile(r"https?://\S+")


def clean_text(text: str) -> str:
    """Remove @mentions and http(s) links, collapse whitespace to single spaces."""
    return " ".join(_MENTION.sub(" ", _LINK.sub(" ", text)).split())


def format_dialogue(
    dialogue: str | Sequence[Any],
    speaker_key: str = "speaker",
    text_key: str = "text",
    rename_speakers: dict[str, str] | None = None,
    strip_mentions_and_links: bool = True,
) -> str:
    """One line per turn, ``"<speaker>: <text>"``.

    A dialogue that is one string keeps its lines (cleaned line by line when
    ``strip_mentions_and_links``); a list of strings gives one line each; a list of dicts
    takes the speaker and text from ``speaker_key`` and ``text_key``. A turn left empty by
    cleaning (say, only "@AppleSupport") is dropped, so the result may be empty (the data
    module refuses such a row). Any other type of dialogue, turn, speaker or text is a
    `DataError` saying which.
    """
    rename_speakers = rename_speakers or {}
    if isinstance(dialogue, str):
        if not strip_mentions_and_links:
            return dialogue
        return "\n".join(line for line in map(clean_text, dialogue.splitlines()) if line)
    if not isinstance(dialogue, (list, tuple)):
        raise DataError(
            f"the dialogue is {describe(dialogue)}; expected a string, a list of strings, or a list of "
            f"turns with keys {speaker_key!r} and {text_key!r}"
        )
    lines = []
    for number, turn in enumerate(dialogue, start=1):
        speaker, text = _speaker_and_text(turn, number, speaker_key, text_key)
        text = clean_text(text) if strip_mentions_and_links else text.strip()
        if text:
            lines.append(text if speaker is None else f"{rename_speakers.get(speaker, speaker)}: {text}")
    return "\n".join(lines)


def _speaker_and_text(turn: Any, number: int, speaker_key: str, text_key: str) -> tuple[str | None, str]:
    """A turn's speaker (None for a plain string) and text; turns are numbered from 1 in messages."""
    if isinstance(turn, str):
        return None, turn
    if not isinstance(turn, dict):
        raise DataError(
            f"turn {number} is {describe(turn)}; expected a string or a dict with keys "
            f"{speaker_key!r} and {text_key!r}"
        )
    for key in (speaker_key, text_key):
        if key not in turn:
            raise DataError(
                f"turn {number} has no key {key!r}; the keys it has are {sorted(turn)} "
                "(set speaker_key / text_key to the dialogue's own)"
            )
    speaker, text = turn[speaker_key], turn[text_key]
    if not isinstance(text, str):
        raise DataError(f"turn {number}'s {text_key!r} is {describe(text)}; expected a string")
    if isinstance(speaker, bool) or not isinstance(speaker, (str, int)):
        raise DataError(
            f"turn {number}'s {speaker_key!r} is {describe(speaker)}; expected a name (or a number)"
        )
    return str(speaker), text


def references_in(value: Any, field: str) -> list[str]:
    """The reference summaries a field holds, stripped: one string, or a non-empty list of strings.

    Anything else (a number, null, an empty list) and an empty or blank summary are a
    `DataError` naming the field.
    """
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, (list, tuple)) or not refs:
        raise DataError(
            f"field {field!r} is {describe(value)}; expected a summary (a string) or a non-empty list of them"
        )
    for k, ref in enumerate(refs):
        item = f"field {field!r}" if isinstance(value, str) else f"item {k} of field {field!r}"
        if not isinstance(ref, str):
            raise DataError(f"{item} is {describe(ref)}; expected a summary (a string)")
        if not ref.strip():
            raise DataError(f"{item} is an empty summary; fill it in or remove the row")
    return [ref.strip() for ref in refs]
