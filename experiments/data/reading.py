"""Reading sources: local files (JSON Lines, JSON arrays, CSV, Parquet), split directories and
Hugging Face hub data sets. Every row keeps its place (the physical line, or the row index) so that
any later problem with it can name the file and line."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.data.errors import DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUNDLED_TWEETSUMM = ASSETS / "tweetsumm"

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
# Names a validation split goes by; asking for one finds whichever the source has.
VALIDATION_ALIASES = ("valid", "validation", "val", "dev")


@dataclass(frozen=True)
class Row:
    """One row of a source, and where it is for messages: ``"<file>, line 9"`` or ``"<file>, row index 3"``."""

    fields: dict[str, Any]
    where: str


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json / .csv / .parquet file, each a dict; errors name file and line."""
    return [row.fields for row in read_located_rows(path)]


def read_located_rows(path: Path) -> list[Row]:
    """`read_rows` with each row's place: the physical line (JSON, CSV) or the row index (Parquet)."""
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(FILE_FORMATS)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'no such file'}")
    if suffix == ".parquet":
        rows = [Row(fields, f"{path}, row index {i}") for i, fields in enumerate(_read_parquet(path))]
    else:
        text = _read_text(path)
        read = _read_csv if suffix == ".csv" else _read_json
        rows = [Row(fields, f"{path}, line {line}") for line, fields in read(text, path)]
    for row in rows:
        if not isinstance(row.fields, dict):
            raise DataError(
                f"{row.where}: a {type(row.fields).__name__}, expected an object with named fields"
            )
    return rows


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped); a bad byte names its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}: byte 0x{data[err.start]:02x} at column {column} is not UTF-8 ({err.reason}); "
            "save the file as UTF-8 (for Latin-1: iconv -f latin1 -t utf-8 in > out)"
        ) from None


def _read_json(text: str, path: Path) -> list[tuple[int, Any]]:
    """``(line, value)`` per row: JSON Lines (blank lines skipped), or one JSON array of rows."""
    if text.lstrip().startswith("["):  # one JSON array, e.g. the original SAMSum files
        return _read_json_array(text, path)
    rows = []
    # split on "\n" only: str.splitlines() would also cut at U+2028, which JSON allows inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
    return rows


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _read_json_array(text: str, path: Path) -> list[tuple[int, Any]]:
    """The elements of a JSON array, each with the line it starts on."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    # The text is valid JSON: walk it again to find where each element starts.
    decoder, rows = json.JSONDecoder(), []
    pos, line, counted = _JSON_SPACE.match(text, text.index("[") + 1).end(), 1, 0
    for _ in values:
        line, counted = line + text.count("\n", counted, pos), pos
        value, pos = decoder.raw_decode(text, pos)
        rows.append((line, value))
        pos = _JSON_SPACE.match(text, _JSON_SPACE.match(text, pos).end() + 1).end()  # past the "," or "]"
    return rows


def _read_csv(text: str, path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line, row)`` per CSV record, the line where the record starts; blank lines skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        header = next((cells for cells in reader if cells), None)  # the first record that is not blank
        if header is None:
            return rows
        if len(set(header)) < len(header):
            repeated = sorted({h for h in header if header.count(h) > 1})
            raise DataError(
                f"{path}, line {reader.line_num}: the header names {repeated} more than once; "
                "name each column once"
            )
        end = reader.line_num
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                raise DataError(
                    f"{path}, line {start}: {len(cells)} cells, but the header has {len(header)} "
                    f"({', '.join(header)}); quote cells that hold commas"
                )
            rows.append((start, dict(zip(header, cells))))
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None
    return rows


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as err:
        raise DataError(f"{path}: not a valid Parquet file ({err})") from None


def split_files(directory: Path) -> dict[str, Path]:
    """``{split: file}`` for the files ``<split>.<jsonl|json|csv|parquet>`` in ``directory``."""
    files: dict[str, Path] = {}
    for suffix in FILE_FORMATS:  # the first format listed wins when a split has two files
        for path in sorted(directory.glob(f"*{suffix}")):
            files.setdefault(path.name[: -len(suffix)], path)
    return files


def load_hub_dataset(name: str) -> Any:
    """``datasets.load_dataset(name)``, with an error that says what to do when it fails offline."""
    import datasets

    try:
        return datasets.load_dataset(name)
    except Exception as err:
        raise DataError(
            f"could not load the Hugging Face data set {name!r} ({type(err).__name__}: {err}). "
            f"{name!r} is neither 'tweetsumm' nor an existing local path, so it was taken as a hub name; "
            "offline, that works only if the data set is already in the local datasets cache. "
            "Use dataset='tweetsumm' for the bundled copy, or a local .jsonl/.json/.csv/.parquet file "
            "or a directory of {train,valid,test}.<ext> files."
        ) from err


def resolve_split(name: str, available: Sequence[str], source: str) -> str:
    """The split of ``available`` that ``name`` means ("valid" also finds "validation" and back)."""
    if name in available:
        return name
    if name in VALIDATION_ALIASES:
        for alias in VALIDATION_ALIASES:
            if alias in available:
                return alias
    raise DataError(f"split {name!r} not found in {source}; the splits that exist are {sorted(available)}")
