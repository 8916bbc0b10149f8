"""Reading the judge's answers: the score in an answer's text, and the probability-weighted score
from the log-probabilities of its score token (the paper's form)."""

import math
import re
from typing import Any

_RANGE = re.compile(r"\d\s*-\s*\d")  # an echoed "(1-5)" is not the score
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")


def parse_score(text: str, lo: int, hi: int) -> tuple[float, int] | None:
    """The first number in ``text`` that is not part of a range such as "1-5", with its character
    offset, or ``None`` when there is none or it lies outside ``lo..hi``."""
    masked = _RANGE.sub(lambda m: " " * len(m.group()), text)
    match = _NUMBER.search(masked)
    if match is None or not lo <= float(match.group()) <= hi:
        return None
    return float(match.group()), match.start()


def _token_score(token: str, lo: int, hi: int) -> int | None:
    token = token.strip()
    return int(token) if token.isascii() and token.isdigit() and lo <= int(token) <= hi else None


def logprob_score(content: str, logprobs: list[dict[str, Any]], lo: int, hi: int) -> float | None:
    """Probability-weighted score at the answer's score token, or ``None`` when that fails.

    ``logprobs`` is the choice's ``logprobs.content``: per generated token, its ``token``,
    ``logprob`` and ``top_logprobs``. The score token is the token at the offset of the number
    that ``parse_score`` finds in ``content``; among its alternatives, those that are score values
    (" 4" and "4" both count for 4) share the probability mass, renormalised to sum to one.
    """
    parsed = parse_score(content, lo, hi)
    if parsed is None:
        return None
    end = 0
    for entry in logprobs:  # the token whose span covers the number's first character
        end += len(entry["token"])
        if end > parsed[1]:
            break
    else:
        return None
    # it must be the whole score, a leading space allowed (not "4." or "45")
    if _token_score(entry["token"], lo, hi) != parsed[0]:
        return None
    alternatives = {alt["token"]: alt["logprob"] for alt in entry.get("top_logprobs") or []}
    alternatives.setdefault(entry["token"], entry["logprob"])
    mass: dict[int, float] = {}
    for token, logprob in alternatives.items():
        value = _token_score(token, lo, hi)
        if value is not None:
            mass[value] = mass.get(value, 0.0) + math.exp(logprob)
    total = sum(mass.values())
    return sum(value * p for value, p in mass.items()) / total
