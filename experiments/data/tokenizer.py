"""The tokenizer setting: ``bundled`` (the T5 SentencePiece tokenizer shipped in
``experiments/assets``), ``bundled:<name>``, a hub name or a local path."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5TokenizerFast

from experiments.data.errors import DataError
from experiments.data.reading import ASSETS

BUNDLED_TOKENIZER = ASSETS / "t5-tokenizer"
BUNDLED = "bundled"  # tokenizer: bundled (or bundled:t5-tokenizer) names the tokenizer shipped in ASSETS
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def is_bundled(name: str | Path) -> bool:
    """Whether a tokenizer setting names a bundled tokenizer: ``"bundled"`` or ``"bundled:<name>"``."""
    return str(name) == BUNDLED or str(name).startswith(BUNDLED + ":")


def tokenizer_path(name_or_path: str | Path) -> str:
    """The hub name or path a tokenizer setting means, wherever the command runs.

    ``"bundled:<name>"`` is the tokenizer shipped in ``experiments/assets/<name>`` and
    ``"bundled"`` the T5 one (``"bundled:t5-tokenizer"``); anything else is returned as given.
    """
    if not is_bundled(name_or_path):
        return str(name_or_path)
    asset = str(name_or_path).removeprefix(BUNDLED).removeprefix(":") or BUNDLED_TOKENIZER.name
    path = ASSETS / asset
    if not holds_tokenizer(path):
        shipped = sorted(p.name for p in ASSETS.iterdir() if holds_tokenizer(p))
        raise DataError(
            f"no bundled tokenizer {asset!r} (from {str(name_or_path)!r}); the bundled tokenizers are "
            f"{shipped}, named 'bundled:<name>' ('bundled' alone is {BUNDLED_TOKENIZER.name})"
        )
    return str(path)


def holds_tokenizer(path: Path) -> bool:
    """Whether the directory ``path`` holds a tokenizer (its tokenizer.json, spiece.model or config)."""
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(name_or_path: str | Path = BUNDLED) -> PreTrainedTokenizerBase:
    """A bundled tokenizer (``"bundled"``: the T5 SentencePiece one), or any hub name / local path."""
    path = tokenizer_path(name_or_path)
    if is_bundled(name_or_path):
        return T5TokenizerFast.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # a missing directory reads as a malformed hub name
        raise DataError(
            f"could not load the tokenizer {path!r}: it is no directory under {Path.cwd()} and no hub name "
            f"that loads ({type(err).__name__}: {err}). Use tokenizer: bundled for the T5 tokenizer shipped "
            "here, an existing directory, or a hub name (online, or already in the local cache)"
        ) from err
