"""Dialogue-summarisation data for T5: read, preprocess, tokenize, batch.

The default source is the bundled copy of TweetSumm (``experiments/assets/tweetsumm``).
A dialogue becomes one line per turn, ``"user: ..."`` / ``"agent: ..."``, with @mentions
and links removed, prefixed with ``"summarize: "`` (the format of the Hugging Face copy
``Andyrasika/TweetSumm-tuned``). Every preprocessing step is a switch on the data module.

Read top to bottom: tokenizer, reading sources, preprocessing, batching, sampling, and the
``DialogSummaryDataModule`` that ties them together. Every problem with the data (a missing
file, split or field, a row that cannot be read or used) is a `DataError` that names the
file, the line (or row index) and the field.
"""

import csv
import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5TokenizerFast

ASSETS = Path(__file__).parent / "assets"
BUNDLED_TWEETSUMM = ASSETS / "tweetsumm"
BUNDLED_TOKENIZER = ASSETS / "t5-tokenizer"

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
# Names a validation split goes by; asking for one finds whichever the source has.
VALIDATION_ALIASES = ("valid", "validation", "val", "dev")


class DataError(ValueError):
    """A problem with the data: a missing file, split or field, or a row that cannot be read or used.

    The message names the file (or data set), the line (or row index) and the field, and says
    what to do; the CLI prints it without a traceback.
    """


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
    if not _holds_tokenizer(path):
        shipped = sorted(p.name for p in ASSETS.iterdir() if _holds_tokenizer(p))
        raise DataError(
            f"no bundled tokenizer {asset!r} (from {str(name_or_path)!r}); the bundled tokenizers are "
            f"{shipped}, named 'bundled:<name>' ('bundled' alone is {BUNDLED_TOKENIZER.name})"
        )
    return str(path)


def _holds_tokenizer(path: Path) -> bool:
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


# ----------------------------------------------------------------------------- reading


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


# ----------------------------------------------------------------------------- preprocessing

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


def describe(value: Any) -> str:
    """A value for a message: its type and (shortened) repr, e.g. ``int 5``, or ``null``."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


# ----------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    ``source`` is the preprocessed dialogue without the task prefix; ``labels`` tokenize one
    reference (for training) while ``references`` keeps every reference (for ROUGE).
    """

    id: str
    source: str
    references: list[str]
    input_ids: list[int]
    labels: list[int]


class Collator:
    """Pads a list of `Example` to the longest in the batch: inputs with pad, labels with -100.

    Args:
        pad_token_id: The tokenizer's pad id (0 for T5).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        n = len(examples)
        source_len = max(len(e.input_ids) for e in examples)
        target_len = max(len(e.labels) for e in examples)
        input_ids = torch.full((n, source_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, source_len), dtype=torch.long)
        labels = torch.full((n, target_len), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention_mask[i, : len(e.input_ids)] = 1
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        real_tokens = sum(len(e.input_ids) + len(e.labels) for e in examples)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "ids": [e.id for e in examples],
            "sources": [e.source for e in examples],
            "references": [list(e.references) for e in examples],
            "padding_fraction": 1.0 - real_tokens / (n * (source_len + target_len)),
        }


# ----------------------------------------------------------------------------- sampling


class EpochShuffle(Sampler[int]):
    """A random permutation of ``range(size)`` that depends only on ``seed + epoch``.

    Args:
        size: Number of examples.
        seed: Base seed; ``set_epoch`` moves to another permutation.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.skip = 0  # indices the next pass leaves out at its start (see skip_batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        skip, self.skip = self.skip, 0
        return iter(torch.randperm(self.size, generator=generator).tolist()[skip:])

    def __len__(self) -> int:
        return self.size


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar length, in random order: less padding than random batches.

    Takes this epoch's indices in random order from ``sampler``, cuts them into buckets of
    ``bucket_batches * batch_size``, sorts each bucket by length, cuts it into batches, and
    shuffles the order of all batches (seed + the sampler's epoch).

    Under DDP, ``sampler`` is a ``DistributedSampler`` and each rank groups its own shard.
    Lightning (``use_distributed_sampler=True``, the default) builds one and re-creates this
    class with it as ``sampler``; it also calls ``set_epoch`` on ``batch_sampler.sampler``
    each epoch, which is why the batch order reads the epoch from ``sampler``.

    Args:
        sampler: Yields this epoch's (and this rank's) indices in random order.
        batch_size: Examples per batch.
        drop_last: Drop the one batch that may be short.
        lengths: Length of each example (indexed like the data set).
        bucket_batches: Batches per bucket: larger groups tighter, smaller keeps more randomness.
        seed: Seed of the batch order.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int],
        bucket_batches: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths, self.bucket_batches, self.seed = lengths, bucket_batches, seed
        self.skip = 0  # batches the next pass leaves out at its start (see skip_batches)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        bucket = (
            self.bucket_batches * self.batch_size
        )  # a multiple of batch_size: only the last batch is short
        batches = []
        for start in range(0, len(indices), bucket):
            chunk = sorted(indices[start : start + bucket], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        generator = torch.Generator().manual_seed(self.seed + getattr(self.sampler, "epoch", 0))
        skip, self.skip = self.skip, 0
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()[skip:])


def skip_batches(dataloader: DataLoader, batches: int) -> None:
    """Make the next pass over a training loader start after its first ``batches`` batches.

    A run resumed from a checkpoint written mid-epoch: Lightning restarts the loader at the
    epoch's beginning and counts the batches already done, so without this the resumed epoch
    would train on its first batches again instead of the ones that were still to come.
    """
    if batches <= 0:
        return
    if isinstance(dataloader.batch_sampler, LengthGroupedBatchSampler):
        dataloader.batch_sampler.skip = batches
    elif isinstance(dataloader.sampler, EpochShuffle):
        dataloader.sampler.skip = batches * dataloader.batch_size
    else:
        raise ValueError(
            f"cannot resume mid-epoch with a {type(dataloader.sampler).__name__}: it cannot start after the "
            f"{batches} batches already done. Resume from an epoch-end checkpoint, or use group_by_length: true"
        )


# ----------------------------------------------------------------------------- data module


_ROLES = ("train", "val", "test")
_STAGE_ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
# The keys of a per-split summary_field (besides the split names train_split/val_split/test_split set).
_ROLE_KEYS = {"train": "train", "test": "test", **{alias: "val" for alias in VALIDATION_ALIASES}}


def check_count(name: str, value: Any, minimum: int = 1, none_means: str | None = None) -> None:
    """Refuse anything but an integer >= ``minimum`` (or None, when ``none_means`` says what it means)."""
    if value is None and none_means is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        allowed += f" (or null for {none_means})" if none_means is not None else ""
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_name(name: str, value: Any, none_means: str | None = None) -> None:
    """Refuse anything but a non-empty string (or None, when ``none_means`` says what it means)."""
    if value is None and none_means is not None:
        return
    if not isinstance(value, str) or not value:
        allowed = "a non-empty string" + (f" (or null for {none_means})" if none_means is not None else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _field_names(value: Any, option: str) -> tuple[str, ...]:
    fields = (value,) if isinstance(value, str) else value
    if (
        not isinstance(fields, (list, tuple))
        or not fields
        or not all(isinstance(f, str) and f for f in fields)
    ):
        raise ValueError(f"{option} must be a field name or a non-empty list of them, got {value!r}")
    return tuple(fields)


def summary_fields_per_role(summary_field: Any, splits: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """``{"train" | "val" | "test": fields}``: the same field(s) for every split, or one entry per split.

    A mapping's key is ``train``, ``test``, a name of the validation split (``valid``,
    ``validation``, ``val``, ``dev``) or a split's configured name (``splits``: role -> name);
    it must give all three splits, each once.
    """
    if not isinstance(summary_field, dict):
        fields = _field_names(summary_field, "summary_field")
        return {role: fields for role in _ROLES}
    keys: dict[str, str] = {}  # role -> the key that gave it
    per_role: dict[str, tuple[str, ...]] = {}
    for key, value in summary_field.items():
        role = _ROLE_KEYS.get(key) or next((r for r, name in splits.items() if name == key), None)
        if role is None:
            raise ValueError(
                f"summary_field has the key {key!r}, which names no split; the keys are train, valid "
                f"(or validation, val, dev), test, or the split names set ({sorted(splits.values())})"
            )
        if role in keys:
            raise ValueError(
                f"summary_field names the {splits[role]!r} split twice, as {keys[role]!r} and {key!r}"
            )
        keys[role], per_role[role] = key, _field_names(value, f"summary_field[{key!r}]")
    missing = [splits[role] for role in _ROLES if role not in per_role]
    if missing:
        raise ValueError(
            f"summary_field has no entry for the split(s) {missing}; a per-split summary_field names "
            "the field(s) of every split, e.g. {train: summary, valid: summary, "
            "test: [summary1, summary2, summary3]}"
        )
    return per_role


def _hub_rows(split: Any, name: str, dataset: str) -> list[Row]:
    """A hub split's rows, placed by row index (``dataset[split][i]``)."""
    return [
        Row(fields, f"row index {i} of split {name!r} of hub data set {dataset!r}")
        for i, fields in enumerate(split.to_list())
    ]


def _check_options(options: dict[str, Any]) -> None:
    """The data module's options as given to ``__init__``: a bad one is a ValueError naming it."""
    for name in ("batch_size", "max_source_length", "max_target_length"):
        check_count(name, options[name])
    check_count("eval_batch_size", options["eval_batch_size"], none_means="batch_size")
    for name in ("limit_train", "limit_val", "limit_test"):
        check_count(name, options[name], none_means="every dialogue")
    check_count("num_workers", options["num_workers"], minimum=0)
    if isinstance(options["seed"], bool) or not isinstance(options["seed"], int):
        raise ValueError(f"seed must be an integer, got {options['seed']!r}")
    for name in (
        "dataset",
        "train_split",
        "val_split",
        "test_split",
        "dialogue_field",
        "speaker_key",
        "text_key",
        "tokenizer",
    ):
        check_name(name, options[name])
    check_name("id_field", options["id_field"], none_means="made-up ids")
    for name in ("strip_mentions_and_links", "group_by_length"):
        if not isinstance(options[name], bool):
            raise ValueError(f"{name} must be true or false, got {options[name]!r}")
    if not isinstance(options["prefix"], str):
        raise ValueError(f'prefix must be a string ("" for none), got {options["prefix"]!r}')
    if options["target_summaries"] not in ("first", "all"):
        raise ValueError(f"target_summaries must be 'first' or 'all', got {options['target_summaries']!r}")
    renames = options["rename_speakers"]
    if renames is not None and not (
        isinstance(renames, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in renames.items())
    ):
        raise ValueError(
            f"rename_speakers must map speaker names to names ({{}} keeps them), got {renames!r}"
        )
    files = options["data_files"]
    if files is not None and not (
        isinstance(files, dict)
        and all(isinstance(k, str) and k and isinstance(v, (str, Path)) and str(v) for k, v in files.items())
    ):
        raise ValueError(
            f"data_files must map split names to file paths, e.g. {{train: a.jsonl, valid: b.jsonl}}, "
            f"got {files!r}"
        )
    tokenizer_path(options["tokenizer"])  # an unknown bundled name fails now; nothing is loaded


class DialogSummaryDataModule(L.LightningDataModule):
    """Dialogue -> summary batches for T5 from TweetSumm, a local file/directory, or the HF hub.

    Batches are dicts: ``input_ids``, ``attention_mask``, ``labels`` (LongTensors, padded to
    the longest in the batch; labels with -100), ``ids`` (list[str]), ``sources`` (the
    preprocessed dialogues, without the prefix), ``references`` (list[list[str]], every
    reference summary of each example) and ``padding_fraction`` (float: pad tokens / all
    tokens over inputs and labels). ``predict_dataloader`` serves the test split.

    The options are checked here, without reading anything (a bad one is a ValueError
    naming it); the data are read and checked by ``setup``: a missing file, split or field,
    a row that cannot be parsed, an empty dialogue, and a summary that is missing, empty or
    not text are a `DataError` naming the file, the line (the row index for Parquet and hub
    data sets) and the field.

    Args:
        dataset: "tweetsumm" for the bundled copy; a local .jsonl/.json/.csv/.parquet file
            (used for every split) or a directory of ``<split>.<ext>`` files; anything else
            is a Hugging Face hub name for ``datasets.load_dataset`` (e.g. "samsum").
        data_files: Explicit ``{split: path}``; takes precedence over ``dataset``.
        train_split: Name of the training split.
        val_split: Name of the validation split ("valid" and "validation" find each other).
        test_split: Name of the test split (also used by predict).
        dialogue_field: Field holding the dialogue: one string, a list of strings, or a list
            of turn dicts.
        summary_field: Field holding the reference summaries (a string, or a non-empty list of
            strings), or a list of fields each holding some (``[summary1, summary2]``): every
            reference counts for multi-reference ROUGE; the first is the label. Every field
            named must be in every row of the split. Or one entry per split, when the splits
            differ (DialogSum: ``{train: summary, valid: summary, test: [summary1, summary2,
            summary3]}``); the keys are train, valid (or validation, val, dev), test, or the
            names set by train_split/val_split/test_split, and every split needs one.
        id_field: Field holding the example id; ids "<split>-<row>" are made up when it is
            missing or None.
        speaker_key: Key of the speaker in a turn dict.
        text_key: Key of the text in a turn dict.
        rename_speakers: Speaker names to replace, e.g. Customer -> user; {} keeps them.
        strip_mentions_and_links: Remove @mentions and http(s) links, collapse whitespace.
        prefix: Text put before every dialogue (T5's task prefix); "" for none.
        max_source_length: Truncate prefix + dialogue to this many tokens.
        max_target_length: Truncate summaries to this many tokens.
        target_summaries: Training targets: "first" reference only, or "all" (one example
            per reference). Validation/test always keep all references for ROUGE, and use the
            first as the label for the loss.
        tokenizer: "bundled" (the T5 SentencePiece tokenizer shipped here, found from any
            working directory; also "bundled:t5-tokenizer"), a hub name or a path.
        batch_size: Training batch size.
        eval_batch_size: Validation/test/predict batch size; None means batch_size.
        num_workers: DataLoader worker processes (0: load in the main process).
        group_by_length: Training batches of similar source length (shuffled buckets);
            validation/test batches in decreasing length order (predict keeps file order).
        limit_train: Use only the first N training dialogues (None: all).
        limit_val: Use only the first N validation dialogues (None: all).
        limit_test: Use only the first N test dialogues (None: all).
        seed: Seed of the training order (the same per epoch on every run).
    """

    def __init__(
        self,
        dataset: str = "tweetsumm",
        data_files: dict[str, str] | None = None,
        train_split: str = "train",
        val_split: str = "valid",
        test_split: str = "test",
        dialogue_field: str = "turns",
        summary_field: str | list[str] | dict[str, str | list[str]] = "summaries",
        id_field: str | None = "id",
        speaker_key: str = "speaker",
        text_key: str = "text",
        rename_speakers: dict[str, str] = {"Customer": "user", "Agent": "agent"},  # noqa: B006 - copied below
        strip_mentions_and_links: bool = True,
        prefix: str = "summarize: ",
        max_source_length: int = 512,
        max_target_length: int = 128,
        target_summaries: Literal["first", "all"] = "first",
        tokenizer: str = "bundled",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        group_by_length: bool = True,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_options(locals())
        self.save_hyperparameters()
        self.dataset, self.data_files = dataset, dict(data_files) if data_files else None
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.dialogue_field, self.id_field = dialogue_field, id_field
        self.summary_fields = summary_fields_per_role(summary_field, self.splits)
        self.speaker_key, self.text_key = speaker_key, text_key
        self.rename_speakers = dict(rename_speakers or {})
        self.strip_mentions_and_links, self.prefix = strip_mentions_and_links, prefix
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.target_summaries = target_summaries
        self.tokenizer_name = tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.group_by_length, self.seed = num_workers, group_by_length, seed
        self.examples: dict[str, list[Example]] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer named by the ``tokenizer`` argument, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    # -- sources

    def _is_hub(self) -> bool:
        """Whether ``dataset`` is a hub name: not tweetsumm, no existing path, and no name of a file or a path."""
        looks_local = self.dataset.lower().endswith(FILE_FORMATS) or self.dataset.startswith(("/", ".", "~"))
        return not (
            self.data_files
            or self.dataset == "tweetsumm"
            or looks_local
            or Path(self.dataset).expanduser().exists()
        )

    def _open_source(self) -> tuple[str, dict[str, Callable[[], list[Row]]]]:
        """A description of the source and, per split name, a function that reads its rows."""
        if self.data_files:
            return "data_files", {
                s: partial(read_located_rows, Path(p).expanduser()) for s, p in self.data_files.items()
            }
        if self._is_hub():
            data = load_hub_dataset(self.dataset)
            return f"hub data set {self.dataset!r}", {
                s: partial(_hub_rows, data[s], s, self.dataset) for s in data
            }
        path = BUNDLED_TWEETSUMM if self.dataset == "tweetsumm" else Path(self.dataset).expanduser()
        if not path.exists():
            raise DataError(
                f"dataset {self.dataset!r}: no such file or directory (under {Path.cwd()}); give an "
                "existing file or directory, 'tweetsumm', or a hub name"
            )
        if path.is_file():
            return str(path), {s: partial(read_located_rows, path) for s in self.splits.values()}
        files = split_files(path)
        if not files:
            raise DataError(
                f"{path} holds no <split>{{{','.join(FILE_FORMATS)}}} files, e.g. train.jsonl, "
                "valid.jsonl and test.jsonl"
            )
        return str(path), {s: partial(read_located_rows, f) for s, f in files.items()}

    def prepare_data(self) -> None:
        """Download a hub data set once (rank 0); setup() then reads it from the cache."""
        if self._is_hub():
            load_hub_dataset(self.dataset)

    def setup(self, stage: str | None = None) -> None:
        """Read, check, preprocess and tokenize the splits ``stage`` needs (all when None)."""
        roles = [r for r in _STAGE_ROLES.get(stage, _ROLES) if r not in self.examples]
        if not roles:
            return
        source, splits = self._open_source()
        # Resolve every name before reading anything: a typo fails at once.
        names = {role: resolve_split(self.splits[role], list(splits), source) for role in roles}
        for role in roles:
            rows = splits[names[role]]()[: self.limits[role]]
            self.examples[role] = self._make_examples(rows, role, f"split {names[role]!r} of {source}")

    def _make_examples(self, rows: list[Row], role: str, where: str) -> list[Example]:
        """Check and preprocess the rows of one split (``role``) and tokenize them."""
        if not rows:
            raise DataError(f"{where} is empty")
        split = self.splits[role]
        ids, sources, references = [], [], []
        for i, row in enumerate(rows):
            self._check_fields(row, role, where)
            has_id = self.id_field is not None and row.fields.get(self.id_field) is not None
            ids.append(str(row.fields[self.id_field]) if has_id else f"{split}-{i}")
            place = f"{row.where} (id {ids[-1]})"
            sources.append(self._source(row.fields, place))
            references.append(self._references(row.fields, role, place))

        # Which reference each example learns from: the first, or one example per reference.
        every = role == "train" and self.target_summaries == "all"
        pairs = [(i, ref) for i, refs in enumerate(references) for ref in (refs if every else refs[:1])]
        tok = self.tokenizer
        input_ids = tok(
            [self.prefix + s for s in sources], max_length=self.max_source_length, truncation=True
        )
        labels = tok(
            text_target=[ref for _, ref in pairs], max_length=self.max_target_length, truncation=True
        )
        input_ids, labels = input_ids["input_ids"], labels["input_ids"]
        return [
            Example(ids[i], sources[i], references[i], input_ids[i], lab)
            for (i, _), lab in zip(pairs, labels)
        ]

    def _check_fields(self, row: Row, role: str, where: str) -> None:
        """Every field the split needs is in the row, or a DataError names the first missing one."""
        for field in (self.dialogue_field, *self.summary_fields[role]):
            if field not in row.fields:
                hint = (
                    "; dialogue_field names the dialogue's field"
                    if field == self.dialogue_field
                    else "; summary_field names the summaries' field(s), one entry per split if they differ: "
                    "{train: summary, valid: summary, test: [summary1, summary2]}"
                )
                raise DataError(
                    f"{row.where}: field {field!r} not found (in {where}); the fields that exist are "
                    f"{sorted(row.fields)}{hint}"
                )

    def _source(self, fields: dict[str, Any], place: str) -> str:
        """The row's dialogue, formatted; an empty one (or one that cleaning empties) is refused."""
        dialogue = fields[self.dialogue_field]
        try:
            source = format_dialogue(
                dialogue, self.speaker_key, self.text_key, self.rename_speakers, self.strip_mentions_and_links
            )
        except DataError as err:
            raise DataError(f"{place}, field {self.dialogue_field!r}: {err}") from None
        if not source.strip():
            had_text = (
                self.strip_mentions_and_links
                and format_dialogue(
                    dialogue, self.speaker_key, self.text_key, strip_mentions_and_links=False
                ).strip()
            )
            cleaned = " once @mentions and links are removed" if had_text else ""
            raise DataError(
                f"{place}: the dialogue in field {self.dialogue_field!r} is empty{cleaned} "
                f"(it is {describe(dialogue)}); fill it in or remove the row"
            )
        return source

    def _references(self, fields: dict[str, Any], role: str, place: str) -> list[str]:
        """Every reference summary of the row, from each of the split's summary fields in order."""
        try:
            return [ref for field in self.summary_fields[role] for ref in references_in(fields[field], field)]
        except DataError as err:
            raise DataError(f"{place}: {err}") from None

    # -- loaders

    def _loader(self, examples: list[Example], **kwargs: Any) -> DataLoader:
        return DataLoader(
            examples,
            collate_fn=Collator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        examples = self.examples["train"]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Shard ourselves so this is right under Trainer(use_distributed_sampler=False) too;
            # with the default True, Lightning swaps in its own equivalent DistributedSampler.
            order: Sampler[int] = DistributedSampler(examples, shuffle=True, seed=self.seed)
        else:
            order = EpochShuffle(len(examples), seed=self.seed)
        if not self.group_by_length:
            return self._loader(examples, batch_size=self.batch_size, sampler=order)
        lengths = [len(e.input_ids) for e in examples]
        batches = LengthGroupedBatchSampler(
            order, self.batch_size, drop_last=False, lengths=lengths, seed=self.seed
        )
        return self._loader(examples, batch_sampler=batches)

    def _eval_loader(self, role: str, sort: bool) -> DataLoader:
        examples = self.examples[role]
        order = None
        if sort and self.group_by_length:
            # Longest first: similar lengths per batch (faster generation), and any OOM shows at once.
            order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
        return self._loader(examples, batch_size=self.eval_batch_size, sampler=order)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val", sort=True)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", sort=True)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test", sort=False)
