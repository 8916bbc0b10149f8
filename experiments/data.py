"""Dialogue-summarisation data for T5: read, preprocess, tokenize, batch.

The default source is the bundled copy of TweetSumm (``experiments/assets/tweetsumm``).
A dialogue becomes one line per turn, ``"user: ..."`` / ``"agent: ..."``, with @mentions
and links removed, prefixed with ``"summarize: "`` (the format of the Hugging Face copy
``Andyrasika/TweetSumm-tuned``). Every preprocessing step is a switch on the data module.

Read top to bottom: tokenizer, reading sources, preprocessing, batching, sampling, and the
``DialogSummaryDataModule`` that ties them together.
"""

import csv
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


def load_tokenizer(name_or_path: str | Path = "bundled") -> PreTrainedTokenizerBase:
    """The bundled T5 SentencePiece tokenizer (``"bundled"``), or any hub name / local path."""
    if str(name_or_path) == "bundled":
        return T5TokenizerFast.from_pretrained(BUNDLED_TOKENIZER)
    return AutoTokenizer.from_pretrained(name_or_path)


# ----------------------------------------------------------------------------- reading


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json / .csv / .parquet file, each a dict; parse errors name file and line."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_json(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(FILE_FORMATS)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i + 1} is a {type(row).__name__}, expected an object with named fields")
    return rows


def _read_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # one JSON array, e.g. the original SAMSum files
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    rows = []
    # split on "\n" only: str.splitlines() would also cut at U+2028, which JSON allows inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, strict=True)
        rows = []
        try:
            for row in reader:
                # DictReader files surplus cells under None and fills missing ones with None
                if None in row or None in row.values():
                    raise ValueError(
                        f"{path}, line {reader.line_num}: the row's number of cells differs from the header's "
                        f"{len(reader.fieldnames or [])}"
                    )
                rows.append(row)
        except csv.Error as err:
            raise ValueError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as err:
        raise ValueError(f"{path}: not a valid Parquet file ({err})") from None


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
    except Exception as err:  # noqa: BLE001 - any failure gets the same advice, the cause stays chained
        raise RuntimeError(
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
    raise ValueError(f"split {name!r} not found in {source}; the splits that exist are {sorted(available)}")


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
    cleaning (say, only "@AppleSupport") is dropped.
    """
    rename_speakers = rename_speakers or {}
    if isinstance(dialogue, str):
        if not strip_mentions_and_links:
            return dialogue
        return "\n".join(line for line in map(clean_text, dialogue.splitlines()) if line)
    lines = []
    for turn in dialogue:
        if isinstance(turn, str):
            speaker, text = None, turn
        else:
            for key in (speaker_key, text_key):
                if key not in turn:
                    raise ValueError(f"a turn has no key {key!r}; the keys it has are {sorted(turn)}")
            speaker, text = str(turn[speaker_key]), turn[text_key]
        text = clean_text(text) if strip_mentions_and_links else text.strip()
        if text:
            lines.append(text if speaker is None else f"{rename_speakers.get(speaker, speaker)}: {text}")
    return "\n".join(lines)


def as_references(value: Any) -> list[str]:
    """Reference summaries as a list of non-empty strings: one string, or a list of them."""
    refs = [value] if isinstance(value, str) else list(value or [])
    return [r.strip() for r in refs if isinstance(r, str) and r.strip()]


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
        bucket = self.bucket_batches * self.batch_size  # a multiple of batch_size: only the last batch is short
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


class DialogSummaryDataModule(L.LightningDataModule):
    """Dialogue -> summary batches for T5 from TweetSumm, a local file/directory, or the HF hub.

    Batches are dicts: ``input_ids``, ``attention_mask``, ``labels`` (LongTensors, padded to
    the longest in the batch; labels with -100), ``ids`` (list[str]), ``sources`` (the
    preprocessed dialogues, without the prefix), ``references`` (list[list[str]], every
    reference summary of each example) and ``padding_fraction`` (float: pad tokens / all
    tokens over inputs and labels). ``predict_dataloader`` serves the test split.

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
        summary_field: Field holding the reference summaries (a string, or a list of strings), or a
            list of fields each holding some (DialogSum's ``[summary1, summary2, summary3]``):
            every reference counts for multi-reference ROUGE; the first is the training target.
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
        tokenizer: "bundled" (the T5 SentencePiece tokenizer shipped here), a hub name or a path.
        batch_size: Training batch size.
        eval_batch_size: Validation/test/predict batch size; None means batch_size.
        num_workers: DataLoader worker processes.
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
        summary_field: str | list[str] = "summaries",
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
        if target_summaries not in ("first", "all"):
            raise ValueError(f"target_summaries must be 'first' or 'all', got {target_summaries!r}")
        for name, value in [("batch_size", batch_size), ("max_source_length", max_source_length),
                            ("max_target_length", max_target_length), ("eval_batch_size", eval_batch_size),
                            ("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)]:
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.save_hyperparameters()
        self.dataset, self.data_files = dataset, dict(data_files) if data_files else None
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.dialogue_field, self.id_field = dialogue_field, id_field
        self.summary_fields = [summary_field] if isinstance(summary_field, str) else list(summary_field)
        if not self.summary_fields or not all(isinstance(f, str) and f for f in self.summary_fields):
            raise ValueError(f"summary_field must be a field name or a non-empty list of them, got {summary_field!r}")
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
        return not self.data_files and self.dataset != "tweetsumm" and not Path(self.dataset).expanduser().exists()

    def _open_source(self) -> tuple[str, dict[str, Callable[[], list[dict[str, Any]]]]]:
        """A description of the source and, per split name, a function that reads its rows."""
        if self.data_files:
            return "data_files", {s: partial(read_rows, Path(p).expanduser()) for s, p in self.data_files.items()}
        if self._is_hub():
            data = load_hub_dataset(self.dataset)
            return f"hub data set {self.dataset!r}", {s: data[s].to_list for s in data}
        path = BUNDLED_TWEETSUMM if self.dataset == "tweetsumm" else Path(self.dataset).expanduser()
        if path.is_file():
            return str(path), {s: partial(read_rows, path) for s in self.splits.values()}
        files = split_files(path)
        if not files:
            raise ValueError(f"{path} holds no <split>{{{','.join(FILE_FORMATS)}}} files")
        return str(path), {s: partial(read_rows, f) for s, f in files.items()}

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
            self.examples[role] = self._make_examples(rows, names[role], source, train=role == "train")

    def _make_examples(self, rows: list[dict[str, Any]], split: str, source: str, train: bool) -> list[Example]:
        where = f"split {split!r} of {source}"
        if not rows:
            raise ValueError(f"{where} is empty")
        ids, sources, references = [], [], []
        for i, row in enumerate(rows):
            for field in (self.dialogue_field, *self.summary_fields):
                if field not in row:
                    raise ValueError(f"field {field!r} not found in row {i + 1} of {where}; "
                                     f"the fields that exist are {sorted(row)}")
            has_id = self.id_field is not None and row.get(self.id_field) is not None
            ids.append(str(row[self.id_field]) if has_id else f"{split}-{i}")
            try:
                sources.append(format_dialogue(row[self.dialogue_field], self.speaker_key, self.text_key,
                                               self.rename_speakers, self.strip_mentions_and_links))
            except ValueError as err:
                raise ValueError(f"row {i + 1} (id {ids[-1]}) of {where}: {err}") from None
            references.append([ref for field in self.summary_fields for ref in as_references(row[field])])
            if not references[-1]:
                fields = " or ".join(repr(f) for f in self.summary_fields)
                raise ValueError(f"row {i + 1} (id {ids[-1]}) of {where} has no summary in {fields}")

        # Which reference each example learns from: the first, or one example per reference.
        every = train and self.target_summaries == "all"
        pairs = [(i, ref) for i, refs in enumerate(references) for ref in (refs if every else refs[:1])]
        tok = self.tokenizer
        input_ids = tok([self.prefix + s for s in sources], max_length=self.max_source_length, truncation=True)
        labels = tok(text_target=[ref for _, ref in pairs], max_length=self.max_target_length, truncation=True)
        input_ids, labels = input_ids["input_ids"], labels["input_ids"]
        return [Example(ids[i], sources[i], references[i], input_ids[i], lab) for (i, _), lab in zip(pairs, labels)]

    # -- loaders

    def _loader(self, examples: list[Example], **kwargs: Any) -> DataLoader:
        return DataLoader(examples, collate_fn=Collator(self.tokenizer.pad_token_id), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, **kwargs)

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
        batches = LengthGroupedBatchSampler(order, self.batch_size, drop_last=False, lengths=lengths, seed=self.seed)
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
